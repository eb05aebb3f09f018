"""What a SageMaker training container tells its entry point, read from the environment.

The training toolkit (``sagemaker-training``) sets ``SM_*`` variables before it runs the entry point:
``SM_MODEL_DIR`` (uploaded as ``model.tar.gz`` when the job ends), ``SM_OUTPUT_DATA_DIR`` (uploaded as
``output.tar.gz``), ``SM_CHANNEL_<NAME>`` (one local directory per input channel), ``SM_NUM_GPUS``,
``SM_HOSTS`` and ``SM_CURRENT_HOST``. Managed spot training restores ``/opt/ml/checkpoints`` from S3 when
an interrupted job restarts; like the toolkit, the root ``/opt/ml`` moves with ``SAGEMAKER_BASE_DIR``, so
tests can run the real toolkit against a fake tree. Outside a container every location falls back to a
directory under the current one, so the entry points also run by hand. Secrets named in the job's
environment are read from Secrets Manager here too (`resolve_secrets`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path

BASE_DIR_ENV = "SAGEMAKER_BASE_DIR"
DEFAULT_BASE_DIR = "/opt/ml"


@dataclass(frozen=True)
class SageMakerEnv:
    """The container's locations and topology (see the module docstring for where each comes from)."""

    model_dir: Path
    output_data_dir: Path
    checkpoint_dir: Path
    channels: dict[str, Path] = field(default_factory=dict)
    num_gpus: int = 0
    hosts: tuple[str, ...] = ("algo-1",)
    current_host: str = "algo-1"

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> "SageMakerEnv":
        env = os.environ if environ is None else environ
        base = Path(env.get(BASE_DIR_ENV, DEFAULT_BASE_DIR))
        in_container = base.is_dir()
        local = Path("sagemaker_local")  # outside a container: everything lands in ./sagemaker_local/
        root = base if in_container else local
        channels = {key[len("SM_CHANNEL_"):].lower(): Path(value) for key, value in env.items()
                    if key.startswith("SM_CHANNEL_") and value}
        hosts = tuple(json.loads(env["SM_HOSTS"])) if env.get("SM_HOSTS") else ("algo-1",)
        current = env.get("SM_CURRENT_HOST", hosts[0])
        if current not in hosts:
            raise ValueError(f"SM_CURRENT_HOST={current!r} is not in SM_HOSTS={list(hosts)}; the container's "
                             "resource config is inconsistent.")
        return cls(
            model_dir=Path(env.get("SM_MODEL_DIR", root / "model")),
            output_data_dir=Path(env.get("SM_OUTPUT_DATA_DIR", root / "output" / "data")),
            checkpoint_dir=Path(env.get("TURNWISE_CHECKPOINT_DIR", root / "checkpoints")),
            channels=channels,
            num_gpus=int(env.get("SM_NUM_GPUS", "0") or 0),
            hosts=hosts,
            current_host=current,
        )

    @property
    def machine_rank(self) -> int:
        return self.hosts.index(self.current_host)

    def channel(self, name: str) -> Path | None:
        """The local directory of input channel `name`, if the job has it."""
        path = self.channels.get(name)
        if path is not None and not path.is_dir():
            raise FileNotFoundError(f"Input channel {name!r} points at {path}, which is not a directory.")
        return path


def pop_option(argv: list[str], name: str, default: str | None = None) -> str | None:
    """Remove ``--name VALUE`` (or ``--name=VALUE``) from `argv` and return VALUE (the last one wins)."""
    value = default
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == f"--{name}":
            if i + 1 >= len(argv):
                raise ValueError(f"--{name} needs a value.")
            value = argv[i + 1]
            del argv[i : i + 2]
        elif arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
            del argv[i]
        else:
            i += 1
    return value


def has_option(argv: list[str], name: str) -> bool:
    return any(a == f"--{name}" or a.startswith(f"--{name}=") for a in argv)


def as_bool(value: str | None, name: str) -> bool:
    if value is None:
        return False
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"Hyperparameter {name}={value!r} is not a boolean; use true or false.")


SECRET_ENV_PREFIX = "TURNWISE_SECRET_"
SECRETS_REGION_ENV = "TURNWISE_SECRETS_REGION"


def resolve_secrets(environ: MutableMapping[str, str] | None = None, client=None) -> list[str]:
    """Set each ``NAME`` from the Secrets Manager secret that ``TURNWISE_SECRET_NAME`` names; return the names.

    `turnwise sagemaker submit --secret NAME=SECRET_ID` puts only the secret's id in the job's environment.
    The entry points call this first, before anything loads a model, so a gated hub model sees ``HF_TOKEN``
    and the value never appears in the request, the hyperparameters or the logs (only names are logged).
    ``SECRET_ID#KEY`` picks one key of a JSON secret. A variable that is already set (a launcher's parent
    process resolved it) is left alone. Needs ``secretsmanager:GetSecretValue`` on each secret.
    """
    env = os.environ if environ is None else environ
    wanted = {key[len(SECRET_ENV_PREFIX):]: value for key, value in env.items()
              if key.startswith(SECRET_ENV_PREFIX) and key[len(SECRET_ENV_PREFIX):]}
    resolved = []
    for name, secret_ref in sorted(wanted.items()):
        if env.get(name):
            continue
        secret_id, _, json_key = secret_ref.partition("#")
        if client is None:
            import boto3

            region = env.get(SECRETS_REGION_ENV) or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
            client = boto3.client("secretsmanager", region_name=region)
        try:
            response = client.get_secret_value(SecretId=secret_id)
        except Exception as error:  # botocore's message names the secret and the missing permission, not a value
            raise RuntimeError(f"Cannot read Secrets Manager secret {secret_id!r} for {name}: {error}. The job's role "
                               "needs secretsmanager:GetSecretValue on it (and kms:Decrypt for a customer key).") from None
        value = response.get("SecretString")
        if value is None:
            raise RuntimeError(f"Secrets Manager secret {secret_id!r} for {name} is binary; store it as a string.")
        if json_key:
            try:
                value = json.loads(value)[json_key]
            except (ValueError, KeyError, TypeError):
                raise RuntimeError(f"Secrets Manager secret {secret_id!r} for {name} is not a JSON object with the "
                                   f"key {json_key!r}.") from None
            if not isinstance(value, str):
                raise RuntimeError(f"Key {json_key!r} of secret {secret_id!r} for {name} is not a string.")
        env[name] = value
        resolved.append(name)
    return resolved
