"""Hostile checkpoint directories: what a resume must pass over (with the reason) or refuse clearly.

Each test builds checkpoints the way transformers lays them out (trainer_state.json, optimizer.pt, the
adapter) and marks them complete with ``write_marker``, as ``CheckpointMarker`` does after a save; then
it damages one the way a crash, a half-finished S3 sync or a hand edit would, and checks that
``latest_complete_checkpoint`` falls back to the intact one and says why it skipped the other.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

from pipeline.training.checkpoints import MARKER, checkpoint_problem, latest_complete_checkpoint, write_marker
from tests.training.conftest import make_trainer  # noqa: F401  (the tiny-trainer fixture)


def make_checkpoint(output_dir: Path, step: int, name: str | None = None, optimizer: bool = True,
                    mark: bool = True) -> Path:
    checkpoint = output_dir / (name or f"checkpoint-{step}")
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    (checkpoint / "adapter_model.safetensors").write_bytes(os.urandom(256))
    (checkpoint / "scheduler.pt").write_bytes(os.urandom(64))
    if optimizer:
        (checkpoint / "optimizer.pt").write_bytes(os.urandom(512))
    if mark:
        write_marker(checkpoint, step)
    return checkpoint


def resume_choice(output_dir: Path) -> tuple[Path | None, list[str]]:
    warnings: list[str] = []
    return latest_complete_checkpoint(output_dir, warn=warnings.append), warnings


@pytest.fixture
def output_dir(tmp_path) -> Path:
    directory = tmp_path / "run"
    make_checkpoint(directory, 1)  # the intact fallback every test expects
    return directory


def test_a_checkpoint_name_that_is_a_file_is_skipped(output_dir):
    (output_dir / "checkpoint-9").write_text("not a directory")
    chosen, warnings = resume_choice(output_dir)
    assert chosen == output_dir / "checkpoint-1"
    assert warnings == [f"not resuming from {output_dir / 'checkpoint-9'}: it is not a directory. Falling back to an "
                        "earlier checkpoint."]


def test_a_symlinked_checkpoint_is_not_followed(output_dir, tmp_path):
    elsewhere = make_checkpoint(tmp_path / "elsewhere", 5)  # complete, but outside the run's directory
    (output_dir / "checkpoint-5").symlink_to(elsewhere, target_is_directory=True)
    chosen, warnings = resume_choice(output_dir)
    assert chosen == output_dir / "checkpoint-1"
    assert "checkpoint-5: it is a symbolic link" in warnings[0]


@pytest.mark.parametrize("name", ["checkpoint-abc", "checkpoint--3", "checkpoint-2.5", "Checkpoint-7", "checkpoint-",
                                  "checkpoint-٣"])
def test_names_that_are_not_checkpoint_steps_are_ignored(output_dir, name):
    make_checkpoint(output_dir, 2, name=name, mark=False)
    chosen, warnings = resume_choice(output_dir)
    assert chosen == output_dir / "checkpoint-1" and warnings == []


def test_a_huge_step_holding_another_steps_checkpoint_is_skipped(output_dir):
    huge = "9" * 40  # beyond any integer type a C reader would use; Python reads it exactly
    copy = make_checkpoint(output_dir, 1, name=f"checkpoint-{huge}")
    chosen, warnings = resume_choice(output_dir)
    assert chosen == output_dir / "checkpoint-1"
    assert f"{copy}: its {MARKER} was written for step 1, not {huge}" in warnings[0]


def test_a_trainer_state_that_is_not_json_is_skipped(output_dir):
    checkpoint = make_checkpoint(output_dir, 2)
    state = checkpoint / "trainer_state.json"
    state.write_bytes(b"\x00" * state.stat().st_size)  # same size as marked: only the content check sees it
    chosen, warnings = resume_choice(output_dir)
    assert chosen == output_dir / "checkpoint-1"
    assert "its trainer_state.json cannot be read as JSON" in warnings[0]


def test_a_trainer_state_at_another_step_is_skipped(output_dir):
    checkpoint = make_checkpoint(output_dir, 3)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 1}).ljust(
        (checkpoint / "trainer_state.json").stat().st_size))
    chosen, warnings = resume_choice(output_dir)
    assert chosen == output_dir / "checkpoint-1" and "its trainer_state.json is at step 1, not 3" in warnings[0]


@pytest.mark.parametrize("marker", [b"{not json", b"[]", b'{"format": 1, "step": 2, "files": {"x": -1}}',
                                    b'{"format": 99, "step": 2, "files": {}}', b"\xff\xfe garbage"])
def test_a_marker_that_is_not_a_turnwise_marker_is_skipped(output_dir, marker):
    checkpoint = make_checkpoint(output_dir, 2)
    (checkpoint / MARKER).write_bytes(marker)
    chosen, warnings = resume_choice(output_dir)
    assert chosen == output_dir / "checkpoint-1"
    assert MARKER in warnings[0] and "checkpoint-2" in warnings[0]


@pytest.mark.parametrize("listed", ["../checkpoint-1/optimizer.pt", "/etc/passwd", ""])
def test_a_marker_naming_paths_outside_the_checkpoint_is_skipped(output_dir, listed):
    checkpoint = make_checkpoint(output_dir, 2)
    record = json.loads((checkpoint / MARKER).read_text())
    record["files"][listed] = 10
    (checkpoint / MARKER).write_text(json.dumps(record))
    chosen, warnings = resume_choice(output_dir)
    assert chosen == output_dir / "checkpoint-1"
    assert "which is not a path inside the checkpoint" in warnings[0]


def test_a_file_swapped_for_a_symlink_after_marking_is_skipped(output_dir, tmp_path):
    checkpoint = make_checkpoint(output_dir, 2)
    outside = tmp_path / "outside.pt"
    outside.write_bytes(os.urandom((checkpoint / "optimizer.pt").stat().st_size))
    (checkpoint / "optimizer.pt").unlink()
    (checkpoint / "optimizer.pt").symlink_to(outside)
    chosen, warnings = resume_choice(output_dir)
    assert chosen == output_dir / "checkpoint-1" and "optimizer.pt is missing (or is not a regular file)" in warnings[0]


def test_a_symlinked_subdirectory_named_by_the_marker_is_skipped(output_dir, tmp_path):
    checkpoint = make_checkpoint(output_dir, 2)
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "rank0.pt").write_bytes(b"x" * 8)
    (checkpoint / "global_step2").symlink_to(tmp_path / "shards", target_is_directory=True)
    record = json.loads((checkpoint / MARKER).read_text())
    record["files"]["global_step2/rank0.pt"] = 8
    (checkpoint / MARKER).write_text(json.dumps(record))
    chosen, warnings = resume_choice(output_dir)
    assert chosen == output_dir / "checkpoint-1" and "global_step2/rank0.pt resolves outside the checkpoint" in warnings[0]


def test_a_file_grown_after_marking_is_skipped(output_dir):
    checkpoint = make_checkpoint(output_dir, 2)
    with (checkpoint / "adapter_model.safetensors").open("ab") as f:
        f.write(b"appended")
    chosen, warnings = resume_choice(output_dir)
    assert chosen == output_dir / "checkpoint-1"
    assert "adapter_model.safetensors is 264 bytes, but 256 were written" in warnings[0]


def test_a_marked_checkpoint_without_any_optimizer_state_is_skipped(output_dir):
    make_checkpoint(output_dir, 2, optimizer=False)  # say, saved with save_only_model
    chosen, warnings = resume_choice(output_dir)
    assert chosen == output_dir / "checkpoint-1" and "it holds no optimizer state" in warnings[0]


def test_sharded_optimizer_state_counts_as_optimizer_state(tmp_path):
    """DeepSpeed and FSDP write the optimizer in shards, not optimizer.pt; such a checkpoint is complete."""
    for name, shard in (("deepspeed", "global_step4/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"),
                        ("fsdp", "optimizer_0/__0_0.distcp")):
        checkpoint = make_checkpoint(tmp_path / name, 4, optimizer=False, mark=False)
        (checkpoint / shard).parent.mkdir(parents=True)
        (checkpoint / shard).write_bytes(b"shard")
        write_marker(checkpoint, 4)
        assert checkpoint_problem(checkpoint) is None, name


def test_nothing_complete_means_no_resume_and_every_candidate_is_named(tmp_path):
    output_dir = tmp_path / "run"
    (output_dir / "checkpoint-2").mkdir(parents=True)
    make_checkpoint(output_dir, 1, mark=False)
    chosen, warnings = resume_choice(output_dir)
    assert chosen is None
    assert [w.split(":")[0] for w in warnings] == [f"not resuming from {output_dir / 'checkpoint-2'}",
                                                   f"not resuming from {output_dir / 'checkpoint-1'}"]
    assert resume_choice(tmp_path / "missing") == (None, [])
    (tmp_path / "a-file").write_text("")
    assert resume_choice(tmp_path / "a-file") == (None, [])


def test_a_value_head_from_another_hidden_size_is_refused_before_training(make_trainer, tmp_path):
    """A checkpoint whose value_head.pt was trained on a model with another hidden size: resuming says so
    when the state is loaded, naming both sizes, instead of failing inside the first batch."""
    from pipeline.training.advantages import GAE

    other = GAE()
    other.load_state_dict({"hidden_size": 32, "head": {"proj.weight": torch.zeros(1, 32), "proj.bias": torch.zeros(1)},
                           "optimizer": None})
    checkpoint = tmp_path / "checkpoint-1"
    checkpoint.mkdir()
    torch.save(other.state_dict(), checkpoint / "value_head.pt")
    trainer = make_trainer(advantage="gae")
    with pytest.raises(ValueError, match=r"value_head\.pt reads hidden size 32, but the policy's is 16"):
        trainer.load_estimator_state(checkpoint)


@pytest.mark.parametrize("content", [b"", b"not a torch file", json.dumps({"hidden_size": 16}).encode()])
def test_an_unreadable_or_malformed_value_head_is_a_clear_error(make_trainer, tmp_path, content):
    checkpoint = tmp_path / "checkpoint-1"
    checkpoint.mkdir()
    (checkpoint / "value_head.pt").write_bytes(content)
    trainer = make_trainer(advantage="gae")
    with pytest.raises(ValueError, match=r"value_head\.pt is not a gae estimator state .*resume from an earlier"):
        trainer.load_estimator_state(checkpoint)


def test_a_value_head_state_with_wrong_shapes_is_a_clear_error(make_trainer, tmp_path):
    checkpoint = tmp_path / "checkpoint-1"
    checkpoint.mkdir()
    torch.save({"hidden_size": 16, "head": {"proj.weight": torch.zeros(3, 5)}, "optimizer": None},
               checkpoint / "value_head.pt")
    with pytest.raises(ValueError, match=r"value_head\.pt is not a gae estimator state"):
        make_trainer(advantage="gae").load_estimator_state(checkpoint)


def test_the_marker_is_refused_when_it_is_a_directory_or_a_symlink(output_dir, tmp_path, caplog):
    checkpoint = make_checkpoint(output_dir, 2)
    (checkpoint / MARKER).unlink()
    (checkpoint / MARKER).mkdir()
    assert "it has no turnwise_checkpoint.json" in checkpoint_problem(checkpoint)
    (checkpoint / MARKER).rmdir()
    real = tmp_path / "marker.json"
    write_marker(checkpoint, 2)
    os.replace(checkpoint / MARKER, real)
    (checkpoint / MARKER).symlink_to(real)
    with caplog.at_level(logging.WARNING, logger="pipeline.training.checkpoints"):
        assert latest_complete_checkpoint(output_dir) == output_dir / "checkpoint-1"
    assert "checkpoint-2: it has no turnwise_checkpoint.json" in caplog.text
