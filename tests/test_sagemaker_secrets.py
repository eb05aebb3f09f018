"""Issue 21's SageMaker findings: secrets in the source bundle, secrets in a recipe, and a dry run that
accepted what SageMaker rejects.

Every planted secret is assembled at run time, so this file itself holds no secret-shaped string (it is
part of the source tree that `make_bundle` packages). The tests use only the public surface (`make_bundle`
and the ``turnwise sagemaker submit`` command), so they run unchanged against older checkouts too.
"""

from __future__ import annotations

import json
import logging
import tarfile
from pathlib import Path

import pytest

from pipeline.cli import main as turnwise
from pipeline.sagemaker import make_bundle

REPO = Path(__file__).resolve().parents[1]
ROLE = "arn:aws:iam::123456789012:role/SageMakerExecutionRole"
KEY_ID = "AKIA" + "TURNWISEPLANTED1"
SECRET = "".join(["kT9v/Qx2", "Lm8RpZ4w", "Yb7Nc3Hd", "Jf6Gs1Ae", "Uo5Xi0Pq"])  # 40 characters, an AWS secret's shape
HF = "hf_" + "".join(["QwErTyUiOp", "AsDfGhJkLz", "XcVbNmQwEr", "Ty12"])
NPM = "npm_" + "".join(["aB3dE5gH7j", "K9mN1pQ3sT", "5vW7yZ9bC1", "dE3fGh"])


def tree(root: Path, files: dict[str, str]) -> Path:
    for rel in ("sagemaker_entry/train.py", "sagemaker_entry/requirements.txt", "pipeline/training/train.py"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(f"# {rel}\n")
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


MISSED = {
    "aws_keys.json": json.dumps({"aws_access_key" + "_id_name": "reader", "aws_secret" + "_access_key": SECRET}),
    "tools/.s3cfg": f"[default]\nhost_base = s3.amazonaws.com\nsecret" + f"_key = {SECRET}\n",
    "notes/sts_response.txt": ("{'Credentials': {'SecretAccess" + f"Key': '{SECRET}', 'Expiration': "
                               "datetime.datetime(2026, 1, 1)}}\n"),
    "configs/hub.yaml": f"push_to_hub: true\nhub_model_id: me/agent\nnote: {HF}\n",
    "web/.npmrc": f"registry=https://example.invalid/\nalways-auth=true\n# {NPM}\n",
}


@pytest.mark.parametrize("name", sorted(MISSED))
def test_bundle_leaves_out_secrets_the_old_scan_missed(tmp_path, caplog, name):
    """21.2: each of these files used to be packaged; it is left out and named, and its value never shown."""
    source = tree(tmp_path / "src", {name: MISSED[name], "pipeline/ok.py": "token_count = 3\n"})
    caplog.set_level(logging.WARNING, logger="pipeline")
    bundle = make_bundle(tmp_path / "out" / "sourcedir.tar.gz", source)
    assert name not in bundle.files and "pipeline/ok.py" in bundle.files
    assert name in dict(bundle.excluded), bundle.excluded
    with tarfile.open(bundle.path) as tar:
        packed = b"".join(tar.extractfile(m).read() for m in tar.getmembers() if m.isfile())
    for value in (SECRET, HF, NPM):
        assert value.encode() not in packed and value not in caplog.text
    assert name in caplog.text  # the file is named in the warning


RECIPE_SECRETS = {
    "aws_secret_access_key": f"aws_secret" + f"_access_key: {SECRET}\n",
    "hub_token": f"hub" + f"_token: {HF}\n",
}


@pytest.mark.parametrize("key", sorted(RECIPE_SECRETS))
def test_recipe_secret_never_reaches_the_request(tmp_path, capsys, monkeypatch, key):
    """21.3: a recipe holding a secret-looking key is refused before anything is printed or sent, with the
    way to pass a secret; the value appears nowhere in the output."""
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    recipe = tmp_path / "leaky.yaml"
    recipe.write_text((REPO / "configs" / "grpo_cpu_quick.yaml").read_text() + RECIPE_SECRETS[key])
    status = turnwise(["sagemaker", "submit", "--config", str(recipe), "--role", ROLE, "--bucket", "my-bucket",
                       "--job-name", "leaky", "--dry-run"])
    out = capsys.readouterr()
    assert status != 0, "the dry run printed a request built from a recipe that holds a secret"
    assert key in out.err and "--secret" in out.err and "Secrets Manager" in out.err
    for value in (SECRET, HF):
        assert value not in out.out + out.err


IMAGE = "763104351884.dkr.ecr.us-east-1.amazonaws.com/huggingface-pytorch-training:"


@pytest.mark.parametrize("flags, named", [
    (["--tag", "cost#center=42"], "cost#center"),                      # '#' is outside the tag key pattern
    (["--tag", "team=" + "x" * 257], "257 characters"),               # tag values: at most 256
    (["--tag", "team=a;b"], "a;b"),                                    # ';' is outside the tag value pattern
    (["-H", "learning_rate\n--evil=1"], "learning_rate"),            # hyperparameter keys are one line
    (["--image-uri", "not an image"], "not an image"),
    (["--image-uri", IMAGE.upper() + "LATEST"], "HUGGINGFACE-PYTORCH-TRAINING"),  # repositories are lowercase
    (["--image-uri", IMAGE + "x" * 300], "255"),                      # TrainingImage: at most 255 characters
])
def test_dry_run_rejects_what_sagemaker_rejects(capsys, monkeypatch, flags, named):
    """21 (dry run): tags, hyperparameter keys and image URIs are checked against SageMaker's own rules
    before anything is sent; the error names the value and the rule."""
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    status = turnwise(["sagemaker", "submit", "--config", str(REPO / "configs" / "grpo_cpu_quick.yaml"),
                       "--role", ROLE, "--bucket", "my-bucket", "--job-name", "rules", *flags, "--dry-run"])
    out = capsys.readouterr()
    assert status != 0, f"the dry run accepted {flags}"
    assert named in out.err
