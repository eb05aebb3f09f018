"""Build (once) the Python environment a SageMaker training container builds for itself.

The container-stack test (tests/test_container_stack.py) runs the real training toolkit on this
environment instead of the development venv, because a job lives or dies by the image's stack: its torch,
its Python, the packages its Dockerfile installed, and what ``pip install -r requirements.txt`` (the
toolkit's own command, run in the source directory) makes of them. For one image of
`pipeline.sagemaker.DLC_IMAGES`, or for any DLC tag given on the command line, it makes a venv with:

1. the image's Python (``/root/.pyenv/versions/3.12.*`` and the like; when this machine has none, the
   running Python, recorded as a fallback in ``stack.json`` and reported by the test);
2. ``torch==<the image's torch>``: the registry has no CPU-only build of older torch for x86_64, so this
   is the CUDA build, several GB, which imports and runs on a CPU;
3. the image's own pins of the packages requirements.txt upgrades (``DLCImage.preinstalled``), and
   ``sagemaker-training``, as the image has them;
4. ``python -m pip install -r requirements.txt`` in a copy of the source directory, as the toolkit runs it.

The environment is cached in ``~/.cache/turnwise/container-env/<tag>-<key>/`` (``$TURNWISE_CONTAINER_ENVS``
moves it), keyed on the image's table entry, requirements.txt and the build steps (`RECIPE`), so CI builds it once per
change. A build writes ``stack.json`` (what got installed, and how long each step took) and then the
``.complete`` marker; a directory without the marker is a torn build and is rebuilt.

    python .ci/container_env.py build            # every image in the table (what `make test` runs)
    python .ci/container_env.py build --image 2.5.1-transformers4.49.0-gpu-py311-cu124-ubuntu22.04
    python .ci/container_env.py path --image 5.3 # where that environment is (built or not)
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.sagemaker import DLC_IMAGES, DLC_TAG, DLCImage  # noqa: E402  (stdlib-only module)

REQUIREMENTS = REPO / "sagemaker_entry" / "requirements.txt"
TOOLKIT = "sagemaker-training>=5.1,<6"  # the toolkit every DLC carries (unpinned in the Dockerfiles)
KEEP = 4  # environments kept in the cache; older ones are deleted (each is several GB)
RECIPE = 1  # bump when the build steps below change what an environment holds


def image_for(name: str) -> DLCImage:
    """A table entry by DLC version ("5.3"), or a DLC tag ("2.5.1-transformers4.49.0-gpu-py311-...")."""
    if name in DLC_IMAGES:
        return DLC_IMAGES[name]
    for image in DLC_IMAGES.values():
        if image.tag == name:
            return image
    match = DLC_TAG.match(name)
    if not match:
        raise SystemExit(f"{name!r} is neither a DLC version of the table ({', '.join(DLC_IMAGES)}) nor a DLC tag "
                         "like 2.9.0-transformers5.3.0-gpu-py312-cu130-ubuntu22.04.")
    # An image outside the table: its torch and Python from the tag; nothing else is known of it.
    return DLCImage(tag=name, torch=match["torch"], python=f"{match['py']}.{match['pyminor']}", cuda="?",
                    transformers="?", preinstalled=(), source="tag given on the command line")


def spec(image: DLCImage) -> dict:
    return {"image": asdict(image), "requirements": REQUIREMENTS.read_text(), "toolkit": TOOLKIT,
            "recipe": RECIPE}


def cache_root() -> Path:
    return Path(os.environ.get("TURNWISE_CONTAINER_ENVS", Path.home() / ".cache" / "turnwise" / "container-env"))


def env_dir(image: DLCImage) -> Path:
    key = hashlib.sha256(json.dumps(spec(image), sort_keys=True).encode()).hexdigest()[:12]
    return cache_root() / f"{image.tag}-{key}"


def find_python(version: str) -> tuple[str, bool]:
    """The interpreter for Python `version` ("3.12"): under pyenv, or on PATH; else this one (a fallback)."""
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    candidates = sorted(glob.glob(str(pyenv / "versions" / f"{version}.*" / "bin" / "python")), reverse=True)
    candidates.append(shutil.which(f"python{version}"))
    for candidate in candidates:  # a pyenv shim for a version that is not selected exits 127: try each
        if candidate and subprocess.run([candidate, "-c", "import venv"], capture_output=True).returncode == 0:
            return candidate, False
    return sys.executable, True


def run(command: list[str], cwd: Path | None = None) -> float:
    start = time.monotonic()
    print("+", " ".join(command), flush=True)
    subprocess.run(command, cwd=cwd, check=True)
    return time.monotonic() - start


def build(image: DLCImage) -> Path:
    target = env_dir(image)
    if (target / ".complete").exists():
        print(f"container env for {image.tag}: cached at {target}")
        return target
    shutil.rmtree(target, ignore_errors=True)  # a torn build
    target.parent.mkdir(parents=True, exist_ok=True)
    python, fallback = find_python(image.python)
    print(f"container env for {image.tag}: building at {target} (Python {image.python} "
          f"{'NOT FOUND, using ' + sys.version.split()[0] if fallback else 'from ' + python})", flush=True)
    seconds: dict[str, float] = {}
    started = time.monotonic()
    seconds["venv"] = run([python, "-m", "venv", str(target)])
    pip = [str(target / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    seconds["torch"] = run([*pip, f"torch=={image.torch}"])
    # The image's own pins, with its torch held in place, then the toolkit, as the Dockerfile installs them.
    seconds["image packages"] = run([*pip, f"torch=={image.torch}", *image.preinstalled, TOOLKIT])
    with tempfile.TemporaryDirectory(prefix="turnwise-code-") as code:  # the toolkit's cwd: the source dir
        shutil.copy(REQUIREMENTS, Path(code) / "requirements.txt")
        seconds["requirements.txt"] = run([str(target / "bin" / "python"), "-m", "pip", "install",
                                           "--disable-pip-version-check", "-q", "-r", "requirements.txt"], cwd=Path(code))
    freeze = subprocess.run([str(target / "bin" / "python"), "-m", "pip", "freeze"], capture_output=True, text=True,
                            check=True).stdout.split()
    seconds["total"] = time.monotonic() - started
    version = subprocess.run([str(target / "bin" / "python"), "-c", "import sys; print(sys.version.split()[0])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    stack = {"image": asdict(image), "python": version, "python_fallback": fallback, "seconds": seconds,
             "packages": freeze}
    (target / "stack.json").write_text(json.dumps(stack, indent=2) + "\n")
    (target / ".complete").write_text(time.strftime("%Y-%m-%dT%H:%M:%S") + "\n")
    print(f"container env for {image.tag}: built in {seconds['total']:.0f} s "
          f"({', '.join(f'{k} {v:.0f} s' for k, v in seconds.items() if k != 'total')})", flush=True)
    return target


def prune(keep: set[Path]) -> None:
    """Delete all but the `KEEP` most recently used environments (never one in `keep`)."""
    root = cache_root()
    if not root.is_dir():
        return
    envs = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
    for stale in [p for p in envs if p not in keep][max(KEEP - len(keep), 0):]:
        print(f"removing the stale container env {stale}")
        shutil.rmtree(stale, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("build", "path"))
    parser.add_argument("--image", action="append", default=[], help="DLC version or tag (default: every table entry)")
    args = parser.parse_args(argv)
    images = [image_for(name) for name in args.image] or list(DLC_IMAGES.values())
    if args.action == "path":
        for image in images:
            print(env_dir(image))
        return 0
    built = {build(image) for image in images}
    for path in built:
        os.utime(path)
    prune(built)
    return 0


if __name__ == "__main__":
    sys.exit(main())
