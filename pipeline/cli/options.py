"""Options several ``turnwise`` commands share, and the checks every command makes before it starts work.

The dataclasses here join each command's own (`pipeline.config.parse_options` parses them all the same
way), so a shared flag reads the same everywhere:

- :class:`TaskSetArguments`: ``--env`` (the task set) and ``--trust-tools`` (``eval``, ``audit``, ``score``;
  ``train`` has both in its ``TaskArguments``);
- :class:`ThreadArguments`: ``--threads`` (``train``, ``sft``, ``eval``, ``demo``), torch's CPU threads,
  set before any work;
- :class:`EpisodeArguments`: ``--customer`` and ``--tool-calling``, how live episodes are played (``eval``,
  ``audit``; ``train`` and ``sft`` read the same two options from their own dataclasses, ``demo`` takes
  ``--customer`` for every stage).

:func:`trusted` turns ``--trust-tools`` into the grant the task set's domain gives, for one command.

:func:`writable_dir` and :func:`writable_file` check an output location before a command spends minutes
producing what goes there.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.budgets import check_count

logger = logging.getLogger(__name__)


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on, within its cgroup's CPU quota.

    Hyper-threads share a core's arithmetic units, so torch's matmuls gain nothing from a second thread
    per core and lose to the contention; a container's quota (``docker --cpus``, a SageMaker instance
    share) caps what the CPUs the process sees can deliver. Falls back to the logical count where Linux's
    topology files are missing.
    """
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(),
                       (topology / "core_id").read_text().strip()))
        except OSError:
            cores = set(cpus)  # no topology: count what the process may use
            break
    count = len(cores) or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            count = min(count, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return count


def default_threads() -> int:
    """`physical_cores`, shared among the processes a launcher started on this machine (``LOCAL_WORLD_SIZE``)."""
    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    return max(1, physical_cores() // local)


@dataclass
class ThreadArguments:
    """How many CPU threads torch uses; set before the command does any work."""

    threads: int = field(default_factory=default_threads, metadata={
        "help": "torch CPU threads (default: this machine's physical cores that the process may use, divided among "
                "the processes of a distributed launch; logical cores add contention, not speed)."})

    def __post_init__(self) -> None:
        check_count(self.threads, "--threads", largest=4096)

    def apply(self) -> None:
        import torch

        torch.set_num_threads(self.threads)


@dataclass
class TaskSetArguments:
    """The task set a command runs on, and whether its SOP folder's tools.py may run."""

    env: str | None = field(default=None, metadata={
        "help": "Task set: a domain (NAME, NAME/VARIANT, or NAME:ARGUMENT such as sop:PATH for an SOP task folder), a "
                "directory of <split>.jsonl files or a .jsonl file (default: the default domain's shipped tasks)."})
    trust_tools: bool = field(default=False, metadata={
        "help": "Run the tools.py (Python code) of the SOP folder --env names, as it is now, for this command only."})


@dataclass
class EpisodeArguments:
    """Who plays the customer in live episodes, and how the model calls tools."""

    customer: str | None = field(default=None, metadata={
        "help": "The simulated customer: scripted (the domain's default) or llm:BACKEND, the domain's LLM customer on "
                "a chat backend (llm:hf:MODEL, llm:bedrock:MODEL_ID, llm:openai:MODEL@URL)."})
    tool_calling: str = field(default="auto", metadata={
        "help": "How a model calls tools: auto (in its chat template's own format when the template supports tools, "
                "else turnwise's <tool_call> text), native (fails without template support) or text."})

    def __post_init__(self) -> None:
        from pipeline.envs.registry import check_customer_spec
        from pipeline.native_tools import check_tool_calling

        check_tool_calling(self.tool_calling, "--tool-calling")
        check_customer_spec(self.customer)  # checked before any task loads or any policy runs


@contextlib.contextmanager
def trusted(task_set: TaskSetArguments) -> Iterator[None]:
    """With ``--trust-tools``, grant what the task set's domain grants (for an SOP folder: its tools.py as it is
    now) while the block runs, and nothing else.

    The grant is environment variables (`pipeline.envs.registry.trust_environment`), so worker processes
    inherit exactly it; the previous values come back when the block ends.
    """
    if not task_set.trust_tools:
        yield
        return
    from pipeline.envs.registry import trust_environment

    granted = trust_environment(task_set.env)
    if not granted:
        logger.warning("--trust-tools: the task set %s has no code to trust; nothing is trusted.", task_set.env)
    for key, value in granted.items():
        logger.info("--trust-tools: %s=%s for this command", key, value)
    previous = {key: os.environ.get(key) for key in granted}
    os.environ.update(granted)
    try:
        yield
    finally:  # the grant belongs to this call
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def writable_dir(path: Path, flag: str) -> Path:
    """Create ``path`` and prove a file can be written in it, before any work; ``ValueError`` naming ``flag`` if not."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file; give a directory (it is created if missing).")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".turnwise-write-check-"):
            pass
    except OSError as exc:
        raise ValueError(f"{flag} {path} cannot be written to ({exc.strerror or exc}); choose a directory you can "
                         "write to.") from None
    return path


def writable_file(path: Path, flag: str) -> Path:
    """Check that ``path`` can be written as a file (its directory is created), before any work."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a directory; give a file name, such as {path / 'out.json'}.")
    writable_dir(path.parent, f"{flag}'s directory")
    return path
