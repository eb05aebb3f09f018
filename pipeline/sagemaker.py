"""Submit turnwise training jobs to SageMaker from a notebook or the shell, and follow them.

`submit` packages the source tree (never ``.git``, virtual environments, caches, outputs or secrets),
uploads it and any local input channels to S3, and calls ``CreateTrainingJob`` on the Hugging Face PyTorch
training DLC. Inside the container the SageMaker training toolkit runs ``sagemaker_entry/train.py`` with
the recipe as ``--config`` and the recipe's scalar values as hyperparameters, so a job's console page
shows what it ran and a hyperparameter can be changed per job without editing the YAML. Everything is
validated before anything is sent, and ``dry_run=True`` returns the request without sending it.

`TrainingJob` is the handle: ``status()``, ``wait()``, ``logs()`` (CloudWatch), ``metrics()`` (the same
regexes SageMaker charts, applied to the logs), ``download()`` (``model.tar.gz``, extracted) and ``stop()``.

Only boto3 is used, through the default credential chain; no credential is ever read, printed or logged
here. The metric regexes match the dict lines that the trainer's progress callback prints, e.g.
``{'loss': '0.0123', 'rollout/reward/mean': '0.4375', 'rollout/success': '0.25', ...}``.
"""

from __future__ import annotations

import fnmatch
import io
import json
import logging
import os
import re
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SOURCE_ROOT = Path(__file__).resolve().parents[1]
"""The turnwise source tree that is packaged by default (it holds sagemaker_entry/)."""

ENTRY_POINT = "sagemaker_entry/train.py"
LOG_GROUP = "/aws/sagemaker/TrainingJobs"
TERMINAL_STATUSES = ("Completed", "Failed", "Stopped")

# -- the Hugging Face PyTorch training DLC ---------------------------------------------------------

DLC_REPOSITORY = "huggingface-pytorch-training"
DLC_ACCOUNTS: dict[str, str] = {
    **{region: "763104351884" for region in (
        "us-east-1", "us-east-2", "us-west-1", "us-west-2", "ca-central-1", "sa-east-1", "eu-central-1",
        "eu-north-1", "eu-west-1", "eu-west-2", "eu-west-3", "ap-northeast-1", "ap-northeast-2", "ap-south-1",
        "ap-southeast-1", "ap-southeast-2")},
    "af-south-1": "626614931356", "ap-east-1": "871362719292", "ap-northeast-3": "364406365360",
    "eu-south-1": "692866216735", "me-south-1": "217643126080", "cn-north-1": "727897471807",
    "cn-northwest-1": "727897471807", "us-gov-west-1": "442386744353",
}
"""The DLC registry account of each region (AWS publishes the images per region)."""

DLC_TAGS: dict[str, str] = {
    "4.49": "2.5.1-transformers4.49.0-gpu-py311-cu124-ubuntu22.04",
    "4.48": "2.3.0-transformers4.48.0-gpu-py311-cu121-ubuntu20.04",
    "4.36": "2.1.0-transformers4.36.0-gpu-py310-cu121-ubuntu20.04",
}
"""Image tag per DLC transformers version. The container upgrades transformers, TRL and PEFT from
sagemaker_entry/requirements.txt, so the image mainly fixes torch and CUDA. Override with ``image_uri``."""

DEFAULT_DLC_VERSION = "4.49"


def image_uri(region: str, version: str = DEFAULT_DLC_VERSION) -> str:
    """The HF PyTorch training DLC image for `region` and DLC transformers `version`.

    >>> image_uri("eu-west-1", "4.49")
    '763104351884.dkr.ecr.eu-west-1.amazonaws.com/huggingface-pytorch-training:2.5.1-transformers4.49.0-gpu-py311-cu124-ubuntu22.04'
    """
    if region not in DLC_ACCOUNTS:
        raise ValueError(f"No Hugging Face training DLC is known for region {region!r} (known: "
                         f"{', '.join(sorted(DLC_ACCOUNTS))}); pass image_uri (--image-uri) explicitly.")
    if version not in DLC_TAGS:
        raise ValueError(f"Unknown DLC version {version!r}; use one of {', '.join(DLC_TAGS)} or pass image_uri "
                         "(--image-uri) explicitly.")
    domain = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
    return f"{DLC_ACCOUNTS[region]}.dkr.ecr.{region}.{domain}/{DLC_REPOSITORY}:{DLC_TAGS[version]}"


# -- metric definitions ---------------------------------------------------------------------------

METRICS = ("loss", "rollout/reward/mean", "rollout/success", "rollout/completion", "rollout/turns/mean",
           "rollout/truncated_frac", "analysis/zero_adv_groups", "val/success", "val/pass@1", "val/completion")
"""What CloudWatch charts for a job: the trainer's metric keys (see pipeline/training/)."""

_NUMBER = r"(-?[0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?)"


def metric_definitions(names: Sequence[str] = METRICS) -> list[dict[str, str]]:
    """SageMaker ``MetricDefinitions``: one regex per metric key, matching the trainer's dict log lines.

    >>> import re
    >>> rx = metric_definitions(["rollout/reward/mean"])[0]["Regex"]
    >>> re.search(rx, "{'loss': '0.01', 'rollout/reward/mean': '0.4375', 'epoch': '1'}").group(1)
    '0.4375'
    """
    return [{"Name": name, "Regex": rf"'{re.escape(name)}': '?{_NUMBER}"} for name in names]


def parse_metrics(lines: Sequence[str], names: Sequence[str] = METRICS) -> dict[str, list[float]]:
    """Every value of each metric in `lines`, in order, as SageMaker's regexes would extract them."""
    found: dict[str, list[float]] = {}
    for definition in metric_definitions(names):
        rx = re.compile(definition["Regex"])
        values = [float(m.group(1)) for line in lines for m in rx.finditer(line)]
        if values:
            found[definition["Name"]] = values
    return found


# -- validation -----------------------------------------------------------------------------------

ROLE_ARN = re.compile(r"arn:aws(-cn|-us-gov|-iso|-iso-b)?:iam::\d{12}:role/[\w+=,.@/-]{1,512}")
BUCKET = re.compile(r"(?!xn--)(?!.*-s3alias$)[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
INSTANCE_TYPE = re.compile(r"ml\.[a-z0-9-]+\.[0-9]*(x?large|metal)")
JOB_NAME = re.compile(r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}")
KMS_KEY = re.compile(r"(arn:aws[a-z-]*:kms:[a-z0-9-]+:\d{12}:(key|alias)/[\w/-]+|alias/[\w/-]+|[0-9a-f-]{36})")


def check_role(role: str) -> str:
    if not ROLE_ARN.fullmatch(role or ""):
        raise ValueError(f"Role {role!r} is not an IAM role ARN. Pass the ARN of a SageMaker execution role, e.g. "
                         "--role arn:aws:iam::123456789012:role/SageMakerExecutionRole (IAM console -> Roles).")
    return role


def check_bucket(bucket: str) -> str:
    if bucket.startswith("s3://"):
        raise ValueError(f"--bucket takes a bucket name, not a URI: use {bucket[5:].split('/')[0]!r}.")
    if not BUCKET.fullmatch(bucket or "") or ".." in bucket:
        raise ValueError(f"Bucket {bucket!r} is not a valid S3 bucket name (3-63 characters: lowercase letters, "
                         "digits, '.' and '-', starting and ending with a letter or digit).")
    return bucket


def check_s3_uri(uri: str, what: str) -> str:
    if not uri.startswith("s3://"):
        raise ValueError(f"{what} {uri!r} is not an S3 URI; write it as s3://BUCKET/PREFIX.")
    check_bucket(uri[5:].split("/", 1)[0])
    return uri


def check_instance(instance_type: str, count: int) -> None:
    if not INSTANCE_TYPE.fullmatch(instance_type or ""):
        raise ValueError(f"Instance type {instance_type!r} is not a SageMaker training instance type; they look like "
                         "ml.g5.2xlarge or ml.p4d.24xlarge (note the 'ml.' prefix).")
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"Instance count must be a positive integer, got {count!r}.")


def split_pairs(pairs: Sequence[str], what: str) -> dict[str, str]:
    """``["k=v", ...]`` (command-line form) as a dict; a clear error for a pair without ``=``."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"{what} {pair!r} must look like KEY=VALUE.")
        out[key] = value
    return out


# -- the source bundle ----------------------------------------------------------------------------

EXCLUDED_DIRS = (".git", ".hg", ".svn", ".venv", "venv", ".env", "env", "__pycache__", ".pytest_cache", ".mypy_cache",
                 ".ruff_cache", ".ipynb_checkpoints", ".tox", ".nox", ".idea", ".vscode", "node_modules", "build",
                 "dist", "*.egg-info", "outputs", "runs", "wandb", "mlruns", "sagemaker_local", ".aws", ".ssh")
"""Directories never packaged: version control, virtual environments, caches, build and run outputs."""

SECRET_FILES = (".env", ".env.*", "*.env", "credentials", "credentials.*", ".netrc", ".pypirc", ".git-credentials",
                "*.pem", "*.key", "*.p12", "*.pfx", "id_rsa*", "id_ed25519*", "id_ecdsa*", "*.tfstate")
"""File names that hold secrets; never packaged whatever their content."""

SECRET_CONTENT = re.compile(
    rb"(?<![A-Z0-9])(AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16}(?![A-Z0-9])"  # AWS access key id
    rb"|(aws_secret_access_key|aws_session_token)\s*[=:]\s*[\"']?[A-Za-z0-9/+=]{20,}"  # credentials-file entries
    rb"|-----BEGIN [A-Z ]*PRIVATE KEY-----", re.IGNORECASE)
"""Content that marks a file as holding a credential: such a file is left out and named (never shown)."""

MAX_FILE_BYTES = 50 * 1024 * 1024


@dataclass
class Bundle:
    """A packaged source tree: the ``sourcedir.tar.gz`` and what went in or was left out (and why)."""

    path: Path
    files: list[str]
    excluded: list[tuple[str, str]]


def _excluded_dir(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in EXCLUDED_DIRS)


def _secret_reason(path: Path, relative: str) -> str | None:
    if any(fnmatch.fnmatch(path.name, pattern) for pattern in SECRET_FILES):
        return "secret file name"
    if path.stat().st_size > MAX_FILE_BYTES:
        return f"larger than {MAX_FILE_BYTES // 2**20} MiB"
    with open(path, "rb") as f:
        if SECRET_CONTENT.search(f.read()):
            return "holds a credential"
    return None


def make_bundle(out_path: Path, source_dir: Path = SOURCE_ROOT, extra: Mapping[str, Path] | None = None) -> Bundle:
    """Write ``sourcedir.tar.gz`` of `source_dir` to `out_path`, leaving out what must not travel.

    ``requirements.txt`` at the root is ``sagemaker_entry/requirements.txt`` (the toolkit installs the root
    one). `extra` maps names inside the bundle to files outside the tree (a recipe kept elsewhere).
    """
    source_dir = Path(source_dir).resolve()
    if not (source_dir / ENTRY_POINT).is_file():
        raise FileNotFoundError(f"{source_dir} has no {ENTRY_POINT}; pass the turnwise source tree as source_dir.")
    files: list[str] = []
    excluded: list[tuple[str, str]] = []
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out_path, "w:gz") as tar:
        for root, dirs, names in os.walk(source_dir):
            rel_root = Path(root).relative_to(source_dir)
            for d in sorted(dirs):
                if _excluded_dir(d) or (Path(root) / d).resolve() == out_path.parent.resolve():
                    excluded.append((str(rel_root / d) + "/", "excluded directory"))
            dirs[:] = sorted(d for d in dirs if not _excluded_dir(d)
                             and (Path(root) / d).resolve() != out_path.parent.resolve())
            for name in sorted(names):
                path = Path(root) / name
                relative = str(rel_root / name)
                if not path.is_file() or path.is_symlink() or path.resolve() == out_path.resolve():
                    continue
                reason = _secret_reason(path, relative)
                if reason:
                    excluded.append((relative, reason))
                    continue
                tar.add(path, arcname=relative, recursive=False)
                files.append(relative)
        for arcname, path in {"requirements.txt": source_dir / "sagemaker_entry" / "requirements.txt",
                              **(extra or {})}.items():
            reason = _secret_reason(Path(path), arcname)
            if reason:
                raise ValueError(f"{path} cannot be packaged: {reason}. Remove the credential from it.")
            tar.add(path, arcname=arcname, recursive=False)
            files.append(arcname)
    for name, reason in excluded:
        if reason != "excluded directory":
            logger.warning("left out of the source bundle: %s (%s)", name, reason)
    return Bundle(out_path, files, excluded)


# -- the request ----------------------------------------------------------------------------------


@dataclass
class SubmitConfig:
    """One training job: recipe, where it runs, what it reads and where it writes."""

    config: str = field(metadata={"help": "The training recipe (YAML), as for `turnwise train --config`."})
    role: str = field(metadata={"help": "ARN of the SageMaker execution role the job runs as."})
    bucket: str = field(metadata={"help": "S3 bucket for the source bundle, inputs, checkpoints and outputs."})
    prefix: str = field(default="turnwise", metadata={"help": "Key prefix under the bucket."})
    job_name: str | None = field(default=None, metadata={"help": "Job name (default: turnwise-<recipe>-<time>)."})
    region: str | None = field(default=None, metadata={"help": "AWS region (default: the boto3 session's)."})
    instance_type: str = field(default="ml.g5.2xlarge", metadata={"help": "Training instance type."})
    instance_count: int = field(default=1, metadata={"help": "Instances; more than 1 uses torch_distributed."})
    volume_size_gb: int = field(default=100, metadata={"help": "EBS volume per instance (GB)."})
    max_runtime_s: int = field(default=24 * 3600, metadata={"help": "Maximum training time (seconds)."})
    spot: bool = field(default=False, metadata={"help": "Managed spot training (resumes from checkpoints)."})
    max_wait_s: int | None = field(default=None, metadata={
        "help": "With spot: maximum wait for capacity plus runtime (default: twice max_runtime_s)."})
    checkpoint_s3_uri: str | None = field(default=None, metadata={
        "help": "S3 URI synced with /opt/ml/checkpoints (default with spot: s3://BUCKET/PREFIX/JOB/checkpoints)."})
    output_path: str | None = field(default=None, metadata={"help": "S3 URI for model.tar.gz (default: s3://BUCKET/PREFIX/output)."})
    image_uri: str | None = field(default=None, metadata={"help": "Container image (default: the HF PyTorch DLC)."})
    dlc_version: str = field(default=DEFAULT_DLC_VERSION, metadata={"help": f"DLC version: {', '.join(DLC_TAGS)}."})
    inputs: dict[str, str] = field(default_factory=dict, metadata={
        "help": "Input channels (train, val, model): a local path (uploaded) or an s3:// URI (used as given)."})
    hyperparameters: dict[str, str] = field(default_factory=dict, metadata={
        "help": "Overrides of recipe values and entry-point options (merge_adapter, eval_limit, accelerate_config)."})
    tags: dict[str, str] = field(default_factory=dict, metadata={"help": "Tags on the job."})
    subnets: list[str] = field(default_factory=list, metadata={"help": "VPC subnets (with security_group_ids)."})
    security_group_ids: list[str] = field(default_factory=list, metadata={"help": "VPC security groups."})
    kms_key: str | None = field(default=None, metadata={"help": "KMS key for the output and the volume."})
    network_isolation: bool = field(default=False, metadata={"help": "No network access from the container."})
    source_dir: Path = field(default=SOURCE_ROOT, metadata={"help": "The source tree to package."})

    def __post_init__(self) -> None:
        check_role(self.role)
        check_bucket(self.bucket)
        check_instance(self.instance_type, self.instance_count)
        recipe = Path(self.config)
        if not recipe.is_file():
            raise FileNotFoundError(f"Recipe {self.config} does not exist; pass a YAML file such as "
                                    "configs/sagemaker/grpo_g5.yaml.")
        if self.job_name is None:
            stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
            slug = re.sub(r"[^a-zA-Z0-9]+", "-", recipe.stem).strip("-")[:30] or "job"
            self.job_name = f"turnwise-{slug}-{stamp}"
        if not JOB_NAME.fullmatch(self.job_name):
            raise ValueError(f"Job name {self.job_name!r} is invalid: 1-63 letters, digits and '-', starting with a "
                             "letter or digit.")
        if self.volume_size_gb < 1:
            raise ValueError(f"volume_size_gb must be at least 1, got {self.volume_size_gb}.")
        if self.max_runtime_s < 1:
            raise ValueError(f"max_runtime_s must be at least 1 second, got {self.max_runtime_s}.")
        if self.spot:
            self.max_wait_s = self.max_wait_s or 2 * self.max_runtime_s
            if self.max_wait_s < self.max_runtime_s:
                raise ValueError(f"max_wait_s ({self.max_wait_s}) must be at least max_runtime_s "
                                 f"({self.max_runtime_s}): it covers waiting for spot capacity plus the run.")
            self.checkpoint_s3_uri = self.checkpoint_s3_uri or f"{self.s3_root}/checkpoints"
        elif self.max_wait_s is not None:
            raise ValueError("max_wait_s applies to managed spot training only; add spot (--spot) or drop it.")
        for uri, what in ((self.checkpoint_s3_uri, "checkpoint_s3_uri"), (self.output_path, "output_path")):
            if uri is not None:
                check_s3_uri(uri, what)
        for name, source in self.inputs.items():
            if not re.fullmatch(r"[A-Za-z0-9\.\-_]{1,64}", name):
                raise ValueError(f"Channel name {name!r} is invalid; use letters, digits, '.', '-' or '_'.")
            if source.lower().startswith("s3:"):
                check_s3_uri(source, f"Channel {name!r}")
            elif not Path(source).exists():
                raise FileNotFoundError(f"Channel {name!r}: {source} does not exist (a local path is uploaded; an "
                                        "s3:// URI is used as given).")
        if bool(self.subnets) != bool(self.security_group_ids):
            raise ValueError("A VPC config needs both subnets and security_group_ids.")
        if self.kms_key is not None and not KMS_KEY.fullmatch(self.kms_key):
            raise ValueError(f"KMS key {self.kms_key!r} is not a key id, key ARN or alias.")
        if len(self.tags) > 50:
            raise ValueError(f"At most 50 tags per job, got {len(self.tags)}.")
        if self.image_uri is None and self.region is not None:
            image_uri(self.region, self.dlc_version)  # fail fast on an unknown region or version

    @property
    def s3_root(self) -> str:
        return f"s3://{self.bucket}/{self.prefix.strip('/')}/{self.job_name}".replace(f"{self.bucket}//", f"{self.bucket}/")


def recipe_hyperparameters(recipe: Path) -> dict[str, str]:
    """The recipe's scalar values as hyperparameters (lists and mappings stay in the YAML only)."""
    import yaml

    values = yaml.safe_load(recipe.read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"Recipe {recipe} must be a YAML mapping of option: value.")
    return {key: value for key, value in values.items()
            if isinstance(value, (str, int, float, bool)) and key != "output_dir"}


def recipe_arcname(config: SubmitConfig) -> tuple[str, dict[str, Path]]:
    """Where the recipe sits in the bundle, and the files to add because they sit outside the source tree."""
    recipe = Path(config.config).resolve()
    try:
        return str(recipe.relative_to(Path(config.source_dir).resolve())), {}
    except ValueError:
        name = f"recipes/{recipe.name}"
        return name, {name: recipe}


def build_request(config: SubmitConfig, region: str, source_uri: str, channels: Mapping[str, str]) -> dict[str, Any]:
    """The ``CreateTrainingJob`` parameters (SageMaker's hyperparameters are strings: JSON-encoded values)."""
    recipe_in_bundle, _ = recipe_arcname(config)
    from_recipe = recipe_hyperparameters(Path(config.config))
    if "model" in channels:  # the model channel is the base model: the recipe's model name must not override it
        from_recipe.pop("model_name_or_path", None)
    hyperparameters: dict[str, Any] = {**from_recipe, **config.hyperparameters, "config": recipe_in_bundle}
    hyperparameters.update({
        "sagemaker_program": ENTRY_POINT,
        "sagemaker_submit_directory": source_uri,
        "sagemaker_container_log_level": 20,
        "sagemaker_region": region,
    })
    if config.instance_count > 1:
        hyperparameters["sagemaker_torch_distributed_enabled"] = True  # torchrun across the instances
    encoded = {key: json.dumps(value) for key, value in hyperparameters.items()}
    for key, value in encoded.items():
        if len(key) > 256 or len(value) > 2500:
            raise ValueError(f"Hyperparameter {key!r} is too long for SageMaker (keys 256, values 2500 characters); "
                             "keep long values in the recipe YAML.")
    if len(encoded) > 100:
        raise ValueError(f"{len(encoded)} hyperparameters; SageMaker takes at most 100. Keep more in the recipe.")
    request: dict[str, Any] = {
        "TrainingJobName": config.job_name,
        "RoleArn": config.role,
        "AlgorithmSpecification": {
            "TrainingImage": config.image_uri or image_uri(region, config.dlc_version),
            "TrainingInputMode": "File",
            "MetricDefinitions": metric_definitions(),
            "EnableSageMakerMetricsTimeSeries": True,
        },
        "HyperParameters": encoded,
        "InputDataConfig": [
            {"ChannelName": name, "InputMode": "File",
             "DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": uri,
                                             "S3DataDistributionType": "FullyReplicated"}}}
            for name, uri in channels.items()],
        "OutputDataConfig": {"S3OutputPath": config.output_path or f"s3://{config.bucket}/{config.prefix.strip('/')}/output"},
        "ResourceConfig": {"InstanceType": config.instance_type, "InstanceCount": config.instance_count,
                           "VolumeSizeInGB": config.volume_size_gb},
        "StoppingCondition": {"MaxRuntimeInSeconds": config.max_runtime_s},
        "Tags": [{"Key": k, "Value": v} for k, v in {"turnwise:recipe": Path(config.config).name, **config.tags}.items()],
        "EnableNetworkIsolation": config.network_isolation,
        "EnableManagedSpotTraining": config.spot,
    }
    if not request["InputDataConfig"]:
        del request["InputDataConfig"]
    if config.spot:
        request["StoppingCondition"]["MaxWaitTimeInSeconds"] = config.max_wait_s
    if config.checkpoint_s3_uri:
        request["CheckpointConfig"] = {"S3Uri": config.checkpoint_s3_uri, "LocalPath": "/opt/ml/checkpoints"}
    if config.subnets:
        request["VpcConfig"] = {"Subnets": list(config.subnets), "SecurityGroupIds": list(config.security_group_ids)}
    if config.kms_key:
        request["OutputDataConfig"]["KmsKeyId"] = config.kms_key
        request["ResourceConfig"]["VolumeKmsKeyId"] = config.kms_key
    return request


def validate_request(request: Mapping[str, Any]) -> None:
    """Check `request` against botocore's SageMaker service model (types, required keys, lengths, patterns)."""
    import botocore.session
    from botocore.validate import ParamValidator

    model = botocore.session.get_session().get_service_model("sagemaker")
    report = ParamValidator().validate(dict(request), model.operation_model("CreateTrainingJob").input_shape)
    if report.has_errors():
        raise ValueError(f"The CreateTrainingJob request is invalid:\n{report.generate_report()}")


# -- submission -----------------------------------------------------------------------------------


def _session(region: str | None):
    import boto3

    return boto3.session.Session(region_name=region)


def _region(session) -> str:
    if not session.region_name:
        raise ValueError("No AWS region: pass --region (region=...) or set AWS_DEFAULT_REGION.")
    return session.region_name


def _upload_dir(s3, local: Path, uri: str) -> None:
    bucket, _, key_prefix = uri[5:].partition("/")
    paths = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
    for path in paths:
        key = f"{key_prefix.rstrip('/')}/{path.name if local.is_file() else path.relative_to(local).as_posix()}"
        s3.upload_file(str(path), bucket, key)


def submit(config: SubmitConfig, *, dry_run: bool = False, session=None) -> "TrainingJob | dict[str, Any]":
    """Package, upload and start the job; with `dry_run`, return the request and send nothing.

    Returns a `TrainingJob` (or, with `dry_run`, the ``CreateTrainingJob`` request as a dict).
    """
    session = session or _session(config.region)
    region = config.region or _region(session)
    source_uri = f"{config.s3_root}/source/sourcedir.tar.gz"
    channels = {name: src if src.startswith("s3://") else f"{config.s3_root}/input/{name}"
                for name, src in config.inputs.items()}
    request = build_request(config, region, source_uri, channels)
    validate_request(request)
    _, extra = recipe_arcname(config)
    with tempfile.TemporaryDirectory(prefix="turnwise-bundle-") as tmp:
        bundle = make_bundle(Path(tmp) / "sourcedir.tar.gz", config.source_dir, extra)
        logger.info("source bundle: %d files, %d left out", len(bundle.files), len(bundle.excluded))
        if dry_run:
            return request
        s3 = session.client("s3")
        bucket, _, key = source_uri[5:].partition("/")
        s3.upload_file(str(bundle.path), bucket, key)
    for name, src in config.inputs.items():
        if not src.startswith("s3://"):
            logger.info("uploading channel %s: %s -> %s", name, src, channels[name])
            _upload_dir(s3, Path(src), channels[name])
    client = session.client("sagemaker")
    try:
        client.create_training_job(**request)
    except Exception as error:  # botocore's errors carry the service's message; say which call failed
        raise ValueError(f"CreateTrainingJob {config.job_name} failed: {error}") from error
    logger.info("submitted %s in %s", config.job_name, region)
    return TrainingJob(config.job_name, session=session)


# -- the job handle -------------------------------------------------------------------------------


class TrainingJobFailed(RuntimeError):
    """The job ended Failed or Stopped."""


class TrainingJob:
    """A SageMaker training job by name: status, wait, logs, metrics, download, stop."""

    def __init__(self, name: str, *, region: str | None = None, session=None) -> None:
        self.name = name
        self.session = session or _session(region)
        self._sagemaker = self.session.client("sagemaker")

    def __repr__(self) -> str:
        return f"TrainingJob({self.name!r})"

    def describe(self) -> dict[str, Any]:
        try:
            return self._sagemaker.describe_training_job(TrainingJobName=self.name)
        except Exception as error:
            raise ValueError(f"Cannot describe training job {self.name!r}: {error}") from error

    def status(self) -> str:
        """``InProgress``, ``Completed``, ``Failed``, ``Stopping`` or ``Stopped``."""
        return self.describe()["TrainingJobStatus"]

    def wait(self, poll_s: float = 30.0, timeout_s: float | None = None,
             on_progress: Callable[[dict[str, Any]], None] | None = None, raise_on_failure: bool = True) -> dict:
        """Poll until the job ends; `on_progress` gets each new (status, secondary status, message) description.

        Raises:
            TrainingJobFailed: the job ended Failed or Stopped (with ``raise_on_failure``), with its reason.
            TimeoutError: still running after `timeout_s`.
        """
        start, last = time.monotonic(), None
        while True:
            description = self.describe()
            seen = (description["TrainingJobStatus"], description.get("SecondaryStatus"),
                    (description.get("SecondaryStatusTransitions") or [{}])[-1].get("StatusMessage"))
            if seen != last:
                last = seen
                logger.info("%s: %s / %s %s", self.name, *(s or "" for s in seen))
                if on_progress:
                    on_progress(description)
            if description["TrainingJobStatus"] in TERMINAL_STATUSES:
                break
            if timeout_s is not None and time.monotonic() - start > timeout_s:
                raise TimeoutError(f"{self.name} is still {description['TrainingJobStatus']} after {timeout_s:.0f} s.")
            time.sleep(poll_s)
        if raise_on_failure and description["TrainingJobStatus"] != "Completed":
            raise TrainingJobFailed(f"{self.name} ended {description['TrainingJobStatus']}: "
                                    f"{description.get('FailureReason', 'no reason given')}")
        return description

    def log_streams(self) -> list[str]:
        logs = self.session.client("logs")
        try:
            response = logs.describe_log_streams(logGroupName=LOG_GROUP, logStreamNamePrefix=f"{self.name}/")
        except logs.exceptions.ResourceNotFoundException:
            return []
        return sorted(s["logStreamName"] for s in response.get("logStreams", []))

    def logs(self, follow: bool = False, poll_s: float = 10.0) -> Iterator[str]:
        """The job's CloudWatch log lines, stream by stream (``algo-1`` first); `follow` keeps reading
        until the job ends."""
        logs = self.session.client("logs")
        tokens: dict[str, str | None] = {}
        while True:
            finished = not follow or self.status() in TERMINAL_STATUSES
            for stream in self.log_streams():
                while True:
                    kwargs = {"logGroupName": LOG_GROUP, "logStreamName": stream, "startFromHead": True}
                    if tokens.get(stream):
                        kwargs["nextToken"] = tokens[stream]
                    response = logs.get_log_events(**kwargs)
                    for event in response.get("events", []):
                        yield event["message"]
                    if response.get("nextForwardToken") in (None, tokens.get(stream)):
                        break
                    tokens[stream] = response["nextForwardToken"]
            if finished:
                return
            time.sleep(poll_s)

    def metrics(self) -> dict[str, list[float]]:
        """Each charted metric's values over the run, read from the logs with the job's regexes."""
        return parse_metrics(list(self.logs()))

    def model_artifacts(self) -> str:
        uri = self.describe().get("ModelArtifacts", {}).get("S3ModelArtifacts")
        if not uri:
            raise ValueError(f"{self.name} has no model artifacts yet (status {self.status()}).")
        return uri

    def download(self, dest: str | os.PathLike[str] = ".") -> Path:
        """Fetch ``model.tar.gz`` and extract it into `dest`/JOB; returns that directory (adapter/ inside)."""
        uri = self.model_artifacts()
        bucket, _, key = uri[5:].partition("/")
        out = Path(dest) / self.name
        out.mkdir(parents=True, exist_ok=True)
        body = self.session.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()
        with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as tar:
            tar.extractall(out, filter="data")  # refuses absolute paths, '..' and links out of `out`
        logger.info("downloaded %s to %s", uri, out)
        return out

    def stop(self) -> None:
        try:
            self._sagemaker.stop_training_job(TrainingJobName=self.name)
        except Exception as error:
            raise ValueError(f"Cannot stop training job {self.name!r}: {error}") from error
