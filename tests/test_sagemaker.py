"""pipeline/sagemaker.py and ``turnwise sagemaker``: requests, validation, secrets, and a job against moto.

moto runs in server mode (`ThreadedMotoServer`), so boto3 makes real HTTP calls and botocore validates
every request against the service model before sending it. moto does not run containers, so a small
fake platform (`FakePlatform`) plays SageMaker's part behind it: a new job goes Starting -> Training ->
Completed over successive DescribeTrainingJob calls, writes trainer-format log lines to CloudWatch and puts
a model.tar.gz (a LoRA adapter of the tiny test model) where SageMaker would.
"""

from __future__ import annotations

import io
import json
import logging
import socket
import tarfile
import uuid
from pathlib import Path

import pytest

from pipeline.cli import main as turnwise
from pipeline.sagemaker import (SubmitConfig, TrainingJob, build_request, image_uri, make_bundle, metric_definitions,
                                parse_metrics, submit, validate_request)

REPO = Path(__file__).resolve().parents[1]
ROLE = "arn:aws:iam::123456789012:role/SageMakerExecutionRole"
RECIPE = str(REPO / "configs" / "grpo_cpu_quick.yaml")
REGION = "us-east-1"
# Built at run time so that this file itself holds no key-shaped string.
PLANTED_KEY_ID = "AKIA" + "TURNWISETESTKEY1"
PLANTED_SECRET = "".join(["wJalrXUtnFEMI/K7MDENG/", "bPxRfiCYPLANTEDSECRET"])
LOG_LINES = [
    "Invoking script with the following command: /usr/bin/python3 sagemaker_entry/train.py --config ...",
    "{'loss': '0.0123', 'grad_norm': '0.51', 'learning_rate': '2e-05', 'rollout/reward/mean': '0.25', "
    "'rollout/success': '0', 'rollout/turns/mean': '5.5', 'epoch': '0.5'}",
    "{'loss': '-0.004', 'rollout/reward/mean': '0.4375', 'rollout/success': '0.25', 'epoch': '1'}",
    "{'val/success': '0.5', 'val/pass@1': '0.5', 'val/completion': '1', 'val/reward/mean': '0.3125', 'epoch': '1'}",
]
# What the trainer prints at a validation step, as the progress bar writes it into CloudWatch (a tqdm
# carriage return and the bar before the dict), with a value-head loss that must not count as `loss`.
REALISTIC = ("\r 40%|####      | 2/5 [00:31<00:46, 15.6s/it]{'loss': '-0.01174', 'grad_norm': '0.8125', "
             "'learning_rate': '1e-05', 'value/loss': '0.25', 'rollout/reward/mean': '0.5312', 'val/success': '0.375', "
             "'val/reward/mean': '0.4062', 'val/pass@1': '0.375', 'entropy': '1.2e-01', 'epoch': '0.4'}")


def test_image_uri_table_and_override():
    assert image_uri("us-west-2", "5.3").startswith("763104351884.dkr.ecr.us-west-2.amazonaws.com/huggingface-pytorch")
    assert ".amazonaws.com.cn/" in image_uri("cn-north-1")
    with pytest.raises(ValueError, match="pass image_uri"):
        image_uri("mars-north-1")
    config = SubmitConfig(config=RECIPE, role=ROLE, bucket="b-1", image_uri="my.registry/img:1", job_name="j")
    assert build_request(config, REGION, "s3://b-1/s.tar.gz", {})["AlgorithmSpecification"]["TrainingImage"] == \
        "my.registry/img:1"


def test_metric_regexes_match_trainer_log_lines():
    metrics = parse_metrics(LOG_LINES)
    assert metrics["rollout/reward/mean"] == [0.25, 0.4375] and metrics["val/reward/mean"] == [0.3125]
    realistic = parse_metrics([REALISTIC])
    assert realistic["loss"] == [-0.01174] and realistic["val/reward/mean"] == [0.4062]
    assert realistic["rollout/reward/mean"] == [0.5312] and realistic["val/success"] == [0.375]
    names = {d["Name"] for d in metric_definitions()}
    assert {"loss", "val/reward/mean"} <= names
    assert metrics["rollout/success"] == [0.0, 0.25] and metrics["val/success"] == [0.5]
    assert metrics["loss"] == [0.0123, -0.004] and "learning_rate" not in metrics
    assert all(len(d["Regex"]) <= 500 for d in metric_definitions())


def test_dry_run_prints_a_request_botocore_accepts(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    status = turnwise(["sagemaker", "submit", "--config", RECIPE, "--role", ROLE, "--bucket", "my-bucket",
                       "--job-name", "turnwise-dry-run", "--spot", "--max-runtime", "3600", "--instance-count", "2",
                       "--train", str(REPO / "data" / "customer_service" / "tasks"), "--model", "s3://my-bucket/base",
                       "-H", "max_steps=50", "--tag", "team=support", "--subnet", "subnet-0abc",
                       "--security-group", "sg-0abc", "--kms-key", "alias/turnwise", "--network-isolation",
                       "--dry-run"])
    out = capsys.readouterr()
    assert status == 0, out.err
    request = json.loads(out.out)
    validate_request(request)  # botocore's ParamValidator against the SageMaker service model
    assert request["EnableManagedSpotTraining"] and request["StoppingCondition"] == {
        "MaxRuntimeInSeconds": 3600, "MaxWaitTimeInSeconds": 7200}
    assert request["CheckpointConfig"]["S3Uri"] == "s3://my-bucket/turnwise/turnwise-dry-run/checkpoints"
    hps = {k: json.loads(v) for k, v in request["HyperParameters"].items()}
    assert hps["config"] == "configs/grpo_cpu_quick.yaml" and hps["max_steps"] == "50"
    assert hps["num_generations"] == 4 and "model_name_or_path" not in hps  # the model channel is the base
    assert hps["sagemaker_program"] == "sagemaker_entry/train.py" and hps["sagemaker_torch_distributed_enabled"]
    channels = {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"] for c in request["InputDataConfig"]}
    assert channels == {"train": "s3://my-bucket/turnwise/turnwise-dry-run/input/train", "model": "s3://my-bucket/base"}
    assert request["VpcConfig"]["Subnets"] == ["subnet-0abc"] and request["EnableNetworkIsolation"]
    assert request["OutputDataConfig"]["KmsKeyId"] == "alias/turnwise"
    assert {m["Name"] for m in request["AlgorithmSpecification"]["MetricDefinitions"]} >= {
        "rollout/reward/mean", "rollout/success", "val/success"}


@pytest.mark.parametrize("recipe", sorted((REPO / "configs" / "sagemaker").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_dry_runs_on_an_image_the_stack_accepts(recipe, capsys, monkeypatch):
    """Each shipped SageMaker recipe submits as it is (no vLLM keys on images without vLLM): the request passes
    botocore's validator and names a table image whose torch and Python are at or above the stack's floors."""
    from pipeline.sagemaker import DLC_IMAGES, STACK_FLOORS, _version_tuple

    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    status = turnwise(["sagemaker", "submit", "--config", str(recipe), "--role", ROLE, "--bucket", "my-bucket",
                       "--job-name", "turnwise-recipe", "--dry-run"])
    out = capsys.readouterr()
    assert status == 0, out.err
    request = json.loads(out.out)
    validate_request(request)
    tag = request["AlgorithmSpecification"]["TrainingImage"].rsplit(":", 1)[1]
    image = next(i for i in DLC_IMAGES.values() if i.tag == tag)
    assert _version_tuple(image.torch) >= _version_tuple(STACK_FLOORS["torch"])
    assert _version_tuple(image.python) >= _version_tuple(STACK_FLOORS["python"])


def test_use_vllm_without_an_image_that_has_it_is_refused_before_anything_is_sent(capsys, monkeypatch):
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    status = turnwise(["sagemaker", "submit", "--config", "configs/sagemaker/grpo_qwen2.5_0.5b.yaml", "--role", ROLE,
                       "--bucket", "my-bucket", "-H", "use_vllm=true", "-H", "backend=vllm", "--dry-run"])
    out = capsys.readouterr()
    assert status == 1 and out.out == ""
    assert "use_vllm: true needs an image that carries vLLM" in out.err and "--image-uri" in out.err


@pytest.mark.parametrize("change, message", [
    ({"role": "SageMakerRole"}, "is not an IAM role ARN"),
    ({"bucket": "s3://my-bucket"}, "takes a bucket name, not a URI"),
    ({"bucket": "My_Bucket"}, "is not a valid S3 bucket name"),
    ({"instance_type": "g5.2xlarge"}, "note the 'ml.' prefix"),
    ({"instance_count": 0}, "positive integer"),
    ({"checkpoint_s3_uri": "bucket/ckpt"}, "is not an S3 URI"),
    ({"inputs": {"train": "/no/such/dir"}}, "does not exist"),
    ({"inputs": {"train": "s3:/typo"}}, "is not an S3 URI"),
    ({"spot": True, "max_runtime_s": 100, "max_wait_s": 50}, "must be at least max_runtime_s"),
    ({"max_wait_s": 50}, "managed spot training only"),
    ({"subnets": ["subnet-1"]}, "needs both subnets and security_group_ids"),
])
def test_bad_submissions_fail_before_anything_is_sent(change, message):
    with pytest.raises((ValueError, OSError), match=message):
        SubmitConfig(**{"config": RECIPE, "role": ROLE, "bucket": "my-bucket", **change})


# -- against moto ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter_tarball(tiny_model_dir, tmp_path_factory) -> bytes:
    """model.tar.gz as a training job leaves it: adapter/ (LoRA + tokenizer) and train_result.json."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("job-model")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(out / "adapter")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out / "adapter")
    (out / "train_result.json").write_text(json.dumps({"steps": 2, "adapter": "adapter"}))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(out / "adapter", arcname="adapter")
        tar.add(out / "train_result.json", arcname="train_result.json")
    return buffer.getvalue()


class FakePlatform:
    """SageMaker's side of a job behind moto: status transitions, CloudWatch logs, model.tar.gz."""

    def __init__(self, endpoint: str, model_tarball: bytes) -> None:
        self.endpoint, self.model_tarball = endpoint, model_tarball
        self.describes: dict[str, int] = {}

    def client(self, service: str):
        import boto3

        return boto3.client(service, region_name=REGION, endpoint_url=self.endpoint)

    def advance(self, job) -> None:
        from datetime import datetime, timezone

        n = self.describes[job.training_job_name] = self.describes.get(job.training_job_name, 0) + 1
        stages = [("InProgress", "Starting", "Preparing the instances for training"),
                  ("InProgress", "Training", "Training image download completed. Training in progress."),
                  ("Completed", "Completed", "Training job completed")]
        status, secondary, message = stages[min(n, len(stages)) - 1]
        now = datetime.now(timezone.utc)
        job.training_job_status, job.secondary_status = status, secondary
        job.secondary_status_transitions = [{"Status": secondary, "StartTime": now, "StatusMessage": message}]
        if n == 2:  # the container ran: its stdout reached CloudWatch, its model dir reached S3
            logs = self.client("logs")
            group = "/aws/sagemaker/TrainingJobs"
            if group not in [g["logGroupName"] for g in logs.describe_log_groups()["logGroups"]]:
                logs.create_log_group(logGroupName=group)
            stream = f"{job.training_job_name}/algo-1-1700000000"
            logs.create_log_stream(logGroupName=group, logStreamName=stream)
            stamp = int(now.timestamp() * 1000)
            logs.put_log_events(logGroupName=group, logStreamName=stream, logEvents=[
                {"timestamp": stamp + i, "message": line} for i, line in enumerate(LOG_LINES)])
            bucket, _, key = job.model_artifacts["S3ModelArtifacts"][5:].partition("/")
            self.client("s3").put_object(Bucket=bucket, Key=key, Body=self.model_tarball)


@pytest.fixture
def moto_aws(monkeypatch, adapter_tarball):
    """A moto server on a free port; boto3 pointed at it (AWS_ENDPOINT_URL) with throwaway credentials."""
    from moto.sagemaker.models import SageMakerModelBackend
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for name, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": PLANTED_KEY_ID,
                        "AWS_SECRET_ACCESS_KEY": PLANTED_SECRET, "AWS_DEFAULT_REGION": REGION}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    platform = FakePlatform(endpoint, adapter_tarball)
    original = SageMakerModelBackend.describe_training_job

    def describe(self, training_job_name):
        if training_job_name in self.training_jobs:
            platform.advance(self.training_jobs[training_job_name])
        return original(self, training_job_name)

    monkeypatch.setattr(SageMakerModelBackend, "describe_training_job", describe)
    platform.client("s3").create_bucket(Bucket="turnwise-test")
    yield platform
    server.stop()


def bundle_members(platform, job_name: str) -> dict[str, bytes]:
    body = platform.client("s3").get_object(
        Bucket="turnwise-test", Key=f"turnwise/{job_name}/source/sourcedir.tar.gz")["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def test_submit_wait_logs_metrics_download_against_moto(moto_aws, tmp_path, tiny_model_dir):
    config = SubmitConfig(config=RECIPE, role=ROLE, bucket="turnwise-test", job_name="turnwise-moto-1", spot=True,
                          inputs={"train": str(REPO / "data" / "customer_service" / "tasks")},
                          hyperparameters={"max_steps": "2"}, tags={"team": "support"})
    job = submit(config)
    assert isinstance(job, TrainingJob) and job.name == "turnwise-moto-1"

    described = job.describe()  # what moto stored is what was sent
    assert described["RoleArn"] == ROLE and described["EnableManagedSpotTraining"]
    assert json.loads(described["HyperParameters"]["max_steps"]) == "2"
    assert described["CheckpointConfig"]["S3Uri"] == "s3://turnwise-test/turnwise/turnwise-moto-1/checkpoints"
    s3 = moto_aws.client("s3")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="turnwise-test")["Contents"]]
    assert "turnwise/turnwise-moto-1/input/train/train.jsonl" in keys
    members = bundle_members(moto_aws, "turnwise-moto-1")
    assert {"sagemaker_entry/train.py", "requirements.txt", "configs/grpo_cpu_quick.yaml",
            "pipeline/training/train.py"} <= set(members)
    assert not any(name.startswith((".git/", ".venv/")) or "__pycache__" in name for name in members)

    seen = []
    final = job.wait(poll_s=0.01, on_progress=lambda d: seen.append(d["SecondaryStatus"]))
    assert final["TrainingJobStatus"] == "Completed" and seen == ["Training", "Completed"]
    assert job.status() == "Completed"
    assert list(job.logs()) == LOG_LINES
    assert job.metrics()["rollout/reward/mean"] == [0.25, 0.4375]
    out = job.download(tmp_path / "jobs")
    assert out == tmp_path / "jobs" / "turnwise-moto-1"
    assert (out / "adapter" / "adapter_model.safetensors").exists()

    # The downloaded adapter loads (base model merged in) for `turnwise eval`.
    from pipeline.models import load_model

    model, tokenizer = load_model(str(out / "adapter"))
    assert type(model).__name__ == "LlamaForCausalLM" and tokenizer.padding_side == "left"


def test_cli_status_logs_download_against_moto(moto_aws, tmp_path, capsys):
    submit(SubmitConfig(config=RECIPE, role=ROLE, bucket="turnwise-test", job_name="turnwise-moto-2"))
    assert turnwise(["sagemaker", "wait", "turnwise-moto-2", "--poll", "0.01"]) == 0
    assert turnwise(["sagemaker", "status", "turnwise-moto-2"]) == 0
    assert turnwise(["sagemaker", "logs", "turnwise-moto-2"]) == 0
    assert turnwise(["sagemaker", "metrics", "turnwise-moto-2"]) == 0
    assert turnwise(["sagemaker", "download", "turnwise-moto-2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "turnwise-moto-2: Completed" in out and LOG_LINES[1] in out
    assert "rollout/reward/mean: last 0.4375" in out and (tmp_path / "turnwise-moto-2" / "adapter").is_dir()
    # moto does not implement StopTrainingJob: the error names the job and comes back as a clear CLI error
    assert turnwise(["sagemaker", "stop", "turnwise-moto-2"]) == 1
    assert "Cannot stop training job 'turnwise-moto-2'" in capsys.readouterr().err


# -- MLflow, the job's environment and secrets -------------------------------------------------------

MLFLOW_ARN = "arn:aws:sagemaker:us-east-1:123456789012:mlflow-tracking-server/support"
# Secret names (ids), not values; unique per session, because moto's backends outlive one moto server.
_RUN = uuid.uuid4().hex[:8]
HF_SECRET_ID, KEYS_SECRET_ID, PLAIN_SECRET_ID = (f"turnwise/{_RUN}/hf-token", f"turnwise/{_RUN}/keys",
                                                 f"turnwise/{_RUN}/plain")


def test_mlflow_env_and_secrets_reach_the_job_and_no_secret_value_does(moto_aws, tmp_path, capsys, caplog):
    """submit() sends MlflowConfig, the Environment (settings and secret ids) and report_to=mlflow, as botocore
    puts them on the wire; the container resolves the ids against Secrets Manager (moto); no secret value
    appears in the request, the bundle, the logs or anything printed."""
    import boto3

    from sagemaker_entry.environment import resolve_secrets

    token = "hf_" + "".join(["Zx9Yw8Vu7T", "s6Rq5Po4Nm", "3Lk2Jh1GfE", "dCbA"])
    api_key = "".join(["wandb", "0f1e2d3c4b5a69788796a5b4c3d2e1f0"])
    secrets = moto_aws.client("secretsmanager")
    secrets.create_secret(Name=HF_SECRET_ID, SecretString=token)
    secrets.create_secret(Name=KEYS_SECRET_ID, SecretString=json.dumps({"wandb": api_key}))
    session = boto3.session.Session(region_name=REGION)
    sent: list[bytes] = []
    session._session.register("before-send.sagemaker.CreateTrainingJob", lambda request, **_: sent.append(request.body))
    caplog.set_level(logging.DEBUG, logger="pipeline")
    config = SubmitConfig(config=RECIPE, role=ROLE, bucket="turnwise-test", job_name="turnwise-mlflow",
                          environment={"HF_HUB_ENABLE_HF_TRANSFER": "0"},
                          secrets={"HF_TOKEN": HF_SECRET_ID, "WANDB_API_KEY": f"{KEYS_SECRET_ID}#wandb"},
                          mlflow_arn=MLFLOW_ARN, mlflow_experiment="support-agents", mlflow_run="grpo-seed0")
    job = submit(config, session=session)
    body = json.loads(sent[0])
    validate_request(body)
    assert body["MlflowConfig"] == {"MlflowResourceArn": MLFLOW_ARN, "MlflowExperimentName": "support-agents",
                                    "MlflowRunName": "grpo-seed0"}
    assert body["Environment"] == {
        "HF_HUB_ENABLE_HF_TRANSFER": "0", "TURNWISE_SECRET_HF_TOKEN": HF_SECRET_ID,
        "TURNWISE_SECRET_WANDB_API_KEY": f"{KEYS_SECRET_ID}#wandb", "TURNWISE_SECRETS_REGION": REGION,
        "MLFLOW_TRACKING_URI": MLFLOW_ARN, "MLFLOW_EXPERIMENT_NAME": "support-agents"}
    hps = {k: json.loads(v) for k, v in body["HyperParameters"].items()}
    assert hps["report_to"] == "mlflow" and hps["run_name"] == "grpo-seed0"

    environ = dict(body["Environment"])  # the container starts with the job's environment
    assert resolve_secrets(environ) == ["HF_TOKEN", "WANDB_API_KEY"]
    assert environ["HF_TOKEN"] == token and environ["WANDB_API_KEY"] == api_key

    members = bundle_members(moto_aws, "turnwise-mlflow")
    printed = capsys.readouterr()
    everything = (b"".join(sent) + b"".join(members.values())).decode("utf-8", "replace") + printed.out + \
        printed.err + caplog.text + json.dumps(job.describe(), default=str)
    assert token not in everything and api_key not in everything


def test_secret_resolution_errors_name_the_secret_never_a_value(moto_aws):
    from sagemaker_entry.environment import resolve_secrets

    wanted, region = "TURNWISE_SECRET_HF_TOKEN", "TURNWISE_SECRETS_REGION"  # the job environment's names
    moto_aws.client("secretsmanager").create_secret(Name=PLAIN_SECRET_ID, SecretString="not-json-" + "v" * 20)
    with pytest.raises(RuntimeError, match="Cannot read Secrets Manager secret 'turnwise/missing' for HF_TOKEN.*"
                                           "secretsmanager:GetSecretValue"):
        resolve_secrets({wanted: "turnwise/missing", region: REGION})
    with pytest.raises(RuntimeError, match="not a JSON object with the key 'token'") as error:
        resolve_secrets({wanted: f"{PLAIN_SECRET_ID}#token", region: REGION})
    assert "v" * 20 not in str(error.value)
    launcher_value = "set by the launcher"
    already = {wanted: "turnwise/missing", "HF_TOKEN": launcher_value}  # a parent process resolved it
    assert resolve_secrets(already) == [] and already["HF_TOKEN"] == launcher_value


def test_cli_mlflow_env_secret_flags_dry_run(capsys, monkeypatch):
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    status = turnwise(["sagemaker", "submit", "--config", RECIPE, "--role", ROLE, "--bucket", "my-bucket",
                       "--job-name", "flags", "--env", "TOKENIZERS_PARALLELISM=false", "--secret", "HF_TOKEN=hf/token",
                       "--mlflow-arn", MLFLOW_ARN, "--mlflow-experiment", "exp", "--dry-run"])
    out = capsys.readouterr()
    assert status == 0, out.err
    request = json.loads(out.out)
    validate_request(request)
    assert request["Environment"]["TOKENIZERS_PARALLELISM"] == "false"
    assert request["Environment"]["TURNWISE_SECRET_HF_TOKEN"] == "hf/token" and "HF_TOKEN" not in request["Environment"]
    assert request["MlflowConfig"] == {"MlflowResourceArn": MLFLOW_ARN, "MlflowExperimentName": "exp",
                                       "MlflowRunName": "flags"}


@pytest.mark.parametrize("change, message", [
    ({"environment": {"HF_TOKEN": "x"}}, "Use --secret HF_TOKEN=SECRET_ID"),
    ({"environment": {"NOTE": "hf_" + "a1" * 17}}, "is a Hugging Face token"),
    ({"environment": {"1BAD": "x"}}, "name '1BAD' is invalid"),
    ({"environment": {"AWS_SECRET_ACCESS_KEY": "x"}}, "must not be set at all"),
    ({"secrets": {"HF_TOKEN": "hf_" + "b2" * 17}}, "a secret's value, not the name"),
    ({"secrets": {"HF_TOKEN": "bad name!"}}, "not a Secrets Manager secret name or ARN"),
    ({"secrets": {"HF_TOKEN": "s"}, "network_isolation": True}, "network isolation forbids"),
    ({"mlflow_arn": "arn:aws:sagemaker:us-east-1:123456789012:training-job/x"}, "not the ARN of a SageMaker-managed"),
    ({"mlflow_experiment": "e"}, "need --mlflow-arn"),
    ({"hyperparameters": {"hub_token": "abc"}}, "names a secret"),
    ({"hyperparameters": {"sagemaker_program": "evil.py"}}, "is reserved"),
    ({"tags": {f"k{i}": "v" for i in range(50)}}, "At most 49 tags"),
])
def test_environment_secret_and_mlflow_misuse_is_refused(change, message):
    with pytest.raises(ValueError, match=message):
        SubmitConfig(**{"config": RECIPE, "role": ROLE, "bucket": "my-bucket", **change})


# -- secrets --------------------------------------------------------------------------------------


def planted_tree(root: Path) -> Path:
    """A source tree with secrets planted where people leave them."""
    for rel in ("sagemaker_entry/train.py", "sagemaker_entry/requirements.txt", "pipeline/training/train.py"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(f"# {rel}\n")
    (root / ".env").write_text(f"AWS_ACCESS_KEY_ID={PLANTED_KEY_ID}\nAWS_SECRET_ACCESS_KEY={PLANTED_SECRET}\n")
    (root / "scripts").mkdir()
    (root / "scripts" / "deploy.py").write_text(f'KEY = "{PLANTED_KEY_ID}"  # someone pasted a key\n')
    (root / "aws_notes.cfg").write_text(f"[default]\naws_secret_access_key = {PLANTED_SECRET}\n")
    (root / "credentials").write_text("token\n")
    for rel in (".git/config", ".venv/bin/python", "outputs/run/adapter.bin", "pipeline/__pycache__/x.pyc"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x\n")
    return root


def test_source_bundle_leaves_out_secrets_and_never_prints_them(moto_aws, tmp_path, capsys, caplog):
    source = planted_tree(tmp_path / "src")
    bundle = make_bundle(tmp_path / "out" / "sourcedir.tar.gz", source)
    assert sorted(bundle.files) == ["pipeline/training/train.py", "requirements.txt", "sagemaker_entry/requirements.txt",
                                    "sagemaker_entry/train.py"]
    reasons = dict(bundle.excluded)
    assert reasons[".env"] == "secret file name" and reasons["credentials"] == "secret file name"
    assert reasons["scripts/deploy.py"] == "holds a credential: an AWS access key id on line 1"
    assert reasons["aws_notes.cfg"] == "holds a credential: a secret-like key with a literal value on line 2"
    assert {".git/", ".venv/", "outputs/", "pipeline/__pycache__/"} <= set(reasons)

    # Submitted for real (to moto): neither the .env file nor the key reaches S3, and neither is printed.
    # turnwise's own loggers at DEBUG (the CLI leaves botocore's at WARNING: its DEBUG log shows request headers)
    caplog.set_level(logging.DEBUG, logger="pipeline")
    config = SubmitConfig(config=RECIPE, role=ROLE, bucket="turnwise-test", job_name="turnwise-secrets",
                          source_dir=source)
    submit(config)
    members = bundle_members(moto_aws, "turnwise-secrets")
    assert ".env" not in members and "scripts/deploy.py" not in members and "aws_notes.cfg" not in members
    for content in members.values():
        assert PLANTED_KEY_ID.encode() not in content and PLANTED_SECRET.encode() not in content
    assert turnwise(["sagemaker", "submit", "--config", RECIPE, "--role", ROLE, "--bucket", "turnwise-test",
                     "--job-name", "turnwise-secrets-2", "--dry-run"]) == 0
    printed = capsys.readouterr()
    everything = printed.out + printed.err + caplog.text
    assert "left out of the source bundle: scripts/deploy.py (holds a credential: an AWS access key id" in caplog.text
    assert PLANTED_KEY_ID not in everything and PLANTED_SECRET not in everything


def test_quickstart_notebook_runs_against_moto(moto_aws, tmp_path, monkeypatch):
    """examples/sagemaker_quickstart.ipynb top to bottom in a real kernel (nbclient), its AWS calls going to
    moto over HTTP; its last step runs `turnwise eval` on the downloaded adapter (1 task, 1 turn)."""
    import nbformat
    from nbclient import NotebookClient

    for name, value in {"TURNWISE_SAGEMAKER_ROLE": ROLE, "TURNWISE_SAGEMAKER_BUCKET": "turnwise-test",
                        "TURNWISE_NOTEBOOK_OUT": str(tmp_path / "out"), "TURNWISE_POLL_S": "0.01",
                        "TURNWISE_EVAL_LIMIT": "1", "TURNWISE_EVAL_MAX_TURNS": "1"}.items():
        monkeypatch.setenv(name, value)
    notebook = nbformat.read(REPO / "examples" / "sagemaker_quickstart.ipynb", as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(REPO / "examples")}}).execute()
    text = "\n".join(output.get("text", "") + json.dumps(output.get("data", {}))
                     for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", []))
    assert "Completed / Completed" in text and LOG_LINES[1] in text
    assert "adapter_model.safetensors" in text and "'n_tasks': 1" in text
    assert (tmp_path / "out" / "eval" / "report.json").exists()
    assert PLANTED_KEY_ID not in text and PLANTED_SECRET not in text
