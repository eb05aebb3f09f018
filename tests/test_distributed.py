"""Distributed training: 2-process CPU (gloo) runs under `accelerate launch`, and the shipped configs.

The runs are tests/distributed/grpo_run.py (a tiny GRPO run, shrunk as its docstring says), where rank 1
plays one turn more than rank 0. Both ranks must end with identical, changed adapter weights even though
each played different episodes:

- DDP all-reduces the LoRA gradients;
- DeepSpeed ZeRO-3 shards the parameters: the rollouts run with them gathered, or the ranks' different
  numbers of forward passes would leave their collectives out of step; with ``advantage=gae`` the value
  head's gradients are all-reduced too, so both ranks end with the same critic.

FSDP cannot run on CPU through accelerate 1.15: it turns FSDP on only when the process group is on an
accelerator (``accelerate/state.py``: a CPU group stays ``MULTI_CPU``, i.e. DDP, so
configs/accelerate/fsdp.yaml on CPU processes trains without sharding). FSDP2's gathering context is tested
with torch's own ``fully_shard`` on CPU below (tests/distributed/fsdp2_generate.py), and through accelerate on
one GPU by benchmarks/gpu_check.py (benchmarks/results/gpu_check_h200.json).
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(launcher: list[str], script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", *launcher, str(REPO / "tests" / "distributed" / script), *args]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    return run


def ranks(out_dir: Path) -> list[dict]:
    return [torch.load(out_dir / f"rank{r}.pt") for r in (0, 1)]


def assert_identical_and_trained(results: list[dict]) -> None:
    assert all(r["world_size"] == 2 and r["backend"] == "gloo" and r["steps"] == 2 for r in results)
    assert results[0]["task_ids"] != results[1]["task_ids"]  # each rank played its own episodes
    a, b = results[0]["after"], results[1]["after"]
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert any(not torch.equal(results[0]["before"][n], a[n]) for n in a if "lora_B" in n)  # and they trained


def test_two_process_gloo_run_ends_with_identical_weights(tiny_model_dir, tmp_path):
    # --multi_gpu selects the torchrun launcher (2 processes); with no GPU, each process sets up gloo on CPU
    # (accelerate's --cpu launcher would need MPI for more than one process).
    launch(["accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())],
           "grpo_run.py", str(tiny_model_dir), str(tmp_path))
    assert_identical_and_trained(ranks(tmp_path))


def test_zero3_run_gathers_for_rollouts_and_keeps_the_critic_in_step(tiny_model_dir, tmp_path):
    """configs/accelerate/zero3.yaml on 2 CPU processes, with the gae critic: the ranks play 2 and 3 turns, so
    their rollouts run different numbers of forward passes, and still end with the same LoRA weights and the
    same (trained) value head."""
    pytest.importorskip("deepspeed", reason="the dev extra installs deepspeed (pip install -e '.[dev]')")
    launch(["accelerate.commands.launch", "--config_file", str(REPO / "configs" / "accelerate" / "zero3.yaml"),
            "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(free_port())],
           "grpo_run.py", str(tiny_model_dir), str(tmp_path), "gae")
    results = ranks(tmp_path)
    assert [r["distributed_type"] for r in results] == ["DistributedType.DEEPSPEED"] * 2
    assert [r["zero_stage"] for r in results] == [3, 3]
    assert [r["turns"] for r in results] == [[2], [3]]  # uneven rollouts, as the docstring says
    assert_identical_and_trained(results)
    heads = [r["value_head"] for r in results]
    assert heads[0].keys() == heads[1].keys() and all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])
    assert any(v.abs().sum() > 0 for v in heads[0].values())  # the head starts at zero: it was trained


def test_fsdp2_generation_context_lets_ranks_run_different_numbers_of_forward_passes(tiny_model_dir, tmp_path):
    """torch's FSDP2 on 2 CPU processes (gloo): inside fsdp2_unsharded, rank r generates 1 + 2r turns with the
    HF backend, each rank's logits equal those of an unsharded copy of the model, and afterwards the
    parameters are sharded again."""
    launch(["torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())],
           "fsdp2_generate.py", str(tiny_model_dir), str(tmp_path))
    results = ranks(tmp_path)
    assert [r["turns"] for r in results] == [1, 3]
    for r in results:
        assert r["max_logit_difference"] < 1e-5 and r["sharded_after"] and r["full_inside"]


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
    if kind == "FSDP":  # FSDP1 cannot hold parameters gathered through a multi-turn rollout
        assert config.fsdp_config["fsdp_version"] == 2


def test_fsdp1_and_ungathered_zero3_are_refused_for_hf_rollouts_before_the_model_loads(monkeypatch):
    from trl import GRPOConfig

    from pipeline.training import RolloutConfig
    from pipeline.training.config import check_run_config

    args = GRPOConfig(output_dir="unused", per_device_train_batch_size=2, num_generations=2, report_to=[],
                      use_cpu=True, bf16=False)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ValueError, match=r"FSDP1 .* Set fsdp_version: 2 in the accelerate config"):
        check_run_config(RolloutConfig(), args)
    monkeypatch.setenv("FSDP_VERSION", "2")
    check_run_config(RolloutConfig(), args)  # FSDP2: gathered by fsdp2_unsharded
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    args.ds3_gather_for_generation = False
    with pytest.raises(ValueError, match=r"ds3_gather_for_generation=False under DeepSpeed ZeRO-3"):
        check_run_config(RolloutConfig(), args, zero_stage=3)


@pytest.mark.parametrize("per_device, accumulation, generations, fits", [
    (2, 1, 2, True), (4, 1, 8, False), (4, 2, 8, True), (3, 1, 2, False), (16, 8, 8, True)])
def test_each_process_must_get_whole_groups(per_device, accumulation, generations, fits):
    """Each process computes advantages from its own episodes, so per_device_train_batch_size x
    gradient_accumulation_steps must hold whole groups of num_generations episodes."""
    from types import SimpleNamespace

    from pipeline.training import RolloutConfig
    from pipeline.training.sharding import check_parallel_config

    args = SimpleNamespace(per_device_train_batch_size=per_device, gradient_accumulation_steps=accumulation,
                           steps_per_generation=None, num_generations=generations, use_vllm=False)
    if fits:
        check_parallel_config(args, RolloutConfig(), zero_stage=0)
        return
    with pytest.raises(ValueError, match=rf"per_device_train_batch_size \({per_device}\) x steps_per_generation "
                                         rf"\({accumulation}; .* not a multiple of num_generations \({generations}\)"):
        check_parallel_config(args, RolloutConfig(), zero_stage=0)
