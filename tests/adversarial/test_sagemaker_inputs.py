"""Hostile inputs at the SageMaker boundary: what a careless or hostile source tree, recipe or flag can do.

Each test plants one thing and asserts what leaves the machine (the bundle, the request), what is said
(an error naming the file, field or value, never a secret) and what is not done. Planted secrets are built
at run time so that this file holds no secret-shaped string.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from pipeline.cli import main as turnwise
from pipeline.sagemaker import SOURCE_ROOT, SubmitConfig, build_request, make_bundle, split_pairs

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "configs" / "grpo_cpu_quick.yaml"
ROLE = "arn:aws:iam::123456789012:role/SageMakerExecutionRole"
KEY_ID = "AKIA" + "ADVERSARIAL00001"
HF = "hf_" + "".join(["Adv3rsar1a", "lT0kenVa1u", "eH3reN0tRe", "a1Zz"])


def tree(root: Path, files: dict[str, bytes] | None = None) -> Path:
    for rel in ("sagemaker_entry/train.py", "sagemaker_entry/requirements.txt", "pipeline/training/train.py"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(f"# {rel}\n")
    for rel, data in (files or {}).items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def packed(bundle) -> dict[str, bytes]:
    with tarfile.open(bundle.path) as tar:
        assert all(m.isfile() for m in tar.getmembers()), "the bundle holds a link or a special file"
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_the_real_source_tree_loses_nothing_to_the_scanner(tmp_path):
    """The guard against false positives: every file git tracks in turnwise travels."""
    import subprocess

    tracked = subprocess.run(["git", "ls-files"], cwd=SOURCE_ROOT, capture_output=True, text=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    bundle = make_bundle(tmp_path / "sourcedir.tar.gz")
    flagged = {name: why for name, why in bundle.excluded if name in tracked}
    assert flagged == {}


def test_utf16_text_file_cannot_hide_a_key_between_nul_bytes(tmp_path):
    text = f"deploy notes\naws_access_key_id = {KEY_ID}\n"
    bundle = make_bundle(tmp_path / "o" / "s.tar.gz", tree(tmp_path / "src", {"notes.txt": text.encode("utf-16")}))
    assert dict(bundle.excluded)["notes.txt"].startswith("holds a credential: an AWS access key id")


def test_token_in_a_notebook_output_cell(tmp_path):
    notebook = {"cells": [{"cell_type": "code", "source": "!env", "outputs": [
        {"output_type": "stream", "name": "stdout", "text": f"HOME=/root\nHUGGING_FACE_HUB_CREDENTIAL={HF}\n"}]}]}
    files = {"examples/explore.ipynb": json.dumps(notebook, indent=1).encode()}
    bundle = make_bundle(tmp_path / "o" / "s.tar.gz", tree(tmp_path / "src", files))
    assert "examples/explore.ipynb" in dict(bundle.excluded)
    assert all(HF.encode() not in data for data in packed(bundle).values())


def test_secret_in_a_binary_pickle(tmp_path):
    import pickle

    blob = pickle.dumps({"weights": [0.1] * 100, "hub": HF})
    bundle = make_bundle(tmp_path / "o" / "s.tar.gz", tree(tmp_path / "src", {"data/cache.pkl": blob}))
    assert dict(bundle.excluded)["data/cache.pkl"].startswith("holds a credential: a Hugging Face token")


def test_symlink_out_of_the_tree_is_not_followed(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "id.txt").write_text("the home directory's file\n")
    (outside / "notes").mkdir()
    (outside / "notes" / "private.md").write_text("not for the bucket\n")
    source = tree(tmp_path / "src")
    (source / "configs").mkdir()
    (source / "configs" / "link.yaml").symlink_to(outside / "id.txt")
    (source / "docs").symlink_to(outside / "notes", target_is_directory=True)
    bundle = make_bundle(tmp_path / "o" / "s.tar.gz", source)
    reasons = dict(bundle.excluded)
    assert reasons["configs/link.yaml"] == "symbolic link (not followed)" and reasons["docs/"] == "symbolic link (not followed)"
    assert not any(b"not for the bucket" in d or b"home directory" in d for d in packed(bundle).values())


def test_huge_file_is_left_out_without_being_read(tmp_path):
    source = tree(tmp_path / "src")
    with open(source / "checkpoint.bin", "wb") as f:  # sparse: 60 MiB on paper, nothing on disk
        f.truncate(60 * 2**20)
    start = time.monotonic()
    bundle = make_bundle(tmp_path / "o" / "s.tar.gz", source)
    assert dict(bundle.excluded)["checkpoint.bin"] == "larger than 50 MiB"
    assert time.monotonic() - start < 5 and bundle.path.stat().st_size < 2**20


def test_fifo_does_not_hang_the_bundle(tmp_path):
    source = tree(tmp_path / "src")
    os.mkfifo(source / "pipe")
    bundle = make_bundle(tmp_path / "o" / "s.tar.gz", source)  # reading a FIFO would block forever
    assert dict(bundle.excluded)["pipe"] == "not a regular file"


def test_archive_is_left_out_because_it_cannot_be_scanned(tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("creds/config", f"[default]\naws_access_key_id = {KEY_ID}\n")
    bundle = make_bundle(tmp_path / "o" / "s.tar.gz", tree(tmp_path / "src", {"backup.zip": buffer.getvalue()}))
    assert dict(bundle.excluded)["backup.zip"] == "archive: its contents cannot be scanned for secrets"


def test_file_name_cannot_forge_a_log_line(tmp_path, caplog):
    name = "notes\nWARNING all files packaged.txt"
    caplog.set_level(logging.WARNING, logger="pipeline")
    bundle = make_bundle(tmp_path / "o" / "s.tar.gz", tree(tmp_path / "src", {name: f"key={KEY_ID}\n".encode()}))
    assert name in dict(bundle.excluded)
    assert "notes\\nWARNING all files packaged.txt" in caplog.text
    assert not any(line.startswith("WARNING all files") for line in caplog.text.splitlines())


def recipe_with(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.read_text() + text)
    return path


def test_nested_secret_in_a_recipe_is_refused_by_path(tmp_path):
    recipe = recipe_with(tmp_path, f"simulator:\n  kind: openai\n  options:\n    api_key: sk-{'Q' * 40}\n")
    with pytest.raises(ValueError, match=r"simulator\.options\.api_key names a secret.*--secret") as error:
        SubmitConfig(config=str(recipe), role=ROLE, bucket="b-1")
    assert "Q" * 40 not in str(error.value)


def test_secret_shaped_value_under_an_innocent_key_is_refused(tmp_path):
    recipe = recipe_with(tmp_path, f"notes: [first run, '{HF}']\n")
    with pytest.raises(ValueError, match=r"the value of notes\[1\] is a Hugging Face token") as error:
        SubmitConfig(config=str(recipe), role=ROLE, bucket="b-1")
    assert HF not in str(error.value)


def test_recipe_yaml_cannot_run_code(tmp_path):
    marker = tmp_path / "ran"
    recipe = recipe_with(tmp_path, f"evil: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ValueError, match=f"Recipe {recipe} is not readable YAML"):
        SubmitConfig(config=str(recipe), role=ROLE, bucket="b-1")
    assert not marker.exists()


def test_binary_recipe_gets_a_sentence_naming_the_file(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(b"\xff\xfe\x00garbage\x81")
    with pytest.raises(ValueError, match=f"Recipe {recipe} is not readable YAML"):
        SubmitConfig(config=str(recipe), role=ROLE, bucket="b-1")


@pytest.mark.parametrize("arn", [
    "arn:aws:sagemaker:us-east-1:123456789012:mlflow-tracking-server/",               # no name
    "arn:aws:sagemaker:us-east-1:12345:mlflow-tracking-server/x",                      # short account
    "arn:aws:sagemaker:us-east-1:123456789012:mlflow-tracking-server/x\nInjected: 1",  # a second line
    "arn:aws:sagemaker:us-east-1:123456789012:mlflow-tracking-server/" + "x" * 2100,   # over 2048
    "https://my-mlflow.example.com",                                                    # a URL, not an ARN
])
def test_malformed_mlflow_arn(arn):
    with pytest.raises(ValueError, match="not the ARN of a SageMaker-managed MLflow"):
        SubmitConfig(config=str(RECIPE), role=ROLE, bucket="b-1", mlflow_arn=arn)


def test_pasted_secret_without_equals_is_not_echoed():
    with pytest.raises(ValueError, match="--secret argument 1 must look like KEY=VALUE") as error:
        split_pairs([HF], "--secret")
    assert HF not in str(error.value)
    with pytest.raises(ValueError, match="--env argument 1 must look like") as error:
        split_pairs([HF], "--env")
    assert HF not in str(error.value)


def test_hyperparameter_cannot_replace_the_recipe_or_the_entry_point(tmp_path):
    config = SubmitConfig(config=str(RECIPE), role=ROLE, bucket="b-1", job_name="j",
                          hyperparameters={"config": "/etc/passwd"})
    request = build_request(config, "us-east-1", "s3://b-1/s.tar.gz", {})
    assert json.loads(request["HyperParameters"]["config"]) == "configs/grpo_cpu_quick.yaml"
    with pytest.raises(ValueError, match="'sagemaker_submit_directory' .* is reserved"):
        SubmitConfig(config=str(RECIPE), role=ROLE, bucket="b-1",
                     hyperparameters={"sagemaker_submit_directory": "s3://attacker/code.tar.gz"})
    with pytest.raises(ValueError, match="not an option name"):
        SubmitConfig(config=str(RECIPE), role=ROLE, bucket="b-1", hyperparameters={"--lr": "1"})


def test_environment_value_over_sagemakers_limit(tmp_path):
    with pytest.raises(ValueError, match="at most 512 characters"):
        SubmitConfig(config=str(RECIPE), role=ROLE, bucket="b-1", environment={"NOTE": "x" * 513})


def test_fifty_user_tags_plus_turnwises_own_would_be_rejected(capsys, monkeypatch):
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    tags = [arg for i in range(50) for arg in ("--tag", f"k{i}=v")]
    status = turnwise(["sagemaker", "submit", "--config", str(RECIPE), "--role", ROLE, "--bucket", "b-1",
                       "--job-name", "tags", *tags, "--dry-run"])
    assert status != 0 and "At most 49 tags" in capsys.readouterr().err


@pytest.mark.parametrize("uri", [
    "pytorch-training:2.9.0",                                            # no registry
    "763104351884.dkr.ecr.us-east-1.amazonaws.com/huggingface-pytorch-training",  # no tag or digest
    "763104351884.dkr.ecr.us-east-1.amazonaws.com/repo:tag with space",
    "763104351884.dkr.ecr.us-east-1.amazonaws.com/repo@sha256:1234",     # a truncated digest
])
def test_unpullable_image_uris(uri, capsys, monkeypatch):
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    status = turnwise(["sagemaker", "submit", "--config", str(RECIPE), "--role", ROLE, "--bucket", "b-1",
                       "--job-name", "img", "--image-uri", uri, "--dry-run"])
    err = capsys.readouterr().err
    assert status != 0 and "is not a registry path SageMaker can pull" in err and uri in err


def test_image_in_another_region_warns(caplog):
    caplog.set_level(logging.WARNING, logger="pipeline.sagemaker")
    SubmitConfig(config=str(RECIPE), role=ROLE, bucket="b-1", region="eu-west-1",
                 image_uri="763104351884.dkr.ecr.us-east-1.amazonaws.com/huggingface-pytorch-training:"
                           "2.9.0-transformers5.3.0-gpu-py312-cu130-ubuntu22.04")
    assert "is in us-east-1, the job runs in eu-west-1" in caplog.text
