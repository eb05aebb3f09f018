"""The ``turnwise`` command: one module per command, every command's options read from typed dataclasses.

Each command is a module of this package with two functions, as in TRL's ``trl/cli``:
``register(subparsers)`` adds it to ``turnwise --help`` and ``run(args) -> int`` runs it. ``run`` reads
the command's options (``args.options``, everything after its name) with `pipeline.config.parse_options`,
from dataclasses whose fields carry the help texts, so every option is spelt ``--max-turns`` or
``--max_turns`` alike, ``--config FILE.yaml`` supplies options where a command takes a recipe, and
``turnwise COMMAND --help`` lists them. ``register`` imports nothing heavy: ``turnwise --help`` is instant.

This package is the only place in turnwise that prints; libraries log.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from pipeline import __version__

COMMANDS = ("model", "demo", "eval", "sft", "train", "audit", "score", "rm", "sagemaker", "sop")
"""The command modules of this package, in the order ``turnwise --help`` lists them."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="turnwise", description="Multi-turn reinforcement learning for LLM agents.")
    parser.add_argument("--version", action="version", version=f"turnwise {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, and full tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``turnwise`` command line; return the process exit status."""
    args, options = build_parser().parse_known_args(sys.argv[1:] if argv is None else list(argv))
    args.options = options  # the command's own, parsed by its run()
    _configure_logging(verbose=args.verbose)
    try:
        return args.run(args)
    except (ValueError, OSError) as error:
        # These carry messages written for the user (what is wrong, how to fix it); a traceback adds
        # noise. --verbose shows it anyway.
        if args.verbose:
            raise
        print(f"turnwise: error: {error}", file=sys.stderr)
        return 1


def _configure_logging(verbose: bool) -> None:
    """turnwise's own loggers at INFO (DEBUG with -v), everyone else's at WARNING."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for name in ("pipeline", "rewards", "sagemaker_entry"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)
