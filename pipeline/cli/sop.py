"""``turnwise sop check|trust``: lint an SOP folder, or grant trust to its tools.py (`pipeline.envs.sop`'s shell side).

``--trust-tools`` on ``eval``, ``audit`` and ``score`` is `pipeline.cli.options.trusted`, which asks the
domain the task set belongs to; ``turnwise sop trust`` prints the grant for processes started by hand.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DESCRIPTION = "SOP task folders in the public SOP-Bench format (--env sop:PATH)."
EPILOG = """examples:
  turnwise sop check data/sop/warranty_claims
  export TURNWISE_TRUST_TOOLS="$(turnwise sop trust path/to/folder)"   # for processes you launch yourself"""
CHECK = ("Read and check an SOP folder without running its tools.py, and list every problem at once, each with the "
         "file, the field or line, and the fix. Errors mean the folder cannot run; warnings (helpers without specs, "
         "spec/implementation mismatches, test-set values an enum does not allow, empty input cells, inferred "
         "columns) do not stop it. Exits 1 when there is an error, else 0.")
TRUST = ("Print the trust grant for one folder's tools.py: its resolved path and the SHA-256 of its content. Export "
         "it as TURNWISE_TRUST_TOOLS for processes you start yourself (accelerate launch, a notebook kernel). It "
         "trusts no other folder, and stops working when tools.py changes. Read tools.py before you trust it: it "
         "runs with your permissions.")


def register(subparsers) -> None:
    parser = subparsers.add_parser("sop", help="check an SOP task folder, or grant trust to its tools.py",
                                   description=DESCRIPTION, epilog=EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("check", add_help=False, help="list every problem of a folder: errors (it cannot run) and "
                       "warnings").set_defaults(run=run)
    actions.add_parser("trust", add_help=False, help="print the TURNWISE_TRUST_TOOLS value that trusts this folder's "
                       "tools.py as it is now").set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.config import parse_options

    [where] = parse_options((), args.options, prog=f"turnwise sop {args.action}",
                             description=CHECK if args.action == "check" else TRUST, recipe_flag=False,
                             positionals=[("folder", {"metavar": "PATH", "help": "the folder (or sop:PATH)"})])
    return run_check(where.folder) if args.action == "check" else run_trust(where.folder)


def _folder(spec: str) -> Path:
    from pipeline.envs.sop.tasks import PREFIX, resolve_folder

    text = spec[len(PREFIX):] if spec.startswith(PREFIX) else spec
    path = Path(text).expanduser()
    return path if path.exists() else resolve_folder(spec)


def run_check(spec: str) -> int:
    from pipeline.envs.sop.folder import inspect_folder

    check = inspect_folder(_folder(spec))
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


def run_trust(spec: str) -> int:
    from pipeline.envs.sop.grants import grant_for
    from pipeline.envs.sop.trust import TRUST_ENV, encode

    grant = grant_for(_folder(spec))
    if grant is None:
        print(f"turnwise: error: {spec} has no tools.py, so there is no code to trust.", file=sys.stderr)
        return 1
    print(encode([grant]))
    print(f"(trusts {grant.folder}/tools.py with SHA-256 {grant.tools_sha256}; export it as {TRUST_ENV})",
          file=sys.stderr)
    return 0
