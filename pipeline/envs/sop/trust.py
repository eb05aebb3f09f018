"""Trust in an SOP folder's tools.py: granted for one folder, as its code is now, for one run.

``tools.py`` is arbitrary Python. turnwise imports it only under a *grant*: the folder's resolved path and
the SHA-256 of its tools.py bytes. A grant never covers another folder, nor the same folder once its
tools.py changes, and the bytes that are executed are the bytes whose digest was checked.

Grants come from exactly three places:

- ``make_env(task_or_folder, trust_tools=True)`` (or ``SopEnv(folder, trust_tools=True)``): that folder,
  for that environment object;
- ``--trust-tools`` on ``turnwise eval``, ``audit``, ``score`` and ``train``: the SOP folders the command's
  ``--env`` (or ``tasks``) names, for that command; eval, audit and score restore the previous state
  when they return;
- the environment variable ``TURNWISE_TRUST_TOOLS``, holding grants as JSON, as
  ``turnwise sop trust PATH`` prints them. This is how a grant crosses into accelerate worker processes
  and subprocesses: exactly the granted folders and digests, never "trust everything".

A recipe cannot grant trust: :mod:`pipeline.config` refuses ``trust_tools`` in a recipe and a recipe
``env:`` block that sets ``TURNWISE_TRUST_TOOLS``. The old value ``TURNWISE_TRUST_TOOLS=1`` grants nothing;
the refusal says how to grant trust instead.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

TRUST_ENV = "TURNWISE_TRUST_TOOLS"
TOOLS_PY = "tools.py"
#: Values that used to mean "trust every folder"; they now grant nothing, and the refusal says so.
LEGACY_VALUES = frozenset({"1", "true", "yes", "on"})
HOW_TO_TRUST = (f"pass --trust-tools to `turnwise eval`, `train`, `audit` or `score` (it trusts the folder that --env "
                f"names, for that command); pass trust_tools=True to make_env for that folder; or, for processes you "
                f"start yourself, export {TRUST_ENV}=\"$(turnwise sop trust PATH)\"")


@dataclass(frozen=True)
class TrustGrant:
    """Permission to import one folder's tools.py, as long as its content has this SHA-256."""

    folder: str
    tools_sha256: str

    def to_dict(self) -> dict[str, str]:
        return {"folder": self.folder, "tools_sha256": self.tools_sha256}


def code_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def encode(grants: Iterable[TrustGrant]) -> str:
    """The value of ``$TURNWISE_TRUST_TOOLS`` that carries exactly ``grants``."""
    unique = sorted({(g.folder, g.tools_sha256) for g in grants})
    return json.dumps([TrustGrant(*g).to_dict() for g in unique], separators=(",", ":"))


class GrantError(ValueError):
    """``$TURNWISE_TRUST_TOOLS`` holds something that is not a list of grants."""


def decode(value: str) -> list[TrustGrant]:
    """The grants a ``$TURNWISE_TRUST_TOOLS`` value carries; raises :class:`GrantError` saying what is wrong."""
    text = value.strip()
    if not text or text.lower() in {"0", "false", "no", "off"}:
        return []
    if text.lower() in LEGACY_VALUES:
        raise GrantError(f"{TRUST_ENV}={value} no longer grants trust: it would trust every folder's tools.py in "
                         "the process and in every process it starts. Trust is now granted per folder and per "
                         "content of its tools.py")
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError):
        raise GrantError(f"{TRUST_ENV} is not a list of trust grants (it is not JSON)") from None
    if not isinstance(raw, list) or not all(isinstance(g, dict) and isinstance(g.get("folder"), str)
                                            and isinstance(g.get("tools_sha256"), str) for g in raw):
        raise GrantError(f'{TRUST_ENV} must be a JSON list of {{"folder": ..., "tools_sha256": ...}} grants')
    return [TrustGrant(g["folder"], g["tools_sha256"]) for g in raw]


def env_grant(folder: Path, environ: Mapping[str, str] | None = None) -> tuple[TrustGrant | None, str]:
    """The grant ``$TURNWISE_TRUST_TOOLS`` holds for ``folder`` (resolved), or ``(None, why there is none)``."""
    environ = os.environ if environ is None else environ
    value = environ.get(TRUST_ENV)
    if value is None:
        return None, f"{TRUST_ENV} is not set"
    try:
        grants = decode(value)
    except GrantError as exc:
        return None, str(exc)
    for grant in grants:
        try:
            granted = Path(grant.folder).resolve()
        except (OSError, RuntimeError, ValueError):
            continue
        if granted == folder:
            return grant, ""
    named = ", ".join(sorted({g.folder for g in grants})) or "no folder"
    return None, f"{TRUST_ENV} grants trust to {named}, not to this folder"


@contextmanager
def trusting(grants: Iterable[TrustGrant]) -> Iterator[str]:
    """Within the block, ``$TURNWISE_TRUST_TOOLS`` carries exactly ``grants``; the previous value comes back after."""
    previous = os.environ.get(TRUST_ENV)
    value = encode(grants)
    os.environ[TRUST_ENV] = value
    try:
        yield value
    finally:
        if previous is None:
            os.environ.pop(TRUST_ENV, None)
        else:
            os.environ[TRUST_ENV] = previous
