"""SageMaker evaluation entry point: ``turnwise eval`` inside a training container.

The toolkit runs ``python sagemaker_entry/evaluate.py --key value ...``; the hyperparameters are the options
of ``turnwise eval`` (``max_turns`` and ``max-turns`` both name ``--max-turns``). This script only fills in
the container's locations and calls the same `pipeline.cli.main`:

- ``--model`` defaults to the ``model`` channel: a checkpoint, an adapter, or a training job's unpacked
  ``model.tar.gz`` (its ``adapter/`` is used);
- ``--env`` defaults to the ``test`` channel, else the ``val`` channel (directories of ``<split>.jsonl``);
- ``--out`` defaults to ``SM_MODEL_DIR/eval`` (the report travels in ``model.tar.gz``), and a copy of the
  report goes to ``SM_OUTPUT_DATA_DIR/eval``.
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (the toolkit does): make the source bundle importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sagemaker_entry.environment import SageMakerEnv, as_bool, has_option, pop_option, resolve_secrets

logger = logging.getLogger("sagemaker_entry.evaluate")


def model_in(channel: Path) -> Path:
    """The model inside a ``model`` channel: the channel itself, or a training job's ``adapter/``/``merged/``."""
    for candidate in (channel / "merged", channel / "adapter"):
        if candidate.is_dir():
            return candidate
    return channel


FLAGS = ("no-html", "trust-tools")
"""``turnwise eval`` switches; as hyperparameters they arrive with a value (``--no_html true``)."""


def eval_options(argv: list[str], sm: SageMakerEnv) -> list[str]:
    """``turnwise eval`` options: the hyperparameters (underscores read as dashes) plus the container's locations.

    The HTML page is off unless ``--html true``: it needs matplotlib, which the DLC does not promise.
    """
    options = [a.replace("_", "-") if a.startswith("--") else a for a in argv]
    html = as_bool(pop_option(options, "html", "false"), "html")
    for flag in FLAGS:
        if has_option(options, flag):
            value = pop_option(options, flag)
            if as_bool(value, flag.replace("-", "_")):
                options.append(f"--{flag}")
    if not html and "--no-html" not in options:
        options.append("--no-html")
    who = ("model", "policy", "trajectories")
    if not any(has_option(options, name) for name in who):
        channel = sm.channel("model")
        if channel is None:
            raise ValueError("No model to evaluate: attach a 'model' input channel or pass the model, policy or "
                             "trajectories hyperparameter.")
        options += ["--model", str(model_in(channel))]
    if not has_option(options, "env"):
        tasks = sm.channel("test") or sm.channel("val")
        if tasks is not None:
            options += ["--env", str(tasks)]
    if not has_option(options, "out"):
        options += ["--out", str(sm.model_dir / "eval")]
    return options


def main(argv: list[str] | None = None) -> int:
    from pipeline.cli import main as turnwise

    argv = list(sys.argv[1:] if argv is None else argv)
    for name in resolve_secrets():  # before anything loads a model; names only, never values
        logger.info("%s: set from Secrets Manager", name)
    sm = SageMakerEnv.from_environ()
    options = eval_options(argv, sm)
    status = turnwise(["eval", *options])
    out = Path(options[options.index("--out") + 1]) if "--out" in options else None
    if status == 0 and out is not None and out.is_dir():
        shutil.copytree(out, sm.output_data_dir / "eval", dirs_exist_ok=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
