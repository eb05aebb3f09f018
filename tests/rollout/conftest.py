"""The tiny model the rollout tests generate with, loaded once per test module."""

from __future__ import annotations

import pytest

from pipeline.models import load_model


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir))
    model.eval()
    return model, tokenizer
