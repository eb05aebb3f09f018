"""User code named by import path, and how it declares itself.

A reward YAML names a scorer as ``"package.module:attr"`` and ``turnwise eval --policy`` takes a policy
factory as ``MODULE:FUNCTION``. A config file or a command line is not a place to run arbitrary code
from: ``scorer: "subprocess:Popen"`` with ``params: {args: [...]}``, or ``--policy os:system``, names a
callable that exists and would run. So an object named by path must **declare** what it is, with a
decorator its author applies in the module that defines it::

    # mypackage/scorers.py
    from rewards import declare_scorer

    @declare_scorer
    def grounded_refund(trajectory) -> float:          # an episode scorer
        ...

    @declare_scorer
    class MaxLength:                                   # a parameterised scorer: params become kwargs
        def __init__(self, max_chars: int = 600): ...
        def __call__(self, trajectory, index): ...

    # mypackage/policies.py
    from pipeline.plugins import declare_policy_factory

    @declare_policy_factory
    def always_escalate(task):                         # task -> (messages -> str)
        return lambda messages: "Let me get a specialist for you."

Then ``scorer: mypackage.scorers:grounded_refund`` and ``--policy mypackage.policies:always_escalate``
work. Resolving a path (:func:`load_declared`) checks its syntax, imports the module (the only code
that runs: the module's own top level), looks the name up in the module's namespace without calling
anything, and refuses it unless it carries the declaration for that kind. Nothing is called or
instantiated before that check passes. The shipped scorers (the names in
:data:`rewards.composite.SCORERS`) are declared by that registry.

The declaration is an attribute read with :func:`inspect.getattr_static`, so an object cannot claim it
through ``__getattr__`` (``unittest.mock.sentinel`` answers every attribute name) or a descriptor.
"""

from __future__ import annotations

import importlib
import inspect
import re
from typing import Any, TypeVar

SCORER = "scorer"
POLICY_FACTORY = "policy factory"

_ATTRIBUTE = "__turnwise_declared__"
_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DECORATORS = {SCORER: "rewards.declare_scorer", POLICY_FACTORY: "pipeline.plugins.declare_policy_factory"}

T = TypeVar("T")


class NotDeclaredError(ValueError):
    """An import path names something that is not declared as the kind of object wanted."""


def declare_scorer(obj: T) -> T:
    """Declare a scorer function or class, so that a reward config may name it by import path."""
    return _mark(obj, SCORER)


def declare_policy_factory(obj: T) -> T:
    """Declare a policy factory ``task -> (messages -> str)``, so that ``--policy MODULE:FUNCTION`` may name it."""
    return _mark(obj, POLICY_FACTORY)


def _mark(obj: T, kind: str) -> T:
    if not callable(obj):
        raise TypeError(f"@{_DECORATORS[kind].rsplit('.', 1)[1]} applies to a function or a class, not "
                        f"{type(obj).__name__}.")
    setattr(obj, _ATTRIBUTE, kind)
    return obj


def declared_kind(obj: Any) -> str | None:
    """What ``obj`` was declared as (:data:`SCORER` or :data:`POLICY_FACTORY`), or ``None``.

    >>> @declare_policy_factory
    ... def factory(task): ...
    >>> declared_kind(factory), declared_kind(print)
    ('policy factory', None)
    """
    try:
        value = inspect.getattr_static(obj, _ATTRIBUTE)
    except AttributeError:
        return None
    return value if type(value) is str and value in _DECORATORS else None


def load_declared(spec: str, kind: str) -> Any:
    """The object ``"package.module:attr"`` names, if it is declared as ``kind``; nothing of it is called.

    Raises :class:`NotDeclaredError` (a ``ValueError``) saying what is wrong and how to fix it: a path
    that is not ``module:name``, a module that does not import, a name the module does not define, or
    an object that is not declared (``subprocess:Popen``, ``os:system``).

    >>> load_declared("os:system", POLICY_FACTORY)
    Traceback (most recent call last):
    ...
    pipeline.plugins.NotDeclaredError: 'os:system' is not a declared policy factory, so turnwise will not call it. ...
    """
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise NotDeclaredError(f"{_show(spec)} is not an import path; write 'package.module:name'.")
    module_name, attr = spec.split(":")
    if not _MODULE.fullmatch(module_name) or not _NAME.fullmatch(attr):
        raise NotDeclaredError(f"{_show(spec)} is not an import path; write 'package.module:name' (Python "
                               "identifiers separated by dots, then a colon and one name).")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise NotDeclaredError(f"{spec!r}: cannot import {module_name!r} ({exc}). Install what it needs, fix the "
                               "path, or put the module's folder on PYTHONPATH.") from exc
    namespace = getattr(module, "__dict__", {})
    if attr not in namespace:  # the namespace itself: a module-level __getattr__ is not consulted
        raise NotDeclaredError(f"{spec!r}: module {module_name!r} has no attribute {attr!r}.")
    target = namespace[attr]
    if declared_kind(target) != kind:
        declared = declared_kind(target)
        also = f" (it is declared as a {declared})" if declared else ""
        raise NotDeclaredError(
            f"{spec!r} is not a declared {kind}{also}, so turnwise will not call it. If it is yours, decorate it "
            f"with @{_DECORATORS[kind]} in {module_name}; to use someone else's, wrap it in a function of your "
            "own that you decorate.")
    return target


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:80] + "..."
