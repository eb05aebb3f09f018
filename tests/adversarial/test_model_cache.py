"""A damaged or tampered model cache (pipeline/models.py).

The embedded model is converted once into ``$TURNWISE_CACHE/models/``; everything later trusts that
directory. These tests damage it the ways disks, interrupted copies and people do, and check that
turnwise notices (by size on every use, by SHA-256 at ``model prepare`` and once per process), says why,
and prepares it again; and that a damaged checkpoint it cannot rebuild fails with a sentence, not a
``SafetensorError``. The conversion is the suite's fake (a copy of the tiny model), so each test is quick.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

import pipeline.models as models
from pipeline.cli import main
from pipeline.models import DEFAULT_MODEL, MARKER_FILE, load_model, prepare_embedded_model

WEIGHTS = "model.safetensors"


@pytest.fixture
def prepared(tmp_cache: Path, fake_conversion: SimpleNamespace) -> Path:
    path = prepare_embedded_model()
    assert len(fake_conversion.calls) == 1
    return path


def run_prepare(capsys) -> tuple[str, str]:
    assert main(["model", "prepare"]) == 0
    captured = capsys.readouterr()
    return captured.out, captured.err


def truncate(path: Path, keep: int = 1000) -> None:
    os.truncate(path, keep)


# -- issue 21, finding 13 ----------------------------------------------------------------------------
def test_model_prepare_over_truncated_weights_prepares_again(prepared, fake_conversion, capsys):
    """It used to say "already prepared" over a truncated model.safetensors."""
    size = (prepared / WEIGHTS).stat().st_size
    truncate(prepared / WEIGHTS)
    out, err = run_prepare(capsys)
    assert out == f"prepared: {prepared}\n"
    assert f"{WEIGHTS} has 1,000 bytes; the marker records {size:,}" in err and "preparing it again" in err
    assert len(fake_conversion.calls) == 2 and (prepared / WEIGHTS).stat().st_size == size


def test_loading_truncated_weights_prepares_again_with_a_warning(prepared, fake_conversion, caplog):
    """Loading used to raise a raw SafetensorError."""
    truncate(prepared / WEIGHTS)
    with caplog.at_level(logging.WARNING, logger="pipeline.models"):
        model, _ = load_model(DEFAULT_MODEL)
    assert model is not None and len(fake_conversion.calls) == 2
    assert any("is damaged" in r.getMessage() and WEIGHTS in r.getMessage() for r in caplog.records)


def test_a_truncated_checkpoint_directory_fails_with_a_clear_error(tiny_model_dir, tmp_path):
    """A local directory cannot be prepared again: the error names it and says what may be wrong."""
    copy = tmp_path / "checkpoint"
    shutil.copytree(tiny_model_dir, copy)
    truncate(copy / WEIGHTS, 100)
    with pytest.raises(ValueError) as error:
        load_model(copy)
    message = str(error.value)
    assert message.startswith(f"Cannot load the checkpoint in {copy} (SafetensorError: ")
    assert "may be truncated or corrupted: save or copy the checkpoint again." in message


# -- more damage -------------------------------------------------------------------------------------
def test_a_marker_that_lies_about_the_content_is_caught_by_its_hash(prepared, fake_conversion, capsys):
    """Same size, other bytes: only the SHA-256 can tell, and `model prepare` checks it."""
    weights = prepared / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    out, err = run_prepare(capsys)
    assert out.startswith("prepared:") and "does not match its recorded SHA-256" in err
    assert len(fake_conversion.calls) == 2


def test_a_file_altered_after_a_successful_check_is_caught_at_the_next(prepared, fake_conversion):
    assert models.check_prepared(prepared, hashes=True) is None
    config = prepared / "config.json"
    config.write_text(config.read_text().replace("2", "3"))  # same length, new content and mtime
    assert "config.json does not match" in models.check_prepared(prepared, hashes=True)


@pytest.mark.parametrize("marker, says", [
    ("not json {", "is not readable JSON"),
    (json.dumps({"format": 1, "model": DEFAULT_MODEL}), "has no file record"),
    (json.dumps([1, 2, 3]), "has no file record"),
    (json.dumps({"format": 2, "files": {WEIGHTS: {"size": "big", "sha256": "x"}}}), "malformed entry"),
    (json.dumps({"format": 2, "files": {"../../etc/passwd": {"size": 1, "sha256": "x"}}}), "../../etc/passwd is missing"),
])
def test_a_bad_marker_means_not_prepared(prepared, fake_conversion, capsys, marker, says):
    (prepared / MARKER_FILE).write_text(marker)
    assert says in models.check_prepared(prepared)
    out, err = run_prepare(capsys)
    assert out.startswith("prepared:") and says in err and len(fake_conversion.calls) == 2
    assert models.check_prepared(prepared, hashes=True) is None


def test_a_marker_that_is_a_directory_is_no_marker(prepared):
    (prepared / MARKER_FILE).unlink()
    (prepared / MARKER_FILE).mkdir()
    assert "no turnwise_prepared.json" in models.check_prepared(prepared)


def test_an_extra_file_in_the_checkpoint_is_damage(prepared, fake_conversion, capsys):
    """A file the prepare did not write (a second weight shard, a script) is not loaded silently."""
    (prepared / "model-00002-of-00002.safetensors").write_bytes(b"\0" * 64)
    out, err = run_prepare(capsys)
    assert "model-00002-of-00002.safetensors is not one of the prepared files" in err
    assert not (prepared / "model-00002-of-00002.safetensors").exists()


def test_a_symlinked_weight_file_is_damage_and_its_target_is_left_alone(prepared, fake_conversion, tmp_path, capsys):
    outside = tmp_path / "outside.bin"
    shutil.copy(prepared / WEIGHTS, outside)  # same size and bytes: only the symlink gives it away
    (prepared / WEIGHTS).unlink()
    (prepared / WEIGHTS).symlink_to(outside)
    assert models.check_prepared(prepared) == f"{WEIGHTS} is not a regular file"
    out, err = run_prepare(capsys)
    assert out.startswith("prepared:") and not (prepared / WEIGHTS).is_symlink()
    assert outside.read_bytes() == (prepared / WEIGHTS).read_bytes()


def test_a_symlinked_cache_directory_is_replaced_without_deleting_its_target(prepared, fake_conversion, tmp_path,
                                                                             capsys):
    """The model directory is a symlink to a damaged copy elsewhere: it is replaced; the copy survives."""
    elsewhere = tmp_path / "elsewhere"
    shutil.move(prepared, elsewhere)
    truncate(elsewhere / WEIGHTS)
    prepared.symlink_to(elsewhere, target_is_directory=True)
    out, err = run_prepare(capsys)
    assert out.startswith("prepared:") and "has 1,000 bytes" in err
    assert not prepared.is_symlink() and models.check_prepared(prepared, hashes=True) is None
    assert (elsewhere / WEIGHTS).stat().st_size == 1000 and (elsewhere / MARKER_FILE).exists()
    assert [p.name for p in prepared.parent.iterdir() if p.name.startswith(".")] == []


def test_a_symlinked_cache_directory_that_is_intact_is_used_as_it_is(prepared, fake_conversion, tmp_path, capsys):
    """Moving the cache to a bigger disk and linking it back is fine: the content is what is checked."""
    elsewhere = tmp_path / "elsewhere"
    shutil.move(prepared, elsewhere)
    prepared.symlink_to(elsewhere, target_is_directory=True)
    out, _ = run_prepare(capsys)
    assert out == f"already prepared: {prepared}\n" and len(fake_conversion.calls) == 1


def test_a_damaged_prepared_checkpoint_named_by_path_is_refused_clearly(prepared, tmp_path):
    copy = tmp_path / "copied-cache"
    shutil.copytree(prepared, copy)
    truncate(copy / "tokenizer.json", 10)
    with pytest.raises(ValueError, match=r"holds a prepared checkpoint that is damaged \(tokenizer.json has 10 bytes"):
        load_model(copy)


def test_a_corrupted_tokenizer_in_a_checkpoint_directory_fails_clearly(tiny_model_dir, tmp_path):
    copy = tmp_path / "checkpoint"
    shutil.copytree(tiny_model_dir, copy)
    (copy / "tokenizer.json").write_text('{"version": ')
    with pytest.raises(ValueError, match=rf"Cannot load the checkpoint in {copy} \(JSONDecodeError"):
        load_model(copy)


def test_an_intact_cache_is_still_already_prepared(prepared, fake_conversion, capsys):
    out, err = run_prepare(capsys)
    assert out == f"already prepared: {prepared}\n" and err == "" and len(fake_conversion.calls) == 1
    marker = json.loads((prepared / MARKER_FILE).read_text())
    assert marker["format"] == 2 and set(marker["files"]) == {p.name for p in prepared.iterdir()} - {MARKER_FILE}
    assert all(len(entry["sha256"]) == 64 for entry in marker["files"].values())
