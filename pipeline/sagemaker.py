"""Submit turnwise training jobs to SageMaker from a notebook or the shell, and follow them.

`submit` packages the source tree (never ``.git``, virtual environments, caches, outputs or secrets),
uploads it and any local input channels to S3, and calls ``CreateTrainingJob`` on a Hugging Face PyTorch
training DLC (`DLC_IMAGES`). Inside the container the SageMaker training toolkit runs
``sagemaker_entry/train.py`` with the recipe as ``--config`` and the recipe's scalar values as
hyperparameters, so a job's console page shows what it ran and a hyperparameter can be changed per job
without editing the YAML. Everything is validated before anything is sent, against SageMaker's own rules
(`validate_request`), and ``dry_run=True`` returns the request without sending it.

Secrets never travel: the bundle leaves out any file that holds one (`find_secret`), a recipe,
hyperparameter or environment value that names or holds one is refused, and ``secrets=`` sends only the
name of a Secrets Manager secret, which the entry point reads in the container. ``mlflow_arn=`` sets the
job's ``MlflowConfig`` and the trainer reports to SageMaker-managed MLflow.

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

# -- the training image ---------------------------------------------------------------------------

DLC_REPOSITORY = "huggingface-pytorch-training"
DLC_ACCOUNTS: dict[str, str] = {
    **{region: "763104351884" for region in (
        "us-east-1", "us-east-2", "us-west-1", "us-west-2", "ca-central-1", "sa-east-1", "eu-central-1",
        "eu-north-1", "eu-west-1", "eu-west-2", "eu-west-3", "ap-northeast-1", "ap-northeast-2", "ap-south-1",
        "ap-southeast-1", "ap-southeast-2")},
    "af-south-1": "626614931356", "ap-east-1": "871362719292", "ap-northeast-3": "364406365360",
    "ap-southeast-3": "907027046896", "ca-west-1": "204538143572", "eu-south-1": "692866216735",
    "il-central-1": "780543022126", "me-central-1": "914824155844", "me-south-1": "217643126080",
    "cn-north-1": "727897471807", "cn-northwest-1": "727897471807", "us-gov-east-1": "446045086412",
    "us-gov-west-1": "442386744353",
}
"""The DLC registry account of each region where AWS publishes the images below (the SageMaker Python SDK's
``sagemaker-core/src/sagemaker/core/image_uri_config/huggingface.json``, training entries 4.56.2 and 5.3.0)."""


@dataclass(frozen=True)
class DLCImage:
    """One Hugging Face PyTorch training DLC: what it carries, and what the container-stack test rebuilds.

    The container upgrades transformers, TRL, PEFT and the rest from sagemaker_entry/requirements.txt, so
    the image's torch, Python and CUDA are what it fixes. `preinstalled` lists the image's own pins of the
    packages that requirements.txt upgrades (from its Dockerfile), so the test upgrades the same versions.
    """

    tag: str
    torch: str
    python: str
    cuda: str
    transformers: str
    preinstalled: tuple[str, ...]
    source: str


# Tags verified in AWS's published lists:
# - the SageMaker Python SDK's sagemaker-core/src/sagemaker/core/image_uri_config/huggingface.json (training:
#   "5.3.0" -> pytorch2.9.0, py312, cu130-ubuntu22.04; "4.56.2" -> pytorch2.8.0, py312, cu129-ubuntu22.04);
# - aws/deep-learning-containers huggingface/pytorch/training/docker/2.9/py3/cu130/Dockerfile.gpu (FROM
#   pytorch-training:2.9.0-gpu-py312-cu130-ubuntu22.04-sagemaker, TRANSFORMERS_VERSION=5.3.0) and
#   .../2.8/py3/cu129/Dockerfile.gpu (FROM pytorch-training:2.8.0-gpu-py312-cu129-ubuntu22.04-sagemaker,
#   TRANSFORMERS_VERSION=4.56.2), which also give the `preinstalled` pins;
# - Hugging Face's "Available DLCs on AWS" page lists 2.9.0-transformers5.3.0-gpu-py312-cu130-ubuntu22.04.
# The 4.49 image (torch 2.5.1) and older are left out on purpose: transformers 5 refuses torch < 2.6.
DLC_IMAGES: dict[str, DLCImage] = {
    "5.3": DLCImage(
        tag="2.9.0-transformers5.3.0-gpu-py312-cu130-ubuntu22.04", torch="2.9.0", python="3.12", cuda="13.0",
        transformers="5.3.0",
        preinstalled=("transformers==5.3.0", "datasets==4.5.0", "huggingface_hub==1.10.0", "trl==0.28.0",
                      "peft==0.18.1", "numpy<2", "boto3==1.42.87"),
        source="huggingface/pytorch/training/docker/2.9/py3/cu130/Dockerfile.gpu"),
    "4.56": DLCImage(
        tag="2.8.0-transformers4.56.2-gpu-py312-cu129-ubuntu22.04", torch="2.8.0", python="3.12", cuda="12.9",
        transformers="4.56.2",
        preinstalled=("transformers==4.56.2", "datasets==4.1.0", "huggingface_hub==0.35.3", "accelerate==1.10.1",
                      "trl==0.23.0", "peft==0.17.1"),
        source="huggingface/pytorch/training/docker/2.8/py3/cu129/Dockerfile.gpu"),
}
"""The images `submit` can pick, by DLC transformers version. 5.3 (CUDA 13.0) is the default; 4.56 keeps a
CUDA 12 stack for drivers or kernels that need one. Override with ``image_uri``."""

DLC_TAGS: dict[str, str] = {version: image.tag for version, image in DLC_IMAGES.items()}
DEFAULT_DLC_VERSION = "5.3"

STACK_FLOORS = {"torch": "2.6", "python": "3.11"}
"""The oldest torch and Python the pinned stack runs on: transformers 5 disables itself below torch 2.6
(``is_torch_available``) and declares Requires-Python >=3.11. tests/test_sagemaker_images.py reads both
from the installed packages and fails if these drift or if an image in `DLC_IMAGES` falls below them."""


def image_uri(region: str, version: str = DEFAULT_DLC_VERSION) -> str:
    """The HF PyTorch training DLC image for `region` and DLC transformers `version`.

    >>> image_uri("eu-west-1", "5.3")
    '763104351884.dkr.ecr.eu-west-1.amazonaws.com/huggingface-pytorch-training:2.9.0-transformers5.3.0-gpu-py312-cu130-ubuntu22.04'
    """
    if region not in DLC_ACCOUNTS:
        raise ValueError(f"No Hugging Face training DLC is known for region {region!r} (known: "
                         f"{', '.join(sorted(DLC_ACCOUNTS))}); pass image_uri (--image-uri) explicitly.")
    if version not in DLC_TAGS:
        raise ValueError(f"Unknown DLC version {version!r}; use one of {', '.join(DLC_TAGS)} or pass image_uri "
                         "(--image-uri) explicitly.")
    domain = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
    return f"{DLC_ACCOUNTS[region]}.dkr.ecr.{region}.{domain}/{DLC_REPOSITORY}:{DLC_TAGS[version]}"


# A Docker image reference (distribution/reference's grammar), as SageMaker's TrainingImage takes it:
# registry/repository with a tag or a digest.
IMAGE_REFERENCE = re.compile(
    r"(?P<registry>(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
    r"(?::[0-9]+)?)/"
    r"(?P<repository>[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*)"
    r"(?::(?P<tag>[\w][\w.-]{0,127}))?(?:@(?P<digest>sha256:[a-f0-9]{64}))?", re.ASCII)
ECR_REGISTRY = re.compile(r"\d{12}\.dkr\.ecr(?:-fips)?\.(?P<region>[a-z0-9-]+)\.amazonaws\.com(?:\.cn)?")
# The framework DLC tags: TORCH[-transformersX]-gpu|cpu-pyXY[-cuNNN]-... (huggingface-pytorch-training and
# pytorch-training alike).
DLC_TAG = re.compile(r"(?P<torch>\d+\.\d+(?:\.\d+)?)-(?:transformers[0-9.]+-)?(?:gpu|cpu)-py(?P<py>\d)(?P<pyminor>\d+)\b")


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def check_image_uri(uri: str, region: str | None = None) -> list[str]:
    """Validate an explicit training image; return warnings (an incompatible torch or Python in its tag, a
    registry SageMaker cannot pull from without more setup). Raises ValueError for what SageMaker rejects."""
    if len(uri) > 255:
        raise ValueError(f"Image URI {uri[:80]!r}... is {len(uri)} characters; SageMaker's TrainingImage takes at "
                         "most 255.")
    match = IMAGE_REFERENCE.fullmatch(uri)
    has_registry = match is not None and ("." in match["registry"] or ":" in match["registry"]
                                          or match["registry"] == "localhost")
    if not match or not has_registry or not (match["tag"] or match["digest"]):
        raise ValueError(f"Image URI {uri!r} is not a registry path SageMaker can pull: write it as "
                         "REGISTRY/REPOSITORY:TAG or REGISTRY/REPOSITORY@sha256:DIGEST with a lowercase repository, "
                         "e.g. 763104351884.dkr.ecr.us-east-1.amazonaws.com/huggingface-pytorch-training:"
                         f"{DLC_TAGS[DEFAULT_DLC_VERSION]}.")
    warnings: list[str] = []
    ecr = ECR_REGISTRY.fullmatch(match["registry"])
    if ecr is None:
        warnings.append(f"Image {uri} is not in Amazon ECR: SageMaker pulls other registries only from inside "
                        "your VPC (TrainingImageConfig), which turnwise does not set.")
    elif region is not None and ecr["region"] != region:
        warnings.append(f"Image {uri} is in {ecr['region']}, the job runs in {region}: SageMaker pulls training "
                        "images from the job's own region.")
    stack = DLC_TAG.match(match["tag"] or "")
    if stack:
        torch, python = stack["torch"], f"{stack['py']}.{stack['pyminor']}"
        if _version_tuple(torch) < _version_tuple(STACK_FLOORS["torch"]):
            warnings.append(f"Image tag {match['tag']} carries torch {torch}; the pinned stack needs torch >= "
                            f"{STACK_FLOORS['torch']} (transformers disables itself below it), so the job would die at "
                            f"start-up. Use --dlc-version {DEFAULT_DLC_VERSION} or a newer image.")
        if _version_tuple(python) < _version_tuple(STACK_FLOORS["python"]):
            warnings.append(f"Image tag {match['tag']} carries Python {python}; the pinned stack needs Python >= "
                            f"{STACK_FLOORS['python']}, so installing requirements.txt would fail at start-up.")
        tested = {(image.torch, image.python) for image in DLC_IMAGES.values()}
        if not warnings and (torch, python) not in tested and not any(
                _version_tuple(torch)[:2] == _version_tuple(t)[:2] and python == p for t, p in tested):
            warnings.append(f"Image tag {match['tag']} (torch {torch}, Python {python}) is not one the container-stack "
                            f"test runs; the tested ones are {', '.join(DLC_TAGS.values())}.")
    return warnings


# -- metric definitions ---------------------------------------------------------------------------

METRICS = ("loss", "rollout/reward/mean", "val/reward/mean", "rollout/success", "rollout/completion",
           "rollout/turns/mean", "rollout/truncated_frac", "analysis/zero_adv_groups", "val/success", "val/pass@1",
           "val/completion")
"""What CloudWatch charts for a job: the trainer's metric keys (see pipeline/training/)."""

_NUMBER = r"(-?[0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?)"


def metric_definitions(names: Sequence[str] = METRICS) -> list[dict[str, str]]:
    """SageMaker ``MetricDefinitions``: one regex per metric key, matching the trainer's dict log lines.

    >>> import re
    >>> rx = metric_definitions(["rollout/reward/mean"])[0]["Regex"]
    >>> re.search(rx, "{'loss': '0.01', 'rollout/reward/mean': '0.4375', 'epoch': '1'}").group(1)
    '0.4375'
    """
    return [{"Name": name, "Regex": rf"['\"]{re.escape(name)}['\"]: ['\"]?{_NUMBER}"} for name in names]


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
    """``["k=v", ...]`` (command-line form) as a dict; a clear error for a pair without ``=`` or a repeated
    key. An argument that looks like a secret is never echoed back."""
    out: dict[str, str] = {}
    for i, pair in enumerate(pairs, 1):
        key, sep, value = pair.partition("=")
        shown = f"argument {i}" if secret_value(pair) or what == "--secret" else repr(_printable(pair))
        if not sep or not key:
            raise ValueError(f"{what} {shown} must look like KEY=VALUE.")
        if key in out:
            raise ValueError(f"{what} '{_printable(key)}' is given twice; give each key once.")
        out[key] = value
    return out


# -- the source bundle ----------------------------------------------------------------------------

EXCLUDED_DIRS = (".git", ".hg", ".svn", ".venv", "venv", ".env", "env", "__pycache__", ".pytest_cache", ".mypy_cache",
                 ".ruff_cache", ".ipynb_checkpoints", ".tox", ".nox", ".idea", ".vscode", "node_modules", "build",
                 "dist", "*.egg-info", "outputs", "runs", "wandb", "mlruns", "sagemaker_local", ".aws", ".ssh")
"""Directories never packaged: version control, virtual environments, caches, build and run outputs."""

SECRET_FILES = (".env", ".env.*", "*.env", "credentials", "credentials.*", ".netrc", ".pypirc", ".git-credentials",
                ".s3cfg", ".npmrc", ".boto", ".dockercfg", ".htpasswd", "*.pem", "*.key", "*.p12", "*.pfx", "*.jks",
                "*.keystore", "*.kdbx", "*.ppk", "*.tfvars", "*.tfstate", "*.tfstate.*", "id_rsa*", "id_dsa*",
                "id_ed25519*", "id_ecdsa*")
"""File names that hold secrets; never packaged whatever their content."""

ARCHIVE_FILES = ("*.zip", "*.tar", "*.tgz", "*.gz", "*.bz2", "*.xz", "*.zst", "*.7z", "*.rar", "*.whl", "*.jar",
                 "*.egg")
"""Archives: their contents cannot be scanned, so they are left out (and named) rather than trusted."""

SECRET_SHAPES: tuple[tuple[str, re.Pattern[bytes]], ...] = tuple((what, re.compile(rx)) for what, rx in (
    ("an AWS access key id", rb"(?<![A-Z0-9])(?:AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16}(?![A-Z0-9])"),
    ("a private key", rb"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"),
    ("a Hugging Face token", rb"(?<![A-Za-z0-9_])hf_[A-Za-z0-9]{30,}(?![A-Za-z0-9])"),
    ("an npm token", rb"(?<![A-Za-z0-9_])npm_[A-Za-z0-9]{36}(?![A-Za-z0-9])"),
    ("a GitHub token", rb"(?<![A-Za-z0-9_])(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{50,})"),
    ("a Slack token", rb"(?<![A-Za-z0-9])xox[abposr]-[A-Za-z0-9-]{10,}"),
    ("a Google API key", rb"(?<![A-Za-z0-9])AIza[0-9A-Za-z_\-]{35}"),
    ("an OpenAI or Anthropic API key", rb"(?<![A-Za-z0-9])sk-(?:proj-|ant-[a-z0-9]+-)?[A-Za-z0-9_\-]{32,}"),
    ("a Stripe key", rb"(?<![A-Za-z0-9])[rs]k_live_[A-Za-z0-9]{20,}"),
    ("a JSON web token", rb"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}"),
    ("a password in a URL", rb"(?<![A-Za-z0-9+.-])[A-Za-z][A-Za-z0-9+.-]*://[^\s/:@'\"<>]+:[^\s/@'\"<>{}$%]+@[A-Za-z0-9.-]+"),
))
"""Values that are secrets by their shape, wherever they appear."""

_SECRET_NAME = (rb"(?:aws_?secret_?access_?key|secret_?access_?key|aws_?session_?token|session_?token|secret_?key"
                rb"|client_?secret|api_?secret|secret|password|passwd|passphrase|api_?key|apikey|access_?token"
                rb"|auth_?token|_authtoken|refresh_?token|bearer_?token|hub_?token|hf_?token|private_?key)")
SECRET_ASSIGNMENT = re.compile(
    rb"(?<![A-Za-z0-9])[\"']?(?:[A-Za-z0-9_.-]*[_.-])?" + _SECRET_NAME + rb"[\"']?\s*(?:=|:|=>)\s*"
    rb"(?:(?P<q>[\"'])[^\"'\s{}$<>%]{8,}(?P=q)"  # a quoted literal of 8 characters or more
    rb"|(?P<bare>[A-Za-z0-9/+=_\-.~]{16,})(?=[\s,;})\]]|$))",  # a bare value of a secret's alphabet (see find_secret)
    re.IGNORECASE | re.MULTILINE)
"""A literal value assigned to a secret-like key name, in any syntax: ``.s3cfg``'s ``secret_key = ...``,
JSON's ``"aws_secret_access_key": "..."``, a pasted boto3 response's ``'SecretAccessKey': '...'``, YAML's
``hub_token: ...``, ``.npmrc``'s ``_authToken=...``. Templates (``{...}``, ``${...}``, ``<...>``) pass."""

MAX_FILE_BYTES = 50 * 1024 * 1024


def find_secret(data: bytes) -> str | None:
    """What kind of secret `data` holds and on which line (never the value), or ``None``.

    UTF-16 and UTF-32 text (a byte-order mark) is decoded first, so a secret cannot hide between NUL bytes.

    >>> find_secret(b'{"aws_secret_access_key": "' + b"x" * 8 + b'"}')
    'a secret-like key with a literal value on line 1'
    >>> find_secret(b"max_new_tokens: 96") is None
    True
    """
    texts = [data]
    for bom, codec in ((b"\xff\xfe\x00\x00", "utf-32"), (b"\x00\x00\xfe\xff", "utf-32"), (b"\xff\xfe", "utf-16"),
                       (b"\xfe\xff", "utf-16")):
        if data.startswith(bom):
            texts.append(data.decode(codec, errors="replace").encode("utf-8"))
            break
    newline = b"\n"
    for text in texts:
        for what, rx in SECRET_SHAPES:
            match = rx.search(text)
            if match:
                return f"{what} on line {text.count(newline, 0, match.start()) + 1}"
        for match in SECRET_ASSIGNMENT.finditer(text):
            bare = match["bare"]
            # A bare value counts when it looks random (a digit, or mixed case): a secret, not a name such as
            # `turnwise/hf-token` in `--secret HF_TOKEN=turnwise/hf-token`.
            if bare is None or re.search(rb"[0-9]", bare) or (re.search(rb"[a-z]", bare) and re.search(rb"[A-Z]", bare)):
                return f"a secret-like key with a literal value on line {text.count(newline, 0, match.start()) + 1}"
    return None


_SPECIAL_TOKEN_KEY = re.compile(r"(?i)(?:.*_)?(?:pad|eos|bos|unk|sep|cls|mask|im_start|im_end|special|chat)_token")
SECRET_KEY_NAME = re.compile(
    r"(?i)(?:.*[_.-])?(?:secret|password|passwd|passphrase|api_?key|apikey|access_?key(?:_?id)?|secret_?access_?key"
    r"|secret_?key|session_?token|auth_?token|access_?token|refresh_?token|bearer_?token|hub_?token|hf_?token"
    r"|private_?key|credentials?|client_?secret|token)")
"""Option, recipe and environment keys that name a secret (``hub_token``, ``HF_TOKEN``, ``WANDB_API_KEY``,
``aws_secret_access_key``); ``pad_token`` and the other special-token names are not secrets."""


def secret_key(name: str) -> bool:
    return bool(SECRET_KEY_NAME.fullmatch(name)) and not _SPECIAL_TOKEN_KEY.fullmatch(name)


def secret_value(value: str) -> str | None:
    """What kind of secret `value` is by its shape (an ``hf_`` token, an AWS key id, ...), or ``None``."""
    found = find_secret(str(value).encode("utf-8", errors="replace"))
    return found.split(" on line")[0] if found and not found.startswith("a secret-like key") else None


SECRET_ROUTE = ("Secrets never go into a recipe, a hyperparameter or the job's request: put the value in AWS "
                "Secrets Manager and pass --secret NAME=SECRET_ID (submit(secrets={...})); the container reads it "
                "into the environment variable NAME at start-up. Settings that are not secret go in --env KEY=VALUE.")


def _printable(name: str) -> str:
    """`name` with control characters escaped, so a file name cannot forge a log line."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in name)


@dataclass
class Bundle:
    """A packaged source tree: the ``sourcedir.tar.gz`` and what went in or was left out (and why)."""

    path: Path
    files: list[str]
    excluded: list[tuple[str, str]]


def _excluded_dir(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in EXCLUDED_DIRS)


def _read_checked(path: Path) -> tuple[bytes | None, str | None]:
    """The file's bytes when it may travel, else ``(None, reason)``; the file is read once, so what was
    scanned is exactly what is packaged."""
    if path.is_symlink():
        return None, "symbolic link (not followed)"
    if not path.is_file():
        return None, "not a regular file"
    if any(fnmatch.fnmatch(path.name, pattern) for pattern in SECRET_FILES):
        return None, "secret file name"
    if any(fnmatch.fnmatch(path.name.lower(), pattern) for pattern in ARCHIVE_FILES):
        return None, "archive: its contents cannot be scanned for secrets"
    if path.stat().st_size > MAX_FILE_BYTES:
        return None, f"larger than {MAX_FILE_BYTES // 2**20} MiB"
    data = path.read_bytes()
    found = find_secret(data)
    if found:
        return None, f"holds a credential: {found}"
    return data, None


def _add(tar: tarfile.TarFile, path: Path, arcname: str, data: bytes) -> None:
    info = tar.gettarinfo(str(path), arcname=arcname)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_bundle(out_path: Path, source_dir: Path = SOURCE_ROOT, extra: Mapping[str, Path] | None = None) -> Bundle:
    """Write ``sourcedir.tar.gz`` of `source_dir` to `out_path`, leaving out what must not travel.

    Left out, and named with the reason (never the content): excluded directories, secret file names,
    files whose content holds a credential (`find_secret`: by value shape and by key name, in every file
    type), archives, symbolic links, special files and files over `MAX_FILE_BYTES`.
    ``requirements.txt`` at the root is ``sagemaker_entry/requirements.txt`` (the toolkit installs the root
    one). `extra` maps names inside the bundle to files outside the tree (a recipe kept elsewhere).
    """
    source_dir = Path(source_dir).resolve()
    if not (source_dir / ENTRY_POINT).is_file():
        raise FileNotFoundError(f"{source_dir} has no {ENTRY_POINT}; pass the turnwise source tree as source_dir.")
    files: list[str] = []
    excluded: list[tuple[str, str]] = []
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_dir = out_path.parent.resolve()
    with tarfile.open(out_path, "w:gz") as tar:
        for root, dirs, names in os.walk(source_dir):
            rel_root = Path(root).relative_to(source_dir)
            keep = []
            for d in sorted(dirs):
                path = Path(root) / d
                if _excluded_dir(d) or path.resolve() == out_dir:
                    excluded.append((str(rel_root / d) + "/", "excluded directory"))
                elif path.is_symlink():
                    excluded.append((str(rel_root / d) + "/", "symbolic link (not followed)"))
                else:
                    keep.append(d)
            dirs[:] = keep
            for name in sorted(names):
                path = Path(root) / name
                relative = str(rel_root / name)
                if path.resolve() == out_path.resolve():
                    continue
                data, reason = _read_checked(path)
                if reason:
                    excluded.append((relative, reason))
                    continue
                _add(tar, path, relative, data)
                files.append(relative)
        for arcname, path in {"requirements.txt": source_dir / "sagemaker_entry" / "requirements.txt",
                              **(extra or {})}.items():
            data, reason = _read_checked(Path(path))
            if reason:
                raise ValueError(f"{path} cannot be packaged: {reason}. Remove the credential from it; {SECRET_ROUTE}")
            _add(tar, Path(path), arcname, data)
            files.append(arcname)
    for name, reason in excluded:
        if reason != "excluded directory":
            logger.warning("left out of the source bundle: %s (%s)", _printable(name), reason)
    return Bundle(out_path, files, excluded)


# -- the request ----------------------------------------------------------------------------------

ENV_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
SECRET_ID = re.compile(r"(?:arn:aws[a-z-]*:secretsmanager:[a-z0-9-]+:\d{12}:secret:)?[A-Za-z0-9/_+=.@-]{1,512}")
HYPERPARAMETER_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,255}")
SECRET_ENV_PREFIX = "TURNWISE_SECRET_"
"""The job environment carries ``TURNWISE_SECRET_<NAME>=<secret id>``; the entry point resolves each into
``NAME`` with Secrets Manager before anything loads a model (`sagemaker_entry.environment.resolve_secrets`)."""
SECRETS_REGION_ENV = "TURNWISE_SECRETS_REGION"
RESERVED_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", SECRETS_REGION_ENV)
MLFLOW_ARN = re.compile(r"arn:aws[a-z\-]*:sagemaker:[a-z0-9\-]*:[0-9]{12}:mlflow-[a-zA-Z-]*/.+")


def check_recipe(recipe: Path) -> dict[str, Any]:
    """The recipe as a mapping; refuses one that holds a secret anywhere (nested keys and lists included).

    A recipe travels in the source bundle and its scalar values become hyperparameters, which SageMaker
    shows on the job's page and returns from DescribeTrainingJob: a secret has no business in either.
    """
    import yaml

    try:
        values = yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ValueError(f"Recipe {recipe} is not readable YAML: {error}") from None
    if not isinstance(values, dict):
        raise ValueError(f"Recipe {recipe} must be a YAML mapping of option: value.")

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                path = f"{where}.{key}" if where else str(key)
                if secret_key(str(key)) and value not in (None, "", True, False) and not isinstance(value, (dict, list)):
                    raise ValueError(f"Recipe {recipe}: {path} names a secret. {SECRET_ROUTE}")
                walk(value, path)
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}[{i}]")
        elif isinstance(node, str) and secret_value(node):
            raise ValueError(f"Recipe {recipe}: the value of {where} is {secret_value(node)}. {SECRET_ROUTE}")

    walk(values, "")
    return values


def check_hyperparameters(hyperparameters: Mapping[str, Any], where: str) -> None:
    """Keys the container can pass as ``--KEY VALUE`` options, and no secrets (by key name or value shape)."""
    for key, value in hyperparameters.items():
        key = str(key)
        if not HYPERPARAMETER_KEY.fullmatch(key):
            raise ValueError(f"Hyperparameter '{_printable(key)}' ({where}) is not an option name: the container passes "
                             "each hyperparameter as --KEY VALUE, so a key is a letter then letters, digits, '_', '.' "
                             "or '-' (256 characters at most).")
        if key.startswith("sagemaker_"):
            raise ValueError(f"Hyperparameter {key!r} ({where}) is reserved: SageMaker's training toolkit reads "
                             "sagemaker_* keys itself, and turnwise sets them.")
        if secret_key(key) and value not in (None, "", True, False):
            raise ValueError(f"Hyperparameter {key!r} ({where}) names a secret. {SECRET_ROUTE}")
        kind = secret_value(str(value))
        if kind:
            raise ValueError(f"The value of hyperparameter {key!r} ({where}) is {kind}. {SECRET_ROUTE}")


def check_environment(environment: Mapping[str, str], secrets: Mapping[str, str]) -> None:
    """``--env`` holds settings, never secrets; ``--secret`` maps a variable to a Secrets Manager secret id."""
    for name, value in environment.items():
        if not ENV_NAME.fullmatch(name) or len(name) > 512:
            raise ValueError(f"Environment variable name '{_printable(name)}' is invalid: a letter or '_', then "
                             "letters, digits or '_' (SageMaker's rule for a job's Environment).")
        if name in RESERVED_ENV or name.startswith(SECRET_ENV_PREFIX):
            raise ValueError(f"Environment variable {name} is set by turnwise or must not be set at all (the job "
                             "runs with its role's credentials); use --secret for secrets.")
        if secret_key(name):
            raise ValueError(f"Environment variable {name} names a secret, and --env values are sent in the request "
                             f"and shown by DescribeTrainingJob. Use --secret {name}=SECRET_ID instead. {SECRET_ROUTE}")
        kind = secret_value(value)
        if kind:
            raise ValueError(f"The value of environment variable {name} is {kind}. Use --secret {name}=SECRET_ID "
                             f"instead. {SECRET_ROUTE}")
        if len(value) > 512 or "\x00" in value:
            raise ValueError(f"The value of environment variable {name} is {len(value)} characters or holds a NUL; "
                             "SageMaker takes at most 512 characters per value.")
    for name, secret_id in secrets.items():
        if not ENV_NAME.fullmatch(name) or len(name) > 512 - len(SECRET_ENV_PREFIX):
            raise ValueError(f"--secret variable name '{_printable(name)}' is invalid: a letter or '_', then letters, "
                             "digits or '_'.")
        if name in RESERVED_ENV or name in environment:
            raise ValueError(f"--secret {name}: {name} is already set by --env or is reserved; pick one route.")
        base = secret_id.split("#", 1)[0]
        if secret_value(secret_id):
            raise ValueError(f"--secret {name}: that is a secret's value, not the name of a Secrets Manager secret. "
                             "Store the value in Secrets Manager (aws secretsmanager create-secret --name NAME "
                             "--secret-string ...) and pass --secret NAME=THAT_SECRET_NAME.")
        if not SECRET_ID.fullmatch(base) or ("#" in secret_id and not ENV_NAME.fullmatch(secret_id.split("#", 1)[1])):
            raise ValueError(f"--secret {name}='{_printable(secret_id)}': not a Secrets Manager secret name or ARN "
                             "(letters, digits and /_+=.@-, at most 512 characters), optionally with #JSON_KEY to pick "
                             "one key of a JSON secret.")


def check_mlflow(arn: str | None, experiment: str | None, run: str | None) -> None:
    if arn is None:
        if experiment is not None or run is not None:
            raise ValueError("--mlflow-experiment and --mlflow-run need --mlflow-arn (the SageMaker-managed MLflow "
                             "tracking server or app the job logs to).")
        return
    if not MLFLOW_ARN.fullmatch(arn) or len(arn) > 2048:
        raise ValueError(f"MLflow ARN '{_printable(arn)}' is not the ARN of a SageMaker-managed MLflow tracking server "
                         "or app; it looks like arn:aws:sagemaker:us-east-1:123456789012:mlflow-tracking-server/NAME "
                         "(SageMaker Studio -> MLflow, or aws sagemaker list-mlflow-tracking-servers).")
    for value, what in ((experiment, "--mlflow-experiment"), (run, "--mlflow-run")):
        if value is not None and (not 1 <= len(value) <= 256 or not value.isprintable()):
            raise ValueError(f"{what} '{_printable(value)}' must be 1-256 printable characters.")


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
    image_uri: str | None = field(default=None, metadata={
        "help": "Container image (default: the HF PyTorch DLC of dlc_version); warns when its tag names a torch or "
                "Python the stack does not run on."})
    dlc_version: str = field(default=DEFAULT_DLC_VERSION, metadata={"help": f"DLC version: {', '.join(DLC_TAGS)}."})
    inputs: dict[str, str] = field(default_factory=dict, metadata={
        "help": "Input channels (train, val, model): a local path (uploaded) or an s3:// URI (used as given)."})
    hyperparameters: dict[str, str] = field(default_factory=dict, metadata={
        "help": "Overrides of recipe values and entry-point options (merge_adapter, eval_limit, accelerate_config)."})
    tags: dict[str, str] = field(default_factory=dict, metadata={"help": "Tags on the job."})
    environment: dict[str, str] = field(default_factory=dict, metadata={
        "help": "Environment variables of the job's container (settings, never secrets: see secrets)."})
    secrets: dict[str, str] = field(default_factory=dict, metadata={
        "help": "Environment variable -> Secrets Manager secret name or ARN (optionally #JSON_KEY); the container "
                "reads each secret at start-up. The role needs secretsmanager:GetSecretValue on it."})
    mlflow_arn: str | None = field(default=None, metadata={
        "help": "ARN of a SageMaker-managed MLflow tracking server or app: the job's MlflowConfig; the trainer "
                "logs to it (report_to mlflow through the sagemaker-mlflow plugin)."})
    mlflow_experiment: str | None = field(default=None, metadata={"help": "MLflow experiment (with mlflow_arn)."})
    mlflow_run: str | None = field(default=None, metadata={"help": "MLflow run name (with mlflow_arn; default: the job name)."})
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
        check_recipe(recipe)
        check_hyperparameters(self.hyperparameters, "--hyperparameter")
        check_environment(self.environment, self.secrets)
        check_mlflow(self.mlflow_arn, self.mlflow_experiment, self.mlflow_run)
        if self.secrets and self.network_isolation:
            raise ValueError("--secret needs the container to reach Secrets Manager, which network isolation forbids; "
                             "drop --network-isolation, or supply what the secret unlocks as an input channel.")
        if self.mlflow_arn and self.network_isolation:
            raise ValueError("--mlflow-arn needs the container to reach the MLflow server, which network isolation "
                             "forbids; drop one of the two.")
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
        if len(self.tags) > 49:  # turnwise adds turnwise:recipe; SageMaker takes 50 tags in all
            raise ValueError(f"At most 49 tags per job (turnwise adds turnwise:recipe; SageMaker takes 50), got "
                             f"{len(self.tags)}.")
        for key in self.tags:
            if key.lower().startswith("aws:"):
                raise ValueError(f"Tag key {key!r} starts with 'aws:', which AWS reserves; pick another key.")
        if self.image_uri is not None:
            for warning in check_image_uri(self.image_uri, self.region):
                logger.warning("%s", warning)
        elif self.region is not None:
            image_uri(self.region, self.dlc_version)  # fail fast on an unknown region or version

    @property
    def s3_root(self) -> str:
        return f"s3://{self.bucket}/{self.prefix.strip('/')}/{self.job_name}".replace(f"{self.bucket}//", f"{self.bucket}/")


def recipe_hyperparameters(recipe: Path) -> dict[str, str]:
    """The recipe's scalar values as hyperparameters (lists and mappings stay in the YAML only).

    Refuses a recipe that holds a secret (`check_recipe`), so its values never reach the request.
    """
    values = check_recipe(recipe)
    scalars = {key: value for key, value in values.items()
               if isinstance(value, (str, int, float, bool)) and key != "output_dir"}
    check_hyperparameters(scalars, f"recipe {recipe}")
    return scalars


def recipe_arcname(config: SubmitConfig) -> tuple[str, dict[str, Path]]:
    """Where the recipe sits in the bundle, and the files to add because they sit outside the source tree."""
    recipe = Path(config.config).resolve()
    try:
        return str(recipe.relative_to(Path(config.source_dir).resolve())), {}
    except ValueError:
        name = f"recipes/{recipe.name}"
        return name, {name: recipe}


def job_environment(config: SubmitConfig, region: str) -> dict[str, str]:
    """The container's ``Environment``: the user's settings, the secret ids to resolve, and MLflow's URI."""
    environment = dict(config.environment)
    for name, secret_id in config.secrets.items():
        environment[f"{SECRET_ENV_PREFIX}{name}"] = secret_id
    if config.secrets:
        environment[SECRETS_REGION_ENV] = region
    if config.mlflow_arn:
        # The sagemaker-mlflow plugin (requirements.txt) turns an ARN tracking URI into SigV4-signed calls.
        environment.setdefault("MLFLOW_TRACKING_URI", config.mlflow_arn)
        if config.mlflow_experiment:
            environment.setdefault("MLFLOW_EXPERIMENT_NAME", config.mlflow_experiment)
    return environment


VLLM_IMAGE_HELP = (
    "use_vllm: true needs an image that carries vLLM, and none of the training images turnwise picks does: the "
    "vLLM releases that run transformers 5 (which turnwise needs) pin torch 2.11 (vLLM 0.25) or 2.13 (vLLM 0.30), "
    "while the Hugging Face training DLCs carry torch 2.8 and 2.9. Pass --image-uri of an image with one of those "
    "pairs (for example one built FROM a PyTorch DLC), or drop use_vllm to roll out with the HF backend.")
"""Why a vLLM run needs --image-uri (see the README's GPU section)."""


def build_request(config: SubmitConfig, region: str, source_uri: str, channels: Mapping[str, str]) -> dict[str, Any]:
    """The ``CreateTrainingJob`` parameters (SageMaker's hyperparameters are strings: JSON-encoded values)."""
    recipe_in_bundle, _ = recipe_arcname(config)
    from_recipe = recipe_hyperparameters(Path(config.config))
    if "model" in channels:  # the model channel is the base model: the recipe's model name must not override it
        from_recipe.pop("model_name_or_path", None)
    check_hyperparameters(config.hyperparameters, "--hyperparameter")
    hyperparameters: dict[str, Any] = {**from_recipe, **config.hyperparameters, "config": recipe_in_bundle}
    if config.mlflow_arn:  # the trainer's report_to; the run is named after the job unless told otherwise
        if "report_to" not in config.hyperparameters:
            hyperparameters["report_to"] = "mlflow"
        elif "mlflow" not in str(config.hyperparameters["report_to"]):
            logger.warning("--mlflow-arn is set but -H report_to=%s leaves MLflow out: the job will not log to it.",
                           config.hyperparameters["report_to"])
        hyperparameters.setdefault("run_name", config.mlflow_run or config.job_name)
    hyperparameters.update({
        "sagemaker_program": ENTRY_POINT,
        "sagemaker_submit_directory": source_uri,
        "sagemaker_container_log_level": 20,
        "sagemaker_region": region,
    })
    if config.instance_count > 1:
        hyperparameters["sagemaker_torch_distributed_enabled"] = True  # torchrun across the instances
    if not config.image_uri and str(hyperparameters.get("use_vllm", "")).strip().lower() in ("true", "1", "yes"):
        raise ValueError(VLLM_IMAGE_HELP)
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
    environment = job_environment(config, region)
    if environment:
        request["Environment"] = environment
    if config.mlflow_arn:
        request["MlflowConfig"] = {"MlflowResourceArn": config.mlflow_arn,
                                   **({"MlflowExperimentName": config.mlflow_experiment} if config.mlflow_experiment else {}),
                                   "MlflowRunName": config.mlflow_run or config.job_name}
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


RULE_HINTS = {
    "Tags": "letters, digits, spaces and _ . : / = + - @",
    "HyperParameters": "one line of text",
    "Environment": "a letter or '_', then letters, digits or '_'",
}
"""Plain words for the service model's patterns, by the request field they constrain."""


def _clip(text: str, limit: int = 100) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _service_rules(value: Any, shape, where: str, problems: list[str], sensitive: bool = False) -> None:
    """Check `value` against `shape`'s own constraints in the service model: the maximum lengths and sizes
    and the patterns that botocore's ParamValidator does not check (it checks types, required keys and minima).
    The patterns are SageMaker's (Java) regular expressions, matched in full; ``regex`` reads ``\\p{L}`` and
    the other Unicode classes they use."""
    import regex

    meta = shape.metadata
    kind = shape.type_name
    shown = (f"<the value of {where}, {len(value)} characters>" if sensitive and isinstance(value, str)
             else repr(_printable(value)) if isinstance(value, str) else repr(value))
    hint = RULE_HINTS.get(where.split("[")[0].split(".")[0], "")
    if kind == "structure" and isinstance(value, Mapping):
        for key, member in value.items():
            if key in shape.members:
                _service_rules(member, shape.members[key], f"{where}.{key}" if where else key, problems,
                               sensitive or key == "Environment")
    elif kind == "list" and isinstance(value, Sequence) and not isinstance(value, str):
        if "max" in meta and len(value) > meta["max"]:
            problems.append(f"{where} has {len(value)} entries; SageMaker takes at most {meta['max']}.")
        for i, item in enumerate(value):
            _service_rules(item, shape.member, f"{where}[{i}]", problems, sensitive)
    elif kind == "map" and isinstance(value, Mapping):
        if "max" in meta and len(value) > meta["max"]:
            problems.append(f"{where} has {len(value)} entries; SageMaker takes at most {meta['max']}.")
        for key, item in value.items():
            _service_rules(key, shape.key, f"{where} key {_printable(str(key))!r}", problems)
            _service_rules(item, shape.value, f"{where}[{_printable(str(key))!r}]", problems, sensitive)
    elif kind == "string" and isinstance(value, str):
        if "max" in meta and len(value) > meta["max"]:
            problems.append(f"{where} {_clip(shown)} is {len(value)} characters; SageMaker's rule is at most "
                            f"{meta['max']}.")
        pattern = meta.get("pattern")
        if pattern and not regex.fullmatch(pattern, value):
            problems.append(f"{where} {_clip(shown)} breaks SageMaker's rule: it must match the pattern {pattern}"
                            + (f" ({hint})." if hint else "."))


def validate_request(request: Mapping[str, Any]) -> None:
    """Check `request` against botocore's SageMaker service model: types, required keys and minima (botocore's
    ParamValidator), then every maximum length or size and every pattern (`_service_rules`), so that what
    SageMaker would reject fails here, before anything is uploaded or sent, naming the value and the rule."""
    import botocore.session
    from botocore.validate import ParamValidator

    model = botocore.session.get_session().get_service_model("sagemaker")
    shape = model.operation_model("CreateTrainingJob").input_shape
    report = ParamValidator().validate(dict(request), shape)
    if report.has_errors():
        raise ValueError(f"The CreateTrainingJob request is invalid:\n{report.generate_report()}")
    problems: list[str] = []
    _service_rules(dict(request), shape, "", problems)
    image = request.get("AlgorithmSpecification", {}).get("TrainingImage")
    if image is not None:
        try:
            check_image_uri(image)
        except ValueError as error:
            problems.append(str(error))
    if problems:
        raise ValueError("SageMaker would reject this CreateTrainingJob request:\n  " + "\n  ".join(problems))


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
