"""Tests for pipeline/rollout/backends/prefix_attention.py: the shared-prefix attention is registered with
transformers on first use, never at import.

The check runs in a fresh interpreter: in this one, earlier tests may already have generated (and so
registered it).
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO_ROOT

SCRIPT = """
import importlib, json, pkgutil, sys
import pipeline.rollout
from transformers import AttentionInterface

names = [m.name for m in pkgutil.walk_packages(pipeline.rollout.__path__, "pipeline.rollout.")]
for name in names:
    importlib.import_module(name)
from pipeline.rollout.backends.hf import HFBackend
from pipeline.rollout.backends.prefix_attention import ATTENTION_NAME, register_attention, shared_prefix_attention
from pipeline.rollout.backends import GenerationRequest
from pipeline.models import load_model

after_import = ATTENTION_NAME in AttentionInterface()
model, tokenizer = load_model(sys.argv[1])
backend = HFBackend(model, tokenizer, temperature=0.0)
common = list(range(60, 120))  # 60 shared tokens: the backend keeps them as one shared prefix
backend.generate([GenerationRequest(i, common + [200 + i], 3) for i in range(2)])
after_generate = AttentionInterface().get(ATTENTION_NAME) is shared_prefix_attention
size = len(AttentionInterface())
again = register_attention() == ATTENTION_NAME and len(AttentionInterface()) == size
print(json.dumps({"modules": names, "after_import": after_import, "after_generate": after_generate,
                  "shared_prefix": backend.caches.prefix is not None, "again": again,
                  "attn_restored": model.config._attn_implementation != ATTENTION_NAME}))
"""


def test_importing_registers_nothing_and_a_prefix_sharing_generation_registers_once(tiny_model_dir):
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_model_dir)], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert "pipeline.rollout.backends.prefix_attention" in result["modules"]
    assert "pipeline.rollout.backends.hf" in result["modules"]
    assert result["after_import"] is False, "importing pipeline.rollout registered an attention function"
    assert result["shared_prefix"] and result["after_generate"]
    assert result["again"] and result["attn_restored"]
