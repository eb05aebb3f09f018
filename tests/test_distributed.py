"""Distributed training: a 2-process CPU run (gloo) under `accelerate launch`, and the shipped configs.

The run is tests/distributed/grpo_run.py (a tiny GRPO run, shrunk as its docstring says). DDP all-reduces
the LoRA gradients, so both ranks must end with identical adapter weights even though each rank played
different episodes.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def test_two_process_gloo_run_ends_with_identical_weights(tiny_model_dir, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    # --multi_gpu selects the torchrun launcher (2 processes); with no GPU, each process sets up gloo on CPU
    # (accelerate's --cpu launcher would need MPI for more than one process).
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(port), str(REPO / "tests" / "distributed" / "grpo_run.py"),
               str(tiny_model_dir), str(tmp_path)]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert all(r["world_size"] == 2 and r["backend"] == "gloo" and r["steps"] == 2 for r in ranks)
    assert ranks[0]["task_ids"] != ranks[1]["task_ids"]  # each rank played its own episodes
    a, b = ranks[0]["after"], ranks[1]["after"]
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert any(not torch.equal(ranks[0]["before"][n], a[n]) for n in a if "lora_B" in n)  # and they trained


@pytest.mark.parametrize("name, kind", [("ddp", "MULTI_GPU"), ("zero2", "DEEPSPEED"), ("zero3", "DEEPSPEED"),
                                        ("fsdp", "FSDP")])
def test_accelerate_configs_load(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    path = REPO / "configs" / "accelerate" / f"{name}.yaml"
    assert path.read_text().startswith(f"# accelerate launch --config_file configs/accelerate/{name}.yaml")
    config = load_config_from_file(str(path))
    assert config.distributed_type.value == kind
    if kind == "DEEPSPEED":
        assert config.deepspeed_config["zero_stage"] == int(name[-1])
