"""The domain registry: how the framework finds environments, tasks, oracles and rewards without naming them.

A *domain* is one package of domain logic: an environment (its sandbox, tools and policy), its tasks and
their validator, a scripted oracle, a default customer and a default reward. It registers one
:class:`Domain` record, and everything else (``make_env``, ``load_tasks``, ``oracle_policy``, the CLI's
``--env``, the reward's evidence rules, the audit's hacking policies) asks the registry. Adding a domain
is a package with a ``DOMAIN`` record, or one :func:`register_domain` call; no framework file changes.

Domains are found, in this order, the first time a name is looked up:

1. :func:`register_domain` calls (from a test file, a notebook, a plugin's import);
2. the subpackages of :mod:`pipeline.envs` that define ``DOMAIN`` (the domains turnwise ships);
3. the ``turnwise.domains`` entry-point group of installed distributions: each entry point names a
   ``Domain`` or a zero-argument callable returning one (``mydomain = "my_pkg.domain:DOMAIN"``);
4. an environment spec ``module:attr`` (``--env my_pkg.domain:make_domain``), imported on request.

A spec names a domain and, optionally, an argument: ``NAME`` (its shipped tasks), ``NAME/VARIANT`` (a
shipped variant, such as a one-intent subset), ``sop:data/sop/warranty_claims`` (an SOP folder).
Registered names win over files and directories of the same name in the working directory: a path is
only a path when it says so (``./sop``, an absolute path, or a ``.jsonl`` file that exists).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import pkgutil
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

if TYPE_CHECKING:
    from pipeline.envs.base import Environment, Task

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "turnwise.domains"
Policy = Callable[[list[dict]], str]

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class EvidenceRules:
    """What the reward's rule-based scorers need to know about a domain's tools and customers.

    Plain data (patterns as strings), so that it can be declared by a domain without importing the
    reward package, and read by scorers that work on logged chats with no environment at hand.

    - ``tool_names``: a bare ``name(...)`` in a message is a near-miss tool call for these names.
    - ``action_claims``: ``(kind, pattern, tools)``: a message matching ``pattern`` claims an action
      done, which needs a successful result of one of ``tools`` earlier in the episode.
    - ``status_pattern``/``status_support``: claims of a record's status (group 1 or 2 of the pattern),
      and which observed statuses support each claimed one.
    - ``identifier_patterns``: ``(what, pattern)``: identifiers (tracking numbers, ticket ids) that must
      appear in a tool result or in the customer's messages when the agent states them.
    - ``request_cue``, ``request_keys``, ``request_values``: a sentence matching the cue asks for each
      key whose pattern it matches; ``request_values`` recognise a given value of a key in a message.
    """

    tool_names: tuple[str, ...] = ()
    action_claims: tuple[tuple[str, str, tuple[str, ...]], ...] = ()
    status_pattern: str | None = None
    status_support: Mapping[str, frozenset[str]] = field(default_factory=dict)
    identifier_patterns: tuple[tuple[str, str], ...] = ()
    request_cue: str | None = None
    request_keys: Mapping[str, str] = field(default_factory=dict)
    request_values: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Domain:
    """One domain's entry points (see the module docstring).

    - ``make_env(source=None, **kwargs)`` builds an environment. ``source`` is ``None``, the argument of
      a spec (``sop:PATH`` gives ``"PATH"``) or the :class:`Task` the environment is built for.
    - ``load_tasks(argument, split)`` gives the domain's tasks: its shipped set for ``argument=None``, a
      variant or a folder otherwise. ``None`` when the domain's tasks only come as task files.
    - ``check_payload(payload)`` validates a task row's ``payload``; it raises
      :class:`~pipeline.envs.schema.FieldError` naming the field.
    - ``oracle_policy(task)`` is the scripted expert: a policy ``(messages) -> str`` that solves the task.
    - ``default_reward``: the reward config (a shipped name or a path) used when none is named.
    - ``evidence``: what the reward's rule scorers need (:class:`EvidenceRules`).
    - ``default_customer``: the user-simulator factory the environment uses unless given another.
    - ``hacks``: scripted reward-hacking policies ``name -> (task -> policy)`` for the reward audit.
    - ``trust_environment(spec)``: the environment variables that grant trust to code a task spec brings
      (an SOP folder's tools.py) for ``--trust-tools``; ``{}`` when the spec brings none. ``None`` for a
      domain whose tasks never carry code.
    - ``default``: the domain used when a command names none (exactly one shipped domain sets it).
    """

    name: str
    make_env: Callable[..., "Environment"]
    load_tasks: Callable[[str | None, str | None], list["Task"]] | None = None
    check_payload: Callable[[dict], None] | None = None
    oracle_policy: Callable[["Task"], Policy] | None = None
    default_reward: str = "default"
    evidence: EvidenceRules = field(default_factory=EvidenceRules)
    default_customer: Callable[..., Any] | None = None
    hacks: Mapping[str, Callable[["Task"], Policy]] = field(default_factory=dict)
    trust_environment: Callable[[str | None], Mapping[str, str]] | None = None
    default: bool = False
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ValueError(f"Domain name {self.name!r} must be an identifier (letters, digits, _), so that "
                             "task files and --env can name it.")
        if not callable(self.make_env):
            raise TypeError(f"Domain {self.name!r}: make_env must be callable, got {type(self.make_env).__name__}.")


class UnknownDomainError(ValueError):
    """A spec or a task names a domain that no source registers."""


_REGISTRY: dict[str, Domain] = {}
_discovered = False


def register_domain(domain: Domain, *, replace: bool = False) -> Domain:
    """Register ``domain`` under its name (once; ``replace=True`` to swap it, as tests do). Returns it."""
    if not isinstance(domain, Domain):
        raise TypeError(f"register_domain takes a Domain record, got {type(domain).__name__}.")
    existing = _REGISTRY.get(domain.name)
    if existing is not None and existing is not domain and not replace:
        raise ValueError(f"A domain named {domain.name!r} is already registered; pick another name, or pass "
                         "replace=True to swap it.")
    _REGISTRY[domain.name] = domain
    return domain


def unregister_domain(name: str) -> None:
    """Forget a registered domain (for tests that register a toy one)."""
    _REGISTRY.pop(name, None)


def _as_domain(value: Any, where: str) -> Domain:
    domain = value() if callable(value) and not isinstance(value, Domain) else value
    if not isinstance(domain, Domain):
        raise TypeError(f"{where} gives a {type(domain).__name__}, not a pipeline.envs.Domain record (or a "
                        "callable returning one).")
    return domain


def _discover() -> None:
    """Register the shipped domains and the entry-point ones (once; explicit registrations win)."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    package = importlib.import_module("pipeline.envs")
    for info in pkgutil.iter_modules(package.__path__):
        if not info.ispkg:
            continue
        module = importlib.import_module(f"pipeline.envs.{info.name}")
        record = getattr(module, "DOMAIN", None)
        if isinstance(record, Domain) and record.name not in _REGISTRY:
            _REGISTRY[record.name] = record
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            domain = _as_domain(entry.load(), f"entry point {entry.name} = {entry.value} ({ENTRY_POINT_GROUP})")
        except Exception as exc:  # noqa: BLE001 - one broken plugin must not hide the other domains
            logger.warning("skipping the domain entry point %s = %s: %s: %s", entry.name, entry.value,
                           type(exc).__name__, exc)
            continue
        _REGISTRY.setdefault(domain.name, domain)


def domains() -> dict[str, Domain]:
    """Every registered domain by name."""
    _discover()
    return dict(_REGISTRY)


def get_domain(name: str) -> Domain:
    """The domain registered as ``name`` (or the one a ``module:attr`` spec names)."""
    if not isinstance(name, str) or not name:
        raise UnknownDomainError(f"A domain name must be a non-empty string, got {name!r}.")
    if name in _REGISTRY:
        return _REGISTRY[name]
    _discover()
    if name in _REGISTRY:
        return _REGISTRY[name]
    raise UnknownDomainError(f"Unknown domain {name!r}. Registered: {', '.join(sorted(_REGISTRY)) or 'none'}; a "
                             "third-party domain registers with pipeline.envs.register_domain, the "
                             f"{ENTRY_POINT_GROUP!r} entry-point group, or --env MODULE:ATTR.")


def default_domain() -> Domain:
    """The domain commands use when none is named: the registered one that declares ``default=True``."""
    _discover()
    chosen = [d for d in _REGISTRY.values() if d.default]
    if len(chosen) != 1:
        raise UnknownDomainError(f"Expected exactly one default domain, found {[d.name for d in chosen] or 'none'}; "
                                 "name one with --env.")
    return chosen[0]


def _import_spec(spec: str) -> Domain:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UnknownDomainError(f"--env {spec!r}: no domain {module_name!r} is registered, and importing it as "
                                 f"a module failed ({exc}). Registered domains: {', '.join(sorted(_REGISTRY))}.") from None
    if not hasattr(module, attr):
        raise UnknownDomainError(f"--env {spec!r}: module {module_name!r} has no attribute {attr!r}.")
    domain = _as_domain(getattr(module, attr), f"--env {spec!r}")
    return register_domain(domain, replace=_REGISTRY.get(domain.name) is domain)


def is_explicit_path(text: str) -> bool:
    """Whether a spec is spelt as a path (``./x``, ``../x``, ``/x``, ``~/x``), which never names a domain."""
    return text.startswith(("./", "../", "/", "~", ".\\")) or text in (".", "..")


def resolve(spec: str | None) -> tuple[Domain, str | None] | None:
    """The domain a spec names and its argument, or ``None`` when the spec is not a domain spec (a path).

    ``None`` gives the default domain. ``NAME`` gives ``(NAME, None)``; ``NAME:ARG`` and ``NAME/ARG``
    give ``(NAME, "ARG")``; ``module:attr`` imports a third-party domain (``(domain, None)``).
    """
    if spec is None:
        return default_domain(), None
    text = str(spec)
    if not text or is_explicit_path(text):
        return None
    _discover()
    for separator in (":", "/"):
        name, sep, argument = text.partition(separator)
        if sep and name in _REGISTRY:
            return _REGISTRY[name], argument
    if text in _REGISTRY:
        return _REGISTRY[text], None
    name, sep, attr = text.partition(":")
    if sep and attr and re.match(r"^[A-Za-z_][\w.]*$", name) and re.match(r"^[A-Za-z_]\w*$", attr) \
            and not Path(text).exists():
        return _import_spec(text), None
    return None


def trust_environment(spec: str | None) -> dict[str, str]:
    """What ``--trust-tools`` grants for a task spec: the environment variables of every domain whose
    ``trust_environment`` finds code in it (a spec that names one domain asks only that one)."""
    named = domain_of(spec)
    candidates = [named] if named is not None else list(domains().values())
    granted: dict[str, str] = {}
    for domain in candidates:
        if domain.trust_environment is not None:
            granted.update(domain.trust_environment(spec))
    return granted


def domain_of(spec: str | None) -> Domain | None:
    """The domain a task spec or ``--env`` value belongs to, when it names one (else ``None``: a file path)."""
    resolved = resolve(spec)
    return resolved[0] if resolved is not None else None
