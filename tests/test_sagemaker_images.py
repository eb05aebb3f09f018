"""The training images `submit` can pick carry a torch and a Python that the pinned stack accepts.

The floors are read from the installed packages themselves, never restated here: transformers' torch floor
from the code that enforces it (``is_torch_available``), each package's torch requirement and
``Requires-Python`` from its metadata, over every package sagemaker_entry/requirements.txt installs and
everything those pull in.
"""

from __future__ import annotations

import inspect
import logging
import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from pipeline.sagemaker import (DEFAULT_DLC_VERSION, DLC_IMAGES, STACK_FLOORS, SubmitConfig, build_request,
                                check_image_uri, image_uri)

REPO = Path(__file__).resolve().parents[1]
ROLE = "arn:aws:iam::123456789012:role/SageMakerExecutionRole"


def container_requirements() -> list[Requirement]:
    lines = (REPO / "sagemaker_entry" / "requirements.txt").read_text().splitlines()
    return [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]


def installed_closure() -> dict[str, metadata.Distribution]:
    """The installed distributions of requirements.txt and everything they require (extras ignored)."""
    seen: dict[str, metadata.Distribution] = {}
    todo = [r.name for r in container_requirements()]
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional package this machine lacks (the `sagemaker` extra in a plain dev venv)
        seen[key] = dist
        for text in dist.requires or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return seen


def transformers_torch_floor() -> Version:
    """The torch version below which transformers disables torch, as its own code states it."""
    from transformers.utils import import_utils

    source = inspect.getsource(import_utils.is_torch_available)
    floors = re.findall(r"""version\.parse\(["']([0-9.]+)["']\)""", source)
    assert floors, f"transformers.utils.import_utils.is_torch_available no longer states a floor:\n{source}"
    return max(Version(v) for v in floors)


def torch_requirements(closure) -> dict[str, SpecifierSet]:
    out = {}
    for key, dist in closure.items():
        for text in dist.requires or []:
            requirement = Requirement(text)
            if requirement.name == "torch" and (requirement.marker is None or requirement.marker.evaluate({"extra": ""})):
                out[key] = requirement.specifier
    return out


def test_the_closure_is_what_requirements_txt_installs():
    closure = installed_closure()
    assert {"transformers", "trl", "peft", "accelerate", "datasets", "numpy", "huggingface-hub"} <= set(closure)


@pytest.mark.parametrize("version", sorted(DLC_IMAGES))
def test_every_table_image_is_at_or_above_the_stacks_floors(version):
    image = DLC_IMAGES[version]
    closure = installed_closure()
    torch = Version(image.torch)
    assert torch >= transformers_torch_floor(), f"{image.tag}: transformers would disable torch {torch}"
    for package, specifier in torch_requirements(closure).items():
        assert specifier.contains(torch), f"{image.tag}: {package} requires torch{specifier}"
    python = Version(image.python)
    for package, dist in closure.items():
        requires_python = dist.metadata.get("Requires-Python")
        if requires_python:
            assert SpecifierSet(requires_python).contains(python), \
                f"{image.tag}: {package} {dist.version} requires Python {requires_python}"
    # The tag says what the table says: torch first, then pyXY and cuXYZ.
    assert image.tag.startswith(f"{image.torch}-transformers{image.transformers}-gpu-py{image.python.replace('.', '')}-"
                                f"cu{image.cuda.replace('.', '')}-")


def test_stack_floors_are_the_installed_packages_floors():
    """`STACK_FLOORS` (what --image-uri warns against) is what the packages say, not a guess."""
    closure = installed_closure()
    assert Version(STACK_FLOORS["torch"]) == transformers_torch_floor()
    python_floors = [Version(m.group(1)) for dist in closure.values()
                     for m in [re.search(r">=\s*([0-9.]+)", dist.metadata.get("Requires-Python") or "")] if m]
    assert Version(STACK_FLOORS["python"]) == max(python_floors)


def test_pyproject_torch_range_starts_at_the_oldest_image():
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    torch = next(Requirement(d) for d in dependencies if Requirement(d).name == "torch")
    oldest = min(Version(image.torch) for image in DLC_IMAGES.values())
    assert torch.specifier.contains(oldest)
    assert not torch.specifier.contains(Version(f"{oldest.major}.{oldest.minor - 1}"))
    import torch as installed

    assert torch.specifier.contains(Version(installed.__version__.split("+")[0]))


def test_pyproject_requires_the_python_the_stack_requires():
    """requires-python once said 3.10, where no release of the pinned stack installs (numpy, transformers and trl
    need 3.11): a 3.10 user got a resolver failure instead of pip's clear 'requires a different Python'."""
    declared = SpecifierSet(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"])
    floor = Version(STACK_FLOORS["python"])
    assert declared.contains(floor)
    assert not declared.contains(Version(f"{floor.major}.{floor.minor - 1}"))


def test_default_image_uri_is_the_default_table_entry():
    uri = image_uri("us-west-2")
    assert uri == ("763104351884.dkr.ecr.us-west-2.amazonaws.com/huggingface-pytorch-training:"
                   + DLC_IMAGES[DEFAULT_DLC_VERSION].tag)
    assert image_uri("cn-north-1").startswith("727897471807.dkr.ecr.cn-north-1.amazonaws.com.cn/")


OLD = "763104351884.dkr.ecr.us-east-1.amazonaws.com/huggingface-pytorch-training:"


@pytest.mark.parametrize("tag, warns", [
    ("2.5.1-transformers4.49.0-gpu-py311-cu124-ubuntu22.04", "torch 2.5.1"),
    ("2.1.0-transformers4.36.0-gpu-py310-cu121-ubuntu20.04", "Python 3.10"),
    ("2.6.0-gpu-py310-cu124-ubuntu22.04-sagemaker", "Python 3.10"),
])
def test_image_uri_warns_for_an_incompatible_tag(caplog, tag, warns):
    caplog.set_level(logging.WARNING, logger="pipeline.sagemaker")
    config = SubmitConfig(config=str(REPO / "configs" / "sagemaker" / "grpo_g5.yaml"), role=ROLE, bucket="b-1",
                          job_name="j", region="us-east-1", image_uri=OLD + tag)
    assert warns in caplog.text and "start-up" in caplog.text
    request = build_request(config, "us-east-1", "s3://b-1/s.tar.gz", {})
    assert request["AlgorithmSpecification"]["TrainingImage"] == OLD + tag  # a warning, not a refusal


@pytest.mark.parametrize("version", sorted(DLC_IMAGES))
def test_table_images_raise_no_warning(version):
    assert check_image_uri(image_uri("us-east-1", version), "us-east-1") == []


def test_every_shipped_sagemaker_recipe_dry_runs_on_a_table_image(monkeypatch):
    """Acceptance: a dry run of each shipped SageMaker recipe passes botocore's validator and SageMaker's
    own rules, and names an image whose torch and Python the stack accepts."""
    from pipeline.sagemaker import submit, validate_request

    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for recipe in sorted((REPO / "configs" / "sagemaker").glob("*.yaml")):
        request = submit(SubmitConfig(config=str(recipe), role=ROLE, bucket="b-1", job_name="dry"), dry_run=True)
        validate_request(request)
        image = request["AlgorithmSpecification"]["TrainingImage"]
        assert image.split(":")[-1] in {i.tag for i in DLC_IMAGES.values()} and check_image_uri(image) == []
