"""Trust grants for the SOP folders a task spec names (``--trust-tools``).

Kept apart from :mod:`pipeline.envs.sop.trust` (the grant format, read by the folder loader) because
making a grant loads the folder first: a grant only exists for a folder that loads.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.envs.registry import resolve
from pipeline.envs.sop.folder import load_folder
from pipeline.envs.sop.tasks import resolve_folder
from pipeline.envs.sop.trust import TRUST_ENV, TrustGrant, encode
from pipeline.envs.tasks import load_tasks


def grant_for(folder: str | Path) -> TrustGrant | None:
    """The grant for a folder's tools.py as it is now (``None`` when the folder has no tools.py).

    The folder is checked first (:func:`~pipeline.envs.sop.folder.load_folder`), so a grant only exists
    for a folder that loads, and its tools.py is read through the same safe reader the import uses.
    """
    loaded = load_folder(folder)
    if loaded.code is None:
        return None
    return TrustGrant(str(loaded.path), loaded.code.sha256)


def grants_for_spec(spec: str | None) -> list[TrustGrant]:
    """The grants ``--trust-tools`` gives for a task spec: every SOP folder with a tools.py that it names.

    ``sop:PATH`` names one folder; a task file or directory names the folders of its SOP tasks. Other
    task sets name none (there is no code to trust).
    """
    if spec is None:
        return []
    resolved = resolve(spec)
    if resolved is not None:
        domain, argument = resolved
        if domain.name != "sop":
            return []
        folders = [resolve_folder(argument)] if argument else []
    else:
        folders = sorted({resolve_folder(t.payload["folder"]) for t in load_tasks(spec) if t.domain == "sop"})
    grants = [grant_for(folder) for folder in folders]
    return [g for g in grants if g is not None]


def trust_environment(spec: str | None) -> dict[str, str]:
    """The environment variable that grants trust to exactly the tools.py of the folders ``spec`` names (an
    empty grant when it names none, which also withdraws any grant the process had)."""
    return {TRUST_ENV: encode(grants_for_spec(spec))}
