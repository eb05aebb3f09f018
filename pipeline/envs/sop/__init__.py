"""SOP task folders as a domain: follow a standard operating procedure with tools, then give a structured answer.

One folder in the public SOP-Bench format is one set of tasks (:mod:`pipeline.envs.sop.folder` reads and
checks it, through :mod:`pipeline.envs.sop.files`, which keeps every read inside the folder, and
:mod:`pipeline.envs.sop.code`, which reads tools.py without running it;
:mod:`pipeline.envs.sop.tasks` turns its rows into tasks, :mod:`pipeline.envs.sop.env` plays them,
:mod:`pipeline.envs.sop.oracle` holds the scripted experts of the shipped folders, and
:mod:`pipeline.envs.sop.trust` decides when a folder's tools.py may run). Commands name a folder as
``--env sop:PATH``; ``turnwise sop check PATH`` lints one; the reward defaults to ``configs/rewards/sop.yaml``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.envs.base import Task
from pipeline.envs.registry import Domain
from pipeline.envs.sop.env import SopEnv
from pipeline.envs.sop.grants import trust_environment
from pipeline.envs.sop.oracle import oracle_policy
from pipeline.envs.sop.tasks import check_sop_payload, load_sop_tasks

__all__ = ["DOMAIN", "SopEnv", "load_sop_tasks", "oracle_policy"]


def make_env(source: str | Path | Task | None = None, **kwargs: Any) -> SopEnv:
    """An SOP environment; a task or a folder (``PATH`` of ``sop:PATH``) is checked, with its trust, up front.

    ``trust_tools=True`` trusts that folder's tools.py (only that folder's); ``strict_tool_schema`` overrides
    the folder's setting (see :mod:`pipeline.envs.sop.env`).
    """
    folder = source.payload["folder"] if isinstance(source, Task) else source
    return SopEnv(folder=folder or None, **kwargs)


def load_tasks(argument: str | None, split: str | None) -> list[Task]:
    if not argument:
        raise ValueError("The sop domain needs a folder: pass sop:PATH, with PATH a folder in the SOP-Bench format "
                         "(for example sop:data/sop/warranty_claims).")
    return load_sop_tasks(argument, split)


DOMAIN = Domain(
    name="sop",
    make_env=make_env,
    load_tasks=load_tasks,
    check_payload=check_sop_payload,
    oracle_policy=oracle_policy,
    default_reward="sop",
    trust_environment=trust_environment,
    description="SOP-Bench task folders: an SOP, tool specs, a test set; the agent ends with a <final_output>.",
)
