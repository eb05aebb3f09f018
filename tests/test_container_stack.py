"""The job as a SageMaker training image would run it: the image's torch and Python, requirements.txt
installed over the image's packages the way the toolkit installs it, and the real toolkit.

The development venv runs torch 2.13 on Python 3.11, which says nothing about a job on a DLC. This test
runs on the environment `.ci/container_env.py` builds for each image of `pipeline.sagemaker.DLC_IMAGES`
(cached under ``~/.cache/turnwise/container-env``; `make test` builds it first). In it, the real
``sagemaker-training`` toolkit runs ``sagemaker_entry/train.py`` from the real source bundle on a fake
``/opt/ml`` for one GRPO step, then ``sagemaker_entry/evaluate.py`` on the adapter it wrote. On the way:

- a secret named by the job's environment (``TURNWISE_SECRET_HF_TOKEN``) is read from Secrets Manager
  (moto, in server mode) before anything loads a model, and its value appears nowhere in the logs;
- the trainer reports to MLflow (``report_to mlflow``), here to a local file store, with the experiment and
  run name the request sets, and an ARN tracking URI resolves to the sagemaker-mlflow plugin's store.

This is the test that fails when a job would die at start-up: point it at the torch 2.5.1 image with
``TURNWISE_CONTAINER_IMAGE=2.5.1-transformers4.49.0-gpu-py311-cu124-ubuntu22.04`` (after building that
environment with ``python .ci/container_env.py build --image ...``). Shrunk settings, as in
tests/test_sagemaker_entry.py: the demo recipe on the 2-layer tiny model as the ``model`` channel, 1 task x
2 generations, 2 turns of at most 4 new tokens, 1 step; evaluation on 1 test task, 1 turn.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import uuid
import warnings
from pathlib import Path

import pytest

from pipeline.sagemaker import DLC_IMAGES, make_bundle, parse_metrics

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("container_env", REPO / ".ci" / "container_env.py")
container_env = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(container_env)

IMAGES = [os.environ["TURNWISE_CONTAINER_IMAGE"]] if os.environ.get("TURNWISE_CONTAINER_IMAGE") else sorted(DLC_IMAGES)
TRAIN = {
    "config": "configs/grpo_cpu_quick.yaml",  # the demo recipe; every value below shrinks it
    # 1 task; validate on 1 task once training ends (val_every past max_steps: a validation inside a step
    # logs before the trainer does, and that step's `loss` line is then not printed)
    "train_limit": 1, "val_limit": 1, "val_every": 2,
    "max_turns": 2, "max_new_tokens": 4,  # 2 assistant turns of at most 4 tokens
    "max_total_tokens": 8000,  # the byte-level tiny tokenizer spends one token per byte of the system prompt
    "num_generations": 2, "per_device_train_batch_size": 2,  # 1 task x 2 generations per step
    "max_steps": 1, "save_steps": 1,
    "report_to": "mlflow", "run_name": "container-stack",  # as submit(mlflow_arn=...) sets them
}
EVALUATE = {"limit": 1, "max_turns": 1, "max_new_tokens": 4, "tasks": "test"}


def built_environment(name: str) -> tuple[Path, dict]:
    image = container_env.image_for(name)
    path = container_env.env_dir(image)
    if not (path / ".complete").exists():
        message = (f"The container-stack environment for {image.tag} is not built ({path}). Build it with "
                   f"`make container-env` or `python .ci/container_env.py build --image {name}`.")
        if os.environ.get("CI"):
            pytest.fail(message)  # CI builds it first (`make test`): a missing one is a broken build, not a skip
        pytest.skip(message)
    return path, json.loads((path / "stack.json").read_text())


def _text(path: Path) -> str:
    return path.read_text() if path.is_file() else ""


def opt_ml(base: Path, bundle: Path, program: str, hyperparameters: dict, channels: dict[str, Path]) -> None:
    config = base / "input" / "config"
    config.mkdir(parents=True, exist_ok=True)
    (base / "output" / "data").mkdir(parents=True, exist_ok=True)
    hps = {**hyperparameters, "sagemaker_program": program, "sagemaker_submit_directory": str(bundle),
           "sagemaker_container_log_level": 20}
    (config / "hyperparameters.json").write_text(json.dumps({k: json.dumps(v) for k, v in hps.items()}))
    (config / "resourceconfig.json").write_text(json.dumps(
        {"current_host": "algo-1", "hosts": ["algo-1"], "network_interface_name": "eth0"}))
    (config / "inputdataconfig.json").write_text(json.dumps(
        {name: {"TrainingInputMode": "File", "S3DistributionType": "FullyReplicated", "RecordWrapperType": "None"}
         for name in channels}))
    for name, source in channels.items():
        shutil.copytree(source, base / "input" / "data" / name)


def toolkit(python: Path, base: Path, environ: dict[str, str]) -> subprocess.CompletedProcess:
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON", "TURNWISE_SECRET"))}
    env = {**keep, **environ, "SAGEMAKER_BASE_DIR": str(base), "SM_STUDIO_LOCAL_MODE": "true",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
           "PATH": f"{python.parent}:{os.environ.get('PATH', '')}"}
    return subprocess.run([str(python), "-c", "from sagemaker_training.cli.train import main; main()"], env=env,
                          capture_output=True, text=True, timeout=1500, cwd=base)


@pytest.fixture
def secrets_manager(monkeypatch):
    """A moto server holding the job's HF token; returns (endpoint, secret name, token)."""
    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    token = "hf_" + "".join(["Cs7Kq2Wx9P", "m4Rt8Ln3Vb", "6Hy1Zd5Fg0", "Jc2E"])
    name = f"turnwise/container-stack-{uuid.uuid4().hex[:8]}"  # unique: moto's backends outlive one server
    boto3.client("secretsmanager", region_name="us-east-1", endpoint_url=endpoint, aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_secret(Name=name, SecretString=token)
    yield endpoint, name, token
    server.stop()


@pytest.mark.timeout(3000)
@pytest.mark.parametrize("name", IMAGES)
def test_toolkit_trains_and_evaluates_on_the_image_stack(name, tmp_path, tiny_model_dir, secrets_manager):
    env_path, stack = built_environment(name)
    image = container_env.image_for(name)
    python = env_path / "bin" / "python"
    if stack["python_fallback"]:  # said, not hidden: the run is on this machine's Python instead
        warnings.warn(f"Python {image.python} (the image's) is not on this machine; the container stack for "
                      f"{image.tag} was built on Python {stack['python']}.")
    else:
        assert stack["python"].startswith(image.python + ".")
    probe = subprocess.run([str(python), "-c", "import torch, sys; print(torch.__version__, sys.version.split()[0])"],
                           capture_output=True, text=True)
    assert probe.stdout.split()[0].split("+")[0] == image.torch, probe.stdout + probe.stderr  # pip kept the image's torch

    endpoint, secret_name, token = secrets_manager
    bundle = make_bundle(tmp_path / "src" / "sourcedir.tar.gz").path
    mlruns = tmp_path / "mlruns"
    job_environment = {  # what submit(secrets=..., mlflow_arn=...) puts in the job's Environment
        "TURNWISE_SECRET_HF_TOKEN": secret_name, "TURNWISE_SECRETS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        "MLFLOW_TRACKING_URI": mlruns.as_uri(), "MLFLOW_EXPERIMENT_NAME": "support-agents",
        "MLFLOW_ALLOW_FILE_STORE": "true",  # a local stand-in for the managed server
        "HF_HUB_OFFLINE": "1"}

    train_base = tmp_path / "train" / "opt_ml"
    opt_ml(train_base, bundle, "sagemaker_entry/train.py", TRAIN,
           {"train": REPO / "data" / "customer_service" / "tasks", "model": tiny_model_dir})
    trained = toolkit(python, train_base, job_environment)
    log = trained.stdout + trained.stderr
    (tmp_path / "train.log").write_text(log)
    assert trained.returncode == 0, log[-6000:]
    assert (train_base / "output" / "success").exists()
    assert "HF_TOKEN: set from Secrets Manager" in log and token not in log
    assert (train_base / "model" / "adapter" / "adapter_model.safetensors").exists()
    assert json.loads((train_base / "model" / "train_result.json").read_text())["steps"] == 1
    metrics = parse_metrics(log.splitlines())  # the job's metric definitions on what the container printed
    assert {"loss", "rollout/reward/mean", "val/success"} <= set(metrics), sorted(metrics)

    # The trainer's run: in the request's experiment, under the request's run name, with the charted metrics.
    runs = [p for p in mlruns.glob("*/*") if "run_name: container-stack" in _text(p / "meta.yaml")]
    assert len(runs) == 1, [str(p) for p in mlruns.rglob("meta.yaml")]
    assert "name: support-agents" in (runs[0].parent / "meta.yaml").read_text()
    assert (runs[0] / "metrics" / "loss").exists() and (runs[0] / "metrics" / "rollout" / "reward" / "mean").exists()
    plugin = subprocess.run([str(python), "-c", "from mlflow.tracking._tracking_service.utils import _get_store; "
                             "print(type(_get_store('arn:aws:sagemaker:us-east-1:123456789012:"
                             "mlflow-tracking-server/support')).__name__)"], capture_output=True, text=True)
    assert plugin.stdout.strip() == "MlflowSageMakerStore", plugin.stderr[-2000:]

    eval_base = tmp_path / "eval" / "opt_ml"
    opt_ml(eval_base, bundle, "sagemaker_entry/evaluate.py", EVALUATE, {"model": train_base / "model"})
    evaluated = toolkit(python, eval_base, job_environment)
    eval_log = evaluated.stdout + evaluated.stderr
    (tmp_path / "evaluate.log").write_text(eval_log)
    assert evaluated.returncode == 0, eval_log[-6000:]
    report = json.loads((eval_base / "model" / "eval" / "report.json").read_text())
    assert report["policies"][0]["metrics"]["n_tasks"] == 1
    assert (eval_base / "output" / "data" / "eval" / "report.md").exists()
    assert token not in eval_log
