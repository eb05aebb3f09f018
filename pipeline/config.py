"""Typed options of every turnwise command, and the one way they are parsed: :func:`parse_options`.

Each concern has one dataclass whose fields carry their help texts and whose ``__post_init__`` fails fast
with the fix in the message. ``turnwise train`` reads :class:`TaskArguments` (which tasks, validation,
reward), :class:`~pipeline.training.RolloutConfig` (how episodes are played and credited), TRL's
``GRPOConfig`` (optimiser, loss type, ``num_iterations``, ``beta``, checkpoints, ``report_to``) and TRL's
``ModelConfig`` (model and LoRA); ``turnwise eval`` and a pipeline recipe's ``eval:`` section read
:class:`EvalArguments`; the episode budgets and their defaults come from :mod:`pipeline.budgets`.

:func:`parse_options` reads dataclasses with ``transformers.HfArgumentParser``, as TRL's ``TrlParser``
does, so every option is spelt ``--max_turns`` or ``--max-turns`` alike, and layers, each overriding the
one before: turnwise's defaults, a recipe mapping (a pipeline recipe's section), a ``--config FILE.yaml``
recipe, and the command-line flags. Unlike ``TrlParser`` it reads a recipe strictly, before anything
runs: a key given twice, a key no dataclass knows (with the closest option named), a value of the wrong
type (``max_turns: 3.7``), a number that is not finite or does not fit, a directory or a list where a
mapping belongs, each fails with the file, the key and the value. It never imports TRL itself, so a
command that needs no trainer (``turnwise score``) loads none.

A recipe never grants trust to an SOP folder's tools.py: ``trust_tools`` in a recipe, and a recipe ``env:``
block (which TRL's parser copies into the process environment) that sets ``TURNWISE_TRUST_TOOLS``, are
refused before anything else is read (:func:`refuse_recipe_trust`). Trust is the ``--trust-tools`` flag of
one command, for the folders that command's tasks name (:mod:`pipeline.envs.sop.trust`).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import re
import sys
import textwrap
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Sequence

from pipeline.budgets import EpisodeBudget, check_count

TRUST_ENV = "TURNWISE_TRUST_TOOLS"  # as pipeline.envs.sop.trust.TRUST_ENV (not imported: keeps this module light)


@dataclass
class TaskArguments:
    """Which tasks ``turnwise train`` trains and validates on, and the reward it optimises."""

    tasks: str | None = field(default=None, metadata={
        "help": "Task set: a domain (NAME, NAME/VARIANT, or NAME:ARGUMENT such as sop:PATH for an SOP task folder), "
                "a directory of <split>.jsonl files or a .jsonl file. Default: the default domain's shipped tasks."})
    env: str | None = field(default=None, metadata={
        "help": "Overrides tasks; the flag `turnwise eval`, audit and score use (--env sop:data/sop/warranty_claims)."})
    trust_tools: bool = field(default=False, metadata={
        "help": "Run the tools.py (Python code) of the SOP folder(s) the tasks name, as it is now, for this run; a "
                "command-line flag only (a recipe cannot set it). Accelerate workers inherit exactly this grant."})
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    train_limit: int | None = field(default=None, metadata={"help": "Use only the first N training tasks."})
    intent_weights: list[str] | None = field(default=None, metadata={
        "help": "How often training draws each intent, as INTENT=WEIGHT entries (--intent_weights escalation=3 "
                "refund_denied=3): a task of weight 3 is drawn three times as often as one of weight 1, weight 0 "
                "leaves its intent out, and an intent left unnamed keeps weight 1. Intents are the labels of the "
                "evaluation's per-intent table (multi for a task with several). Validation is not weighted."})
    val_split: str = field(default="val", metadata={"help": "Held-out split for validation."})
    val_limit: int = field(default=16, metadata={"help": "Validation tasks per validation run, taken in turn from "
                                                         "each intent (pipeline.envs.tasks.spread_over_intents)."})
    val_every: int = field(default=0, metadata={"help": "Validate every N optimiser steps (0: only at the end)."})
    keep_best_val: bool = field(default=False, metadata={
        "help": "Keep the adapter of the validation with the best val success (ties: the earlier) in "
                "<output_dir>/best_adapter and make it the run's result adapter, which the pipeline then evaluates; "
                "the last step's stays in <output_dir>/adapter. Needs val_every. With val_at_start the starting "
                "adapter competes too: when no step beats it, the run hands on the adapter it started from."})
    val_at_start: bool = field(default=True, metadata={
        "help": "With val_every: also validate the starting policy before the first step (step 0 of the val "
                "curve; a resumed run does not repeat it). false saves one validation, and keep_best_val then "
                "chooses among the trained steps only."})
    reward_config: str | None = field(default=None, metadata={
        "help": "Reward config: a YAML path or a shipped name (see configs/rewards/); default: the task domain's "
                "default reward (sop for an SOP folder, else default)."})
    resume: bool = field(default=False, metadata={"help": "Resume from the last checkpoint in output_dir."})
    adapter: str | None = field(default=None, metadata={
        "help": "A LoRA adapter directory to start from (say, `turnwise sft`'s <output_dir>/adapter): its weights are "
                "trained further and its LoRA settings replace lora_r etc. model_name_or_path must be its base."})
    foothold_tasks: int = field(default=8, metadata={
        "help": "Before training, measure the starting policy's greedy success on this many val tasks and warn when "
                "it is 0 (RL cannot amplify what never happens). With val_every and val_at_start, the step-0 "
                "validation (val_limit tasks) is that check instead, so the start is measured once. 0 disables the "
                "check."})

    def __post_init__(self) -> None:
        if self.train_limit is not None:
            check_count(self.train_limit, "train_limit", hint="leave it out (or null) to train on the whole split")
        if self.intent_weights is not None:
            self.intent_weights = parse_intent_weights(self.intent_weights)
        check_count(self.val_limit, "val_limit")
        check_count(self.val_every, "val_every", least=0, hint="0 validates only at the end")
        if self.foothold_tasks < 0:
            raise ValueError(f"foothold_tasks must be 0 (no check) or a task count, got {self.foothold_tasks}.")
        if self.adapter is not None and not (Path(self.adapter) / "adapter_config.json").is_file():
            raise ValueError(f"adapter={self.adapter!r} is not a LoRA adapter directory (no adapter_config.json). "
                             "Pass the adapter/ directory `turnwise sft` or `turnwise train` wrote.")
        if self.keep_best_val and not self.val_every:
            raise ValueError("keep_best_val chooses among periodic validations: set val_every to a step count too.")
        if self.env is not None:  # a flag --env overrides a recipe's tasks
            self.tasks = self.env
        if self.reward_config is None:
            self.reward_config = domain_reward(self.tasks)
        if self.trust_tools:
            # The grant names the folders and their tools.py digests, so that worker processes (which inherit the
            # environment) trust exactly those, and nothing else this process or its children import.
            from pipeline.envs.registry import trust_environment

            os.environ.update(trust_environment(self.tasks))


def intent_weight_entries(entries: Sequence[str]) -> list[str]:
    """``entries`` with each value that holds several INTENT=WEIGHT pairs split into one entry per pair.

    A SageMaker hyperparameter carries one string, so a job passes ``"escalation=4,refund_denied=4"`` (or the
    pairs separated by spaces) as one value. A pair ends after its weight's digits, so an intent name that
    holds a space or a comma (an SOP folder's name) stays whole.

    >>> intent_weight_entries(["escalation=4,refund_denied=4", "late delivery=2 cancel=0", "multi=1"])
    ['escalation=4', 'refund_denied=4', 'late delivery=2', 'cancel=0', 'multi=1']
    """
    out: list[str] = []
    for entry in map(str, entries):
        parts = re.split(r"(=\s*[0-9]+)[\s,]+(?=\S)", entry.strip().strip(","))  # [name, =w, name, =w, ..., last]
        out += [name + weight for name, weight in zip(parts[0::2], parts[1::2])] + [parts[-1]]
    return out


def parse_intent_weights(entries: Sequence[str]) -> dict[str, int]:
    """``["escalation=3", ...]`` (or ``["escalation=3,cancel=0"]``: :func:`intent_weight_entries`) as
    ``{"escalation": 3, ...}``; an entry that is not INTENT=WEIGHT with a whole weight of 0 or more, or an intent
    named twice, fails naming it."""
    weights: dict[str, int] = {}
    for entry in intent_weight_entries(entries):
        name, sep, value = entry.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name:
            raise ValueError(f"intent_weights entry {entry!r} is not INTENT=WEIGHT; write it like escalation=3.")
        if not (value.isascii() and value.isdigit()):
            raise ValueError(f"intent_weights: the weight of {name!r} is {value!r}; use a whole number of 0 or more "
                             "(how many times each of its tasks is drawn per pass over the training tasks).")
        if name in weights:
            raise ValueError(f"intent_weights names {name!r} twice; give each intent one weight.")
        weights[name] = int(value)
    return weights


@dataclass
class EvalArguments(EpisodeBudget):
    """How an evaluation runs: ``turnwise eval``'s options, and a pipeline recipe's ``eval:`` section."""

    split: str = field(default="test", metadata={
        "help": "Split to evaluate on: train, val or test (logged trajectories: tasks are matched by id across all "
                "splits)."})
    limit: int | None = field(default=None, metadata={"help": "Evaluate only the first N tasks (default: all)."})
    k: int = field(default=1, metadata={"help": "Headline pass@k and pass^k."})
    n: int | None = field(default=None, metadata={
        "help": "Episodes per task, environment seeds seed..seed+n-1 (default: k); pass@j and pass^j are reported "
                "for j in 1, k, n and the powers of 2 up to n."})
    batch_size: int = field(default=16, metadata={"help": "Model episodes generated together."})
    bootstrap: int = field(default=10_000, metadata={
        "help": "Paired-bootstrap resamples for the 95%% interval of a side-by-side difference."})
    html: bool = field(default=True, metadata={
        "help": "Write report.html and plots/ beside report.json and report.md (needs matplotlib); --no-html skips "
                "them."})

    def __post_init__(self) -> None:
        super().__post_init__()
        # Named as flags; a recipe's eval: section spells them without the dashes.
        if self.limit is not None:
            check_count(self.limit, "--limit", hint="leave it out to evaluate the whole split")
        check_count(self.k, "--k")
        if self.n is None:
            self.n = self.k
        check_count(self.n, "--n")
        if self.n < self.k:
            raise ValueError(f"need 1 <= --k <= --n, got --k {self.k} and --n {self.n}: pass@k and pass^k need k "
                             "episodes of each task.")
        check_count(self.batch_size, "--batch-size")
        check_count(self.bootstrap, "--bootstrap", hint="resamples of the paired difference; the default is 10000")


def domain_reward(tasks: str | None) -> str | None:
    """The default reward config of the domain a task spec names (``None``: a task file, the package default)."""
    from pipeline.envs.registry import domain_of

    domain = domain_of(tasks)
    return domain.default_reward if domain is not None else None


def refuse_recipe_trust(recipe: Any, where: str) -> None:
    """Raise ``ValueError`` when a recipe tries to grant trust to tools.py (see the module docstring)."""
    if not isinstance(recipe, Mapping):
        return
    how = ("Trust is granted per command, for the folder the command names: add --trust-tools to the command line "
           "(`turnwise train --config RECIPE.yaml --trust-tools`), or, for processes you start yourself, export "
           f"{TRUST_ENV}=\"$(turnwise sop trust PATH)\". Read the folder's tools.py first: it runs with your "
           "permissions.")
    if "trust_tools" in recipe:
        raise ValueError(f"{where}: trust_tools is set in the recipe, and a recipe cannot switch on running a "
                         f"folder's tools.py (recipes are shared like data). Remove it. {how}")
    env = recipe.get("env")
    if isinstance(env, Mapping) and any(str(key).strip().upper() == TRUST_ENV for key in env):
        raise ValueError(f"{where}: its env: block sets {TRUST_ENV}, and a recipe cannot switch on running a folder's "
                         f"tools.py (recipes are shared like data). Remove it from env:. {how}")
    for value in recipe.values():  # a pipeline recipe's stage sections
        if isinstance(value, Mapping) and ("trust_tools" in value or "env" in value):
            refuse_recipe_trust(value, where)


def hardware_bf16() -> bool:
    """Whether bf16 suits this machine: a CUDA GPU with bf16 support.

    TRL turns bf16 on by default. On a CPU without native bf16 that runs matmuls about 40x slower than
    float32, so turnwise's default follows the hardware instead.
    """
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())




# ---------------------------------------------------------------------------------------------------
# Recipes and flags
# ---------------------------------------------------------------------------------------------------

MAX_RECIPE_BYTES = 1 << 20
"""The largest recipe read: a recipe is a page of options, and a bigger file is a mistake."""

LARGEST_INT = 2**63 - 1
"""Whole-number options must fit in 64 bits (torch, numpy and the tokenizers all store them so)."""

SEED_LIMIT = 2**32
"""Seeds must be in ``[0, 2**32)``: numpy refuses anything else."""

#: Lower bounds of TRL's options that TRL itself accepts and then fails on, late or with a traceback
#: (``num_generations: 0`` divides by zero in ``GRPOConfig``). name -> (least, strict, why).
TRL_BOUNDS: dict[str, tuple[float, bool, str]] = {
    "num_generations": (2, False, "a GRPO group needs at least 2 rollouts of a task to compare"),
    "per_device_train_batch_size": (1, False, "rows per forward pass"),
    "per_device_eval_batch_size": (1, False, "rows per forward pass"),
    "gradient_accumulation_steps": (1, False, "forward passes per optimiser step"),
    "num_iterations": (1, False, "optimiser passes over each batch of rollouts"),
    "steps_per_generation": (1, False, "optimiser steps per batch of rollouts"),
    "generation_batch_size": (1, False, "rollouts generated together"),
    "max_completion_length": (1, False, "tokens"),
    "max_length": (1, False, "tokens"),
    "num_train_epochs": (0, True, "passes over the data"),
    "learning_rate": (0, False, "the optimiser's step size"),
    "temperature": (0, True, "sampling divides the logits by it"),
    "beta": (0, False, "the KL penalty's weight"),
    "epsilon": (0, False, "the clipping range"),
    "save_steps": (0, True, "steps between checkpoints"),
}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Each option's default in its help (unless the help already says it), and examples laid out as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        return text if "default" in text.lower() else super()._get_help_string(action)


def read_recipe(path: Path | str, what: str = "recipe") -> dict[str, Any]:
    """A YAML recipe file as a mapping, read strictly.

    Refuses, naming the file and how to fix it: a path that is missing or a directory, a file over
    `MAX_RECIPE_BYTES`, bytes that are not UTF-8, invalid YAML, a key given twice (YAML would keep the
    last one silently), and a document that is not a mapping of option names (a list, a number).
    """
    import yaml

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a directory; --config takes a YAML file, such as "
                         "configs/grpo_cpu_quick.yaml.")
    if not path.is_file():
        raise ValueError(f"{what} {path} does not exist; --config takes a YAML file, such as "
                         "configs/grpo_cpu_quick.yaml.")
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise ValueError(f"{what} {path} is {path.stat().st_size} bytes; a recipe is at most {MAX_RECIPE_BYTES} "
                         "bytes of options. Check that --config names the recipe, not a data file.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{what} {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8.") from None

    class UniqueKeyLoader(yaml.SafeLoader):
        """A safe loader that refuses a mapping key given twice, with its line."""

    def mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden key by key
                continue
            key, line = loader.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:
                raise ValueError(f"{what} {path}, line {line}: a key must be a name, not {key!r}.") from None
            if first is not None:
                raise ValueError(f"{what} {path}, line {line}: {key!r} is given twice (first on line {first}); "
                                 "keep one.")
            seen[key] = line
        return loader.construct_mapping(node, deep=deep)

    UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    try:
        recipe = yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        raise ValueError(f"{what} {path} is not valid YAML: {exc}") from None
    if recipe is None:
        return {}
    if not isinstance(recipe, dict):
        raise ValueError(f"{what} {path} must be a YAML mapping of option: value lines, not a {_kind(recipe)}.")
    bad = [key for key in recipe if not isinstance(key, str)]
    if bad:
        raise ValueError(f"{what} {path}: option names must be text, got {bad[0]!r}.")
    return recipe


def parse_options(types_: Sequence[type], argv: Sequence[str] | None = None, *, prog: str,
                  description: str | None = None, epilog: str | None = None, recipe: Mapping[str, Any] | None = None,
                  where: str = "the recipe", defaults: Mapping[str, Any] | None = None, recipe_flag: bool = True,
                  positionals: Sequence[tuple[str, dict]] = (), aliases: Mapping[str, str] | None = None,
                  usage: str | None = None) -> tuple:
    """Instances of the dataclasses ``types_``, from layered options; every turnwise command parses this way.

    Layers, each overriding the one before: ``defaults`` (turnwise's own, where they differ from a
    dataclass's), ``recipe`` (a mapping, such as a pipeline recipe's section, described as ``where`` in
    errors), the recipe file of ``--config FILE.yaml`` in ``argv`` (when ``recipe_flag``), then the flags
    in ``argv``. ``--help`` (and ``--help-all``) prints every option with its help text and default.
    ``positionals`` are ``(name, add_argument kwargs)`` of positional arguments; when there are any, a
    namespace holding them follows the dataclasses. ``aliases`` maps an older flag to the option it now
    spells (``{"--tasks": "split"}``), so that a command line written for an earlier release still works.

    A flag argparse cannot read exits with status 2 and the usage, as argparse does; everything else that
    is wrong raises ``ValueError`` naming the option and the value (and the recipe file, for a recipe's).
    """
    argv = ["--help" if arg == "--help-all" else arg for arg in (sys.argv[1:] if argv is None else argv)]
    layers = [(layer, name) for layer, name in ((defaults, "turnwise defaults"), (recipe, where)) if layer]
    if recipe_flag:
        argv, path = _recipe_flag(argv)
        if path is not None:
            layers.append((read_recipe(path), f"recipe {path}"))
    hints = {f.name: (dtype, typing.get_type_hints(dtype)[f.name]) for dtype in types_ for f in dataclasses.fields(dtype)
             if f.init}
    if recipe_flag and "config" in hints:
        raise TypeError(f"{hints['config'][0].__name__} has an option named config, which --config FILE.yaml takes.")
    description = textwrap.fill(description, 100) if description else None  # the epilog's examples stay as written
    parser = _option_parser(types_, hints, prog=prog, usage=usage, description=description, epilog=epilog)
    for name, kwargs in positionals:
        parser.add_argument(name, **kwargs)
    for flag, option in (aliases or {}).items():  # an alias never sets a default: the option's own stays
        kind = next((t for t in (int, float, str) if t in (hints[option][1], *typing.get_args(hints[option][1]))), str)
        parser.add_argument(flag, dest=option, type=kind, metavar=option.upper(), default=argparse.SUPPRESS,
                            help=f"the older spelling of --{option}")
    for layer, name in layers:
        parser.set_defaults(**_layer_values(layer, name, hints, prog))
    namespace = parser.parse_args(argv)
    for option, (dtype, _) in hints.items():
        _check_number(getattr(namespace, option), option, dtype, "")
    outputs = []
    for dtype in types_:
        _check_exclusive(dtype, namespace, parser)
        inputs = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(dtype) if f.init}
        try:
            outputs.append(dtype(**inputs))
        except (TypeError, ArithmeticError) as exc:  # a third-party config's check that raises the wrong kind
            raise ValueError(f"{prog}: the options of {dtype.__name__} do not fit together: {exc}") from None
    if positionals:
        outputs.append(argparse.Namespace(**{name: getattr(namespace, name) for name, _ in positionals}))
    return tuple(outputs)


def parse_train_args(argv: Sequence[str] | None = None, extra: Sequence[type] = (), **text: str):
    """``(TaskArguments, RolloutConfig, GRPOConfig, ModelConfig)`` from ``--config FILE.yaml`` and flags.

    ``extra`` dataclasses (the CLI's ``--threads``) are parsed too and follow; ``text`` is the help's
    ``description``, ``epilog`` and ``usage``.
    """
    from trl import GRPOConfig, ModelConfig

    from pipeline.training import RolloutConfig

    return parse_options((TaskArguments, RolloutConfig, GRPOConfig, ModelConfig, *extra), argv, prog="turnwise train",
                         defaults={"bf16": hardware_bf16()}, **text)  # a recipe or --bf16 still overrides bf16


def _option_parser(types_: Sequence[type], hints: dict, **kwargs: Any) -> argparse.ArgumentParser:
    """A ``transformers.HfArgumentParser`` of ``types_`` that also reads ``none`` or ``null`` as None for an
    optional number or path (``--limit none``), as TRL's copy of it does, without importing TRL."""
    from transformers import HfArgumentParser

    def optional(hint: Any) -> bool:
        args = typing.get_args(hint)
        return type(None) in args and not {str, bool} & set(args)

    nullable = {name for name, (_, hint) in hints.items() if optional(hint)}

    def none_or(convert: Callable[[str], Any]) -> Callable[[str], Any]:
        def parse(text: str) -> Any:
            return None if text.lower() in ("none", "null") else convert(text)

        parse.__name__ = getattr(convert, "__name__", "value")  # argparse names the type in its errors
        return parse

    class OptionParser(HfArgumentParser):
        def add_argument(self, *names: str, **options: Any) -> argparse.Action:
            dest = options.get("dest") or (names[0].lstrip("-") if names else "")
            if dest in nullable and callable(options.get("type")):
                options["type"] = none_or(options["type"])
            return super().add_argument(*names, **options)

    return OptionParser(list(types_), formatter_class=_HelpFormatter, **kwargs)


def _recipe_flag(argv: list[str]) -> tuple[list[str], str | None]:
    """``argv`` without its ``--config FILE`` (or ``--config=FILE``), and FILE; refuses two recipes or none named."""
    rest: list[str] = []
    paths: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config":
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise ValueError("--config needs a recipe file: --config FILE.yaml.")
            paths.append(argv[i + 1])
            i += 2
            continue
        if arg.startswith("--config="):
            paths.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
        i += 1
    if len(paths) > 1:
        raise ValueError(f"--config is given {len(paths)} times ({', '.join(paths)}); give one recipe, and override its "
                         "values with flags.")
    if paths and not paths[0]:
        raise ValueError("--config needs a recipe file: --config FILE.yaml.")
    return rest, (paths[0] if paths else None)


def _layer_values(layer: Mapping[str, Any], where: str, hints: dict, prog: str) -> dict[str, Any]:
    """A recipe layer's values, checked against the dataclass fields, with its ``env:`` block applied."""
    refuse_recipe_trust(layer, where)
    values = dict(layer)
    # TRL's convention: a recipe's env: mapping sets environment variables for the run (train's TaskArguments
    # also has an env option, a task set: a mapping is the former, anything else the latter).
    env = values.pop("env") if "env" in values and (isinstance(values["env"], Mapping) or "env" not in hints) else None
    unknown = [key for key in values if key not in hints]
    if unknown:
        hint = ""
        close = difflib.get_close_matches(unknown[0], list(hints), n=1)
        if close:
            hint = f" (did you mean {close[0]}?)"
        raise ValueError(f"Unknown option(s) in {where}: {', '.join(map(str, unknown))}{hint}. Check the spelling; "
                         f"`{prog} --help` lists the options.")
    checked = {}
    for key, value in values.items():
        dtype, hint = hints[key]
        checked[key] = _check_value(value, hint, key, f"{where}: ")
        _check_number(checked[key], key, dtype, f"{where}: ")
    if env is not None:
        if not isinstance(env, Mapping):
            raise ValueError(f"{where}: env must be a mapping of environment variables, not {_kind(env)}.")
        for key, value in env.items():
            os.environ[str(key)] = str(value)
    return checked


def _check_value(value: Any, hint: Any, name: str, where: str) -> Any:
    """``value`` (read from YAML) for a field typed ``hint``: returned as the field takes it, or ``ValueError``.

    Strings are left to argparse, which converts them as it converts flags. An integral float is taken
    for a whole number (``max_steps: 1.0e3``); ``3.7`` is not.
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
            return None
        first_error = None
        for member in (a for a in args if a is not type(None)):
            try:
                return _check_value(value, member, name, where)
            except ValueError as exc:
                first_error = first_error or exc
        raise first_error or ValueError(f"{where}{name} cannot be {value!r}.")
    if value is None:
        raise ValueError(f"{where}{name} cannot be null; give a value or leave the option out for its default.")
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool) or (isinstance(value, str) and value.lower() in _BOOL_WORDS):
            return value
        raise ValueError(f"{where}{name} must be true or false, got {value!r}.")
    if hint is int:
        if isinstance(value, str):
            value = _number(value, int, name, where)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}{name} must be a whole number, got {value!r}.")
        return value
    if hint is float:
        if isinstance(value, str):
            value = _number(value, float, name, where)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}{name} must be a number, got {value!r}.")
        return value
    if isinstance(value, str):  # text for a list, a mapping, an enum or a path: argparse and the config convert it
        return value
    if hint is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _not_text(value, name, where)
    if origin is typing.Literal:
        if value in args:
            return value
        raise ValueError(f"{where}{name} must be one of {', '.join(map(repr, args))}, got {value!r}.")
    if origin is list or hint is list:
        if not isinstance(value, list):
            raise ValueError(f"{where}{name} must be a list, got {_kind(value)} {value!r}.")
        inner = args[0] if args else Any
        return [_check_value(item, inner, f"{name}[{i}]", where) for i, item in enumerate(value)]
    if origin is dict or hint is dict:
        if isinstance(value, dict):
            return value
        raise ValueError(f"{where}{name} must be a mapping, got {_kind(value)} {value!r}.")
    if isinstance(hint, type) and issubclass(hint, (Enum, Path)):
        raise _not_text(value, name, where)
    return value


def _not_text(value: Any, name: str, where: str) -> ValueError:
    quote = ' (YAML reads an unquoted yes, no, on or off as a boolean: quote it, as "no")' if isinstance(value, bool) else ""
    return ValueError(f"{where}{name} must be text, got {_kind(value)} {value!r}{quote}.")


_BOOL_WORDS = ("yes", "no", "true", "false", "t", "f", "y", "n", "1", "0")  # as TRL's parser reads a flag


def _number(text: str, kind: type, name: str, where: str) -> int | float:
    """``text`` (a recipe value YAML left as a string, like ``1e-5`` or ``1e3``) as a number, or ``ValueError``."""
    try:
        value = float(text.strip())
    except ValueError:
        raise ValueError(f"{where}{name} must be a {'whole ' if kind is int else ''}number, got {text!r}.") from None
    if kind is int:
        if not math.isfinite(value) or not value.is_integer():
            raise ValueError(f"{where}{name} must be a whole number, got {text!r}.")
        try:
            return int(text.strip())
        except ValueError:
            return int(value)
    return value


def _check_number(value: Any, name: str, dtype: type, where: str) -> None:
    """Refuse a number no option means: NaN or infinity, a whole number beyond 64 bits, a seed numpy refuses,
    or an option of TRL's (or transformers') dataclass ``dtype`` below `TRL_BOUNDS`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where}{name} must be a finite number, got {value}.")
    if isinstance(value, int) and abs(value) > LARGEST_INT:
        raise ValueError(f"{where}{name} is too large ({value}); whole-number options fit in 64 bits.")
    if (name == "seed" or name.endswith("_seed")) and isinstance(value, int) and not 0 <= value < SEED_LIMIT:
        raise ValueError(f"{where}{name} must be in [0, 2**32), got {value}.")
    if name in TRL_BOUNDS and dtype.__module__.split(".")[0] in ("trl", "transformers"):
        least, strict, why = TRL_BOUNDS[name]
        if value < least or (strict and value == least):
            bound = f"greater than {least}" if strict else f"at least {least}"
            raise ValueError(f"{where}{name} must be {bound} ({why}), got {value}.")


def _check_exclusive(dtype: type, namespace: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Usage errors (status 2) for a dataclass's ``one_of`` options: at most one given, exactly one if ``one_required``."""
    names = getattr(dtype, "one_of", ())
    given = [name for name in names if getattr(namespace, name, None) is not None]
    flags = " ".join(f"--{name}" for name in names)
    if len(given) > 1:
        parser.error(f"argument --{given[1]}: not allowed with argument --{given[0]} (give one of {flags})")
    if not given and getattr(dtype, "one_required", False):
        parser.error(f"one of the arguments {flags} is required")


def _kind(value: Any) -> str:
    return {dict: "mapping", list: "list", str: "text", bool: "boolean", int: "number", float: "number"}.get(
        type(value), type(value).__name__)
