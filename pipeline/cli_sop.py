"""``turnwise sop check|trust``: lint an SOP folder, or grant trust to its tools.py (`pipeline.envs.sop`'s shell side).

Kept beside `pipeline.cli` (which lists `add_sop_parser` in its ``COMMANDS``); like the rest of the CLI it
is the only place here that prints. :func:`trust_tools_flag` is how ``--trust-tools`` on ``eval``,
``audit`` and ``score`` becomes a grant for the folders ``--env`` names, for that command only.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)


def add_sop_parser(subparsers) -> None:
    """``turnwise sop ...``: check an SOP-Bench-format folder, or print a trust grant for its tools.py."""
    parser = subparsers.add_parser(
        "sop",
        help="check an SOP task folder, or grant trust to its tools.py",
        description="SOP task folders in the public SOP-Bench format (--env sop:PATH).",
        epilog="examples:\n"
        "  turnwise sop check data/sop/warranty_claims\n"
        "  export TURNWISE_TRUST_TOOLS=\"$(turnwise sop trust path/to/folder)\"   # for processes you launch yourself",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="sop_action", required=True, metavar="ACTION")
    check = actions.add_parser(
        "check",
        help="list every problem of a folder: errors (it cannot run) and warnings",
        description="Read and check an SOP folder without running its tools.py, and list every problem at once, "
        "each with the file, the field or line, and the fix. Errors mean the folder cannot run; warnings "
        "(helpers without specs, spec/implementation mismatches, test-set values an enum does not allow, empty "
        "input cells, inferred columns) do not stop it. Exits 1 when there is an error, else 0.",
    )
    check.add_argument("folder", metavar="PATH", help="the folder (or sop:PATH)")
    check.set_defaults(func=run_sop_check)
    trust = actions.add_parser(
        "trust",
        help="print the TURNWISE_TRUST_TOOLS value that trusts this folder's tools.py as it is now",
        description="Print the trust grant for one folder's tools.py: its resolved path and the SHA-256 of its "
        "content. Export it as TURNWISE_TRUST_TOOLS for processes you start yourself (accelerate launch, a "
        "notebook kernel). It trusts no other folder, and stops working when tools.py changes. Read tools.py "
        "before you trust it: it runs with your permissions.",
    )
    trust.add_argument("folder", metavar="PATH", help="the folder (or sop:PATH)")
    trust.set_defaults(func=run_sop_trust)


def _folder(spec: str) -> Path:
    from pipeline.envs.sop.tasks import PREFIX, resolve_folder

    text = spec[len(PREFIX):] if spec.startswith(PREFIX) else spec
    path = Path(text).expanduser()
    return path if path.exists() else resolve_folder(spec)


def run_sop_check(args: argparse.Namespace) -> int:
    from pipeline.envs.sop.folder import inspect_folder

    check = inspect_folder(_folder(args.folder))
    for problem in check.errors + check.warnings:  # errors first: they are what stops the folder
        print(f"{problem.severity}: {problem.message}")
    errors, warnings = len(check.errors), len(check.warnings)
    summary = f"{check.path}: {errors} error{'s' * (errors != 1)}, {warnings} warning{'s' * (warnings != 1)}"
    folder = check.folder
    if folder is not None:
        code = f"{len(folder.code_tools)} in tools.py" if folder.code else "no tools.py"
        summary += (f"; {len(folder.table.rows)} tasks, {len(folder.specs)} tools ({code}), inputs "
                    f"{', '.join(folder.input_columns)}; outputs {', '.join(folder.output_columns)}; "
                    f"strict_tool_schema {'on' if folder.strict_tool_schema else 'off'}")
    print(summary)
    return 1 if errors else 0


def run_sop_trust(args: argparse.Namespace) -> int:
    from pipeline.envs.sop.grants import grant_for
    from pipeline.envs.sop.trust import TRUST_ENV, encode

    grant = grant_for(_folder(args.folder))
    if grant is None:
        print(f"turnwise: error: {args.folder} has no tools.py, so there is no code to trust.", file=sys.stderr)
        return 1
    print(encode([grant]))
    print(f"(trusts {grant.folder}/tools.py with SHA-256 {grant.tools_sha256}; export it as {TRUST_ENV})",
          file=sys.stderr)
    return 0


def trust_tools_flag(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Wrap a command so that ``--trust-tools`` grants trust to the SOP folders its ``--env`` names, for that call.

    The grant (:mod:`pipeline.envs.sop.trust`) goes into ``$TURNWISE_TRUST_TOOLS`` while the command runs,
    so that worker processes inherit exactly it, and the previous value comes back when it returns.
    """

    @functools.wraps(run)
    def with_trust(args: argparse.Namespace) -> int:
        if not getattr(args, "trust_tools", False):
            return run(args)
        from pipeline.envs.registry import trust_environment

        granted = trust_environment(getattr(args, "env", None))
        for key, value in granted.items():
            logger.info("--trust-tools: %s=%s for this command", key, value)
        previous = {key: os.environ.get(key) for key in granted}
        os.environ.update(granted)
        try:
            return run(args)
        finally:  # the grant belongs to this call: the previous values come back
            for key, value in previous.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    return with_trust
