"""SFT warm start: oracle demonstrations (or your own transcripts), and TRL's ``SFTTrainer`` on a LoRA adapter.

Why a warm start: RL only amplifies what the policy already does some of the time. The untrained
embedded model never calls a tool, so every rollout of a task fails the same way, every group has
zero advantage and GRPO has nothing to push on. A few dozen expert conversations teach the format
(tool calls, asking for identity first, confirming before acting); RL then improves the decisions.

Demonstrations come from the scripted oracle (:func:`pipeline.envs.oracle_policy`) played *through the
environment* (:func:`pipeline.rollout.run_policy`), so each demonstration is exactly the messages the
environment produces: the same system prompt, tool results and customer replies the policy will see
in training and evaluation. Only demonstrations the oracle solved are kept.

A team's own transcripts (``--demos``, any format ``turnwise score`` reads) can take the oracle's place
(:func:`logged_demonstrations`): each is replayed in its task's sandbox, and one that breaks the SOP, as
the evaluation judges it, is listed, and left out with ``--drop_violations``.

Tokenisation mirrors the rollout engine (:class:`pipeline.rollout.RolloutEngine`) token for token, through
the same :class:`~pipeline.templates.ChatTemplate`: the opening is rendered with the generation prompt,
each assistant message is its text's tokens followed by the end-of-turn token (what the model must learn
to sample to stop), and what the template puts between assistant messages is tokenised as one piece, with
any control token in environment text encoded as text. With a template that supports tools, the tool specs
go to the template and a call is trained in the template's own spelling (:mod:`pipeline.native_tools`). So SFT trains on the very sequences a rollout
of the oracle's texts would hold, and its assistant mask is the rollout's ``assistant_mask``.

Training runs TRL's ``SFTTrainer`` with one change to its loss's forward
(:class:`~pipeline.training.sft_trainer.SharedPrefixSFTTrainer`): the system prompt the demonstrations of a
batch share runs once per batch, and the LM head only at the assistant tokens; same loss and gradients.

The loss is on assistant tokens only. TRL's ``assistant_only_loss`` needs a chat template with
``{% generation %}`` markers; SmolLM2's has none and TRL ships no training template for it, so this
module builds the mask itself (``assistant_masks``) and TRL turns it into labels (-100 elsewhere).

Training stops when validation success stops improving: :class:`ValSuccessCallback` runs the
external evaluation (:func:`pipeline.evaluation.evaluate`, greedy) on a val sample after every epoch,
saves the adapter whenever val success reaches its best so far, stops after ``patience`` epochs
without a strict improvement, and writes the curve to ``<output_dir>/val_curve.json``. A checkpoint is
saved after each epoch; ``--resume`` continues a killed run from the newest complete one, with the curve
and the best adapter of the part before the kill (``wall_time_s`` then counts the resumed part only, and
``wall_time_total_s`` the whole run: each killed part up to its last checkpoint).
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from transformers import TrainerCallback

from pipeline.budgets import MAX_NEW_TOKENS, MAX_TURNS, check_count
from pipeline.envs import load_tasks, make_env, oracle_policy
from pipeline.envs.base import Task
from pipeline.envs.tasks import spread_over_intents
from pipeline.rollout import run_policy
from pipeline.trajectory import Trajectory, atomic_write_text

if TYPE_CHECKING:
    from pipeline.templates import ChatTemplate

logger = logging.getLogger(__name__)

#: turnwise's defaults for ``turnwise sft``, applied under a recipe's values (TRL's own defaults are for
#: GPU runs on short single-turn data: ``max_length=1024`` would cut every demonstration here).
SFT_DEFAULTS: dict[str, Any] = {
    "model_name_or_path": "smollm2-135m",
    "use_peft": True,
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.0,
    "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "output_dir": "outputs/sft",
    "learning_rate": 2.0e-4,
    "num_train_epochs": 3,
    # 4 demonstrations per optimiser step in one batch, not 1 x 4 accumulated: the batch's system prompt then
    # runs once (SharedPrefixSFTTrainer), and TRL normalises by the window's tokens, so the gradient is the same
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "gradient_checkpointing": False,  # checkpointing drops the KV cache the shared system prompt is served from
    "max_length": 4096,
    "logging_steps": 5,
    # a checkpoint after each epoch (the newest one kept), so that --resume continues a killed run from there
    "save_strategy": "epoch",
    "save_total_limit": 1,
    "report_to": [],
}


RESULT_FILE = "sft_result.json"


@dataclass
class SFTArguments:
    """What ``turnwise sft`` trains on and how it decides to stop (TRL's ``SFTConfig`` holds the rest)."""

    tasks: str | None = field(default=None, metadata={
        "help": "Task set: a domain (NAME, NAME/VARIANT, NAME:ARGUMENT), a directory or a .jsonl file (default: the "
                "default domain's shipped tasks)."})
    train_split: str = field(default="train", metadata={"help": "Split the demonstrations come from."})
    num_demos: int = field(default=64, metadata={
        "help": "Oracle demonstrations to generate (tasks drawn without replacement from a seeded shuffle of the "
                "train split; more than the split holds replays tasks with further environment seeds)."})
    demo_seed: int = field(default=0, metadata={"help": "Seed of the task shuffle and first environment seed."})
    demo_max_turns: int = field(default=MAX_TURNS, metadata={"help": "Assistant-turn budget of demonstration episodes."})
    val_split: str = field(default="val", metadata={"help": "Held-out split for the per-epoch val success."})
    val_limit: int = field(default=16, metadata={"help": "Val tasks per evaluation, taken in turn from each intent "
                                                         "(0: no validation, keep the last epoch's adapter)."})
    val_max_turns: int = field(default=MAX_TURNS, metadata={"help": "Assistant-turn budget of validation episodes."})
    val_max_new_tokens: int = field(default=MAX_NEW_TOKENS, metadata={"help": "Token budget per validation turn."})
    val_at_start: bool = field(default=True, metadata={
        "help": "Also evaluate before training (epoch 0 of the curve: the starting model)."})
    patience: int = field(default=2, metadata={
        "help": "Stop after this many epochs without a strict improvement in val success (0: never stop early)."})
    demos: str | None = field(default=None, metadata={
        "help": "Train on your own transcripts instead of oracle demonstrations: a JSONL file of conversations in "
                "turnwise's format, OpenAI chat or Bedrock Converse. Each is checked against the domain's SOP by "
                "replaying its assistant messages in its task's sandbox (when its task id is in --tasks)."})
    demos_format: str = field(default="auto", metadata={
        "help": "The --demos file's format: auto (detected), turnwise, openai or bedrock."})
    resume: bool = field(default=False, metadata={
        "help": "Continue a killed run from the newest complete epoch checkpoint in output_dir (save_strategy: "
                "epoch, the default); the val curve, the best adapter and the patience count carry over."})
    drop_violations: bool = field(default=False, metadata={
        "help": "Leave out the --demos transcripts that break the SOP (they are always listed)."})
    tool_calling: str = field(default="auto", metadata={
        "help": "How the model calls tools: auto (its chat template's own format when the template supports tools, "
                "else turnwise's <tool_call> text), native or text. Validation plays the same way."})
    customer: str | None = field(default=None, metadata={
        "help": "The simulated customer of oracle demonstrations and validation: scripted (the default) or "
                "llm:BACKEND (hf:MODEL, bedrock:MODEL_ID, openai:MODEL@URL)."})

    def __post_init__(self) -> None:
        from pipeline.conversations import check_format
        from pipeline.envs.registry import check_customer_spec
        from pipeline.native_tools import check_tool_calling

        for name in ("num_demos", "demo_max_turns", "val_max_turns", "val_max_new_tokens"):
            check_count(getattr(self, name), name)
        for name in ("val_limit", "patience"):  # 0: no validation; 0: never stop early
            check_count(getattr(self, name), name, least=0)
        check_format(self.demos_format, "demos_format")
        if self.demos is not None and not Path(self.demos).is_file():
            raise ValueError(f"demos={self.demos!r} is not a file: pass a JSONL file of conversations.")
        if self.drop_violations and self.demos is None:
            raise ValueError("drop_violations screens --demos transcripts; oracle demonstrations break no rule. Pass "
                             "--demos FILE too, or leave --drop_violations out.")
        check_tool_calling(self.tool_calling)
        check_customer_spec(self.customer)


# ---------------------------------------------------------------------------------------------------
# Demonstrations
# ---------------------------------------------------------------------------------------------------


def demonstration_plan(tasks: Sequence[Task], n: int, seed: int = 0) -> list[tuple[Task, int]]:
    """The ``(task, environment seed)`` of each of :func:`oracle_demonstrations`' ``n`` episodes: tasks from a
    seeded shuffle of ``tasks``, seed ``seed`` on the first pass over them, ``seed + 1`` on the next, and so on.
    Analyses that must leave out the tasks an SFT run learned from call it with that run's ``n`` and seed."""
    tasks = list(tasks)
    if not tasks:
        raise ValueError("no tasks to generate demonstrations from.")
    order = list(range(len(tasks)))
    random.Random(seed).shuffle(order)
    return [(tasks[order[i % len(tasks)]], seed + i // len(tasks)) for i in range(n)]


def oracle_demonstrations(tasks: Sequence[Task], n: int, seed: int = 0, max_turns: int = MAX_TURNS,
                          tool_protocol: str = "text", customer: str | None = None) -> list[Trajectory]:
    """``n`` oracle episodes played through the environment, on tasks from a seeded shuffle of ``tasks``.

    The first pass uses environment seed ``seed`` on every task; a second pass (when ``n`` exceeds the
    number of tasks) uses ``seed + 1``, and so on, so the customer words things differently. Episodes the
    oracle fails are dropped with a warning (they would teach a wrong conversation). With
    ``tool_protocol="native"`` the environment leaves its tool list to the chat template, and each
    demonstration keeps the tool specs in ``metadata["tools"]``.
    """
    demos, failed = [], []
    for task, episode_seed in demonstration_plan(tasks, n, seed):
        env = make_env(task, max_turns=max_turns, customer=customer)
        if tool_protocol != "text":
            env.set_tool_protocol(tool_protocol)
        trajectory = run_policy(env, task, oracle_policy(task), seed=episode_seed)
        if tool_protocol != "text":
            trajectory.metadata["tools"] = list(env.tool_schemas)
        (demos if trajectory.outcome.success else failed).append(trajectory)
    if failed:
        logger.warning("the oracle failed %d of %d demonstration episodes (%s); they were dropped.", len(failed), n,
                       ", ".join(f"{t.task_id}@{t.seed}: {t.outcome.stop_reason}" for t in failed[:5]))
    if not demos:
        raise ValueError("the oracle solved none of the demonstration episodes; check the task set and its oracle.")
    return demos


@dataclass
class Screening:
    """What ``--demos`` read: each transcript's verdict under the domain's checks, and what was kept.

    ``rows`` has one record per transcript: its ``line``, ``task_id``, ``checked`` (its task was known, so its
    assistant messages were replayed in the task's sandbox, as evaluation plays them), ``violations`` (SOP rule
    ``@`` turn), ``success`` and whether it was ``kept``.
    """

    source: str
    format: str
    rows: list[dict[str, Any]]

    @property
    def violating(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["violations"]]

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "format": self.format, "transcripts": len(self.rows),
                "kept": sum(r["kept"] for r in self.rows), "unchecked": sum(not r["checked"] for r in self.rows),
                "violating": self.violating}


def logged_demonstrations(path: str | Path, tasks: Sequence[Task], format: str | None = None,
                          drop_violations: bool = False, tool_protocol: str = "text",
                          max_turns: int = MAX_TURNS) -> tuple[list[Trajectory], Screening]:
    """Your own transcripts as demonstrations, screened against the domain's SOP.

    ``path`` is read like ``turnwise score`` reads a log (:func:`rewards.logged.load_conversations`: any
    format, the same checks). A transcript whose task id is in ``tasks`` is replayed in the task's sandbox,
    so its SOP violations are the ones evaluation would record; one with an unknown task is kept unchecked
    (with its logged outcome's violations, if it has one). Violating transcripts are listed, with a warning,
    and left out when ``drop_violations``. The demonstration is the conversation as logged; natively
    (``tool_protocol="native"``) its tool specs are its task environment's.
    """
    from rewards.logged import load_conversations

    by_id = {t.id: t for t in tasks}
    conversations = load_conversations(path, by_id, format=format)
    if not conversations:
        raise ValueError(f"{path} holds no transcripts.")
    demos, rows = [], []
    for conversation in conversations:
        t = conversation.trajectory
        checked = conversation.outcome_source == "replayed"
        known = checked or conversation.outcome_source == "logged"
        violations = list(t.outcome.violations) if known else []
        kept = not (drop_violations and violations)
        rows.append({"line": conversation.line, "task_id": t.task_id if t.task_id != "logged" else None,
                     "checked": checked, "violations": violations, "success": t.outcome.success if known else None,
                     "kept": kept})
        if not kept:
            continue
        demo = Trajectory(task_id=t.task_id, messages=[dict(m) for m in t.messages], turns=t.turns, outcome=t.outcome,
                          seed=t.seed, metadata={"source": str(path), "line": conversation.line})
        task = by_id.get(t.task_id)
        if tool_protocol != "text" and task is not None:
            env = make_env(task, max_turns=max_turns)
            env.set_tool_protocol(tool_protocol)
            env.reset(task, seed=t.seed)
            demo.metadata["tools"] = list(env.tool_schemas)
        demos.append(demo)
    screening = Screening(str(path), conversations[0].trajectory.metadata.get("format", "turnwise"), rows)
    if screening.violating:
        listed = "; ".join(f"line {r['line']} ({r['task_id']}): {', '.join(r['violations'])}" for r in screening.violating)
        logger.warning("%d of %d transcripts in %s break the SOP%s: %s", len(screening.violating), len(rows), path,
                       " and were left out" if drop_violations else " (kept; --drop_violations leaves them out)", listed)
    unchecked = sum(not r["checked"] for r in rows)
    if unchecked:
        logger.warning("%d of %d transcripts in %s name no task of the task set, so they were not replayed against "
                       "the SOP; give each line the task_id of its task to check it.", unchecked, len(rows), path)
    if not demos:
        raise ValueError(f"every transcript in {path} breaks the SOP, so none is left to train on.")
    return demos, screening


def tokenize_demonstration(messages: Sequence[dict], tokenizer, tools: Sequence[dict] | None = None,
                           template: "ChatTemplate | None" = None) -> dict[str, list[int]]:
    """Token ids (length T) and assistant mask (T) of a conversation, built as the rollout engine builds them.

    ``messages`` is an episode in turnwise's protocol: the opening (system prompt and first customer
    message), then assistant messages each followed by the environment's replies. The mask is 1 on each
    assistant message's tokens plus its end-of-turn token, 0 on everything else.

    ``template`` (a :class:`~pipeline.templates.ChatTemplate`; default: the tokenizer's, ``tool_calling="auto"``)
    decides the tool protocol. Natively, ``tools`` are the specs the template lists, and an assistant message
    that calls tools is trained on the template's own spelling of the calls (what the rollout engine keeps
    as a ``tool_calls`` message when the model samples it). Environment text never becomes a control
    token, and special tokens written in an assistant text are trained as plain text. Raises
    :class:`~pipeline.rollout.TemplateError` for a template that is not prefix-preserving.
    """
    from pipeline.templates import ChatTemplate, TemplateError

    template = template or ChatTemplate(tokenizer)
    chat = template.template_messages(messages)
    first = next((i for i, m in enumerate(chat) if m["role"] == "assistant"), None)
    if first is None:
        raise ValueError("the conversation has no assistant message to learn from.")
    end_of_turn = template.end_of_turn
    rendered = template.render(chat[:first], True, tools)
    ids = template.encode(rendered)
    mask = [0] * len(ids)
    i = first
    while i < len(chat):
        j = i + 1
        while j < len(chat) and chat[j]["role"] != "assistant":
            j += 1
        native = "tool_calls" in chat[i]
        if native:  # the template's spelling of the calls: what the model samples before its end-of-turn token
            written = template.render(chat[: i + 1], False, tools)[len(rendered):]
            end = written.find(end_of_turn) if end_of_turn else -1
            text = written[:end] if end >= 0 else written
        else:
            text = chat[i]["content"]
        sampled = template.encode_assistant(text) + ([tokenizer.eos_token_id] if end_of_turn else [])
        ids += sampled
        mask += [1] * len(sampled)
        if j == len(chat):  # the episode ended on the environment's last replies: nothing more to predict
            break
        with_assistant, tail = template.continuation(chat[:i], chat[i], rendered, text, tools)
        after = template.render(chat[:j], True, tools)
        if not after.startswith(with_assistant):
            raise TemplateError("The chat template does not render conversations prefix-preservingly, so SFT "
                                "sequences cannot match the rollouts'. Use a template without such rewriting.")
        if end_of_turn and tail.startswith(end_of_turn):
            tail = tail[len(end_of_turn):]
        added = template.encode(tail + after[len(with_assistant):])
        ids += added
        mask += [0] * len(added)
        rendered = after
        i = j
    return {"input_ids": ids, "assistant_masks": mask}


def demonstration_dataset(demos: Sequence[Trajectory], tokenizer, max_length: int | None = None,
                          template: "ChatTemplate | None" = None):
    """A ``datasets.Dataset`` with ``input_ids`` and ``assistant_masks`` per demonstration (TRL builds labels).

    Each demonstration is tokenised by :func:`tokenize_demonstration` with ``template`` (default: the
    tokenizer's, ``tool_calling="auto"``) and, natively, the tool specs in its ``metadata["tools"]``.
    A demonstration longer than ``max_length`` would be cut by TRL, losing its last assistant turns
    (usually the ending); those are dropped with a warning instead.
    """
    from datasets import Dataset

    from pipeline.templates import ChatTemplate

    template = template or ChatTemplate(tokenizer)
    rows = [tokenize_demonstration(t.messages, tokenizer, t.metadata.get("tools"), template) for t in demos]
    if max_length is not None:
        long = [len(r["input_ids"]) for r in rows if len(r["input_ids"]) > max_length]
        if long:
            logger.warning("%d of %d demonstrations are longer than max_length=%d tokens (up to %d) and were dropped; "
                           "raise max_length to keep them.", len(long), len(rows), max_length, max(long))
        rows = [r for r in rows if len(r["input_ids"]) <= max_length]
    if not rows:
        raise ValueError(f"no demonstration fits in max_length={max_length} tokens; raise max_length.")
    return Dataset.from_list(rows)


# ---------------------------------------------------------------------------------------------------
# Validation per epoch, early stopping, the best adapter
# ---------------------------------------------------------------------------------------------------


class ValSuccessCallback(TrainerCallback):
    """Evaluates val success after every epoch (and before training), keeps the best adapter, stops early.

    The adapter in ``adapter_dir`` is always the latest epoch whose val success equals the best so far
    (ties go to the later epoch, which has seen more data). Training stops once ``patience`` epochs in a
    row bring no strict improvement. ``curve`` holds one record per evaluation and is written as JSON to
    ``curve_path`` after each one, so a killed run keeps its curve, and :meth:`restore` takes it up again
    when the run resumes from an epoch checkpoint.
    """

    def __init__(self, trainer, tokenizer, tasks: Sequence[Task], args: SFTArguments, adapter_dir: Path,
                 curve_path: Path, base_model_name: str | None = None) -> None:
        self.trainer, self.tokenizer, self.tasks, self.args = trainer, tokenizer, list(tasks), args
        self.adapter_dir, self.curve_path, self.base_model_name = Path(adapter_dir), Path(curve_path), base_model_name
        self.curve: list[dict[str, Any]] = []
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.stale = 0
        self.stopped_early = False
        self.reward_fn = None  # built on the first validation

    def evaluate(self, epoch: float, step: int) -> dict[str, Any]:
        import torch

        from pipeline.evaluation import evaluate

        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        was_training = model.training
        model.eval()
        start = time.time()
        with torch.no_grad():
            report = evaluate((model, self.tokenizer), self.tasks, max_turns=self.args.val_max_turns,
                              max_new_tokens=self.args.val_max_new_tokens,
                              label=f"the SFT adapter at epoch {round(epoch)}", customer=self.args.customer,
                              tool_calling=self.args.tool_calling)
        model.train(was_training)
        losses = [h["loss"] for h in self.trainer.state.log_history if "loss" in h]
        m = report.metrics
        record = {"epoch": round(epoch), "step": step, "val/success": m["success"], "val/completion": m["completion"],
                  "val/reward/mean": self.mean_reward(report.trajectories), "val/turns_mean": m["turns_mean"],
                  "val/tool_calls_mean": m["tool_calls_mean"], "train/loss": losses[-1] if losses else None,
                  "eval_s": round(time.time() - start, 1)}
        self.curve.append(record)
        logger.info("epoch %d: val success %.3f (completion %.3f, %.1f tool calls/episode) on %d val tasks",
                    record["epoch"], m["success"], m["completion"], m["tool_calls_mean"], len(self.tasks))
        return record

    def mean_reward(self, trajectories: Sequence[Trajectory]) -> float:
        """The mean episode reward of the validation episodes under GRPO's default reward (``turnwise train``
        without --reward_config), so that the SFT curve and the GRPO curve read on one scale."""
        from pipeline.training.adapters import mean_episode_reward
        from pipeline.training.train import default_reward

        if self.reward_fn is None:
            self.reward_fn = default_reward(None, self.tasks)
        return mean_episode_reward(self.reward_fn, trajectories)

    def save_adapter(self) -> None:
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        save_adapter(model, self.tokenizer, self.adapter_dir, self.base_model_name)

    def on_train_begin(self, args, state, control, **kwargs):
        if self.tasks and self.args.val_at_start and not self.curve:
            self.evaluate(0, 0)
            self._write()

    def on_epoch_end(self, args, state, control, **kwargs):
        if not self.tasks:
            self.save_adapter()  # no validation: the latest epoch is the result
            return
        record = self.evaluate(state.epoch or 0, state.global_step)
        self.trainer.log({k: v for k, v in record.items() if k.startswith("val/")})
        if self._track(record):
            self.save_adapter()
        if self.args.patience and self.stale >= self.args.patience:
            logger.info("val success has not improved for %d epochs (best %.3f at epoch %d): stopping.",
                        self.stale, self.best, self.best_epoch)
            self.stopped_early = True
            control.should_training_stop = True
        self._write()

    def _track(self, record: dict[str, Any]) -> bool:
        """Count one epoch's validation towards the best and the patience; True when that epoch's adapter
        becomes the one kept (the best so far, or tied with it)."""
        success = record["val/success"]
        improved = self.best is None or success > self.best
        kept = self.best is None or success >= self.best
        if kept:
            self.best, self.best_epoch = success, record["epoch"]
        self.stale = 0 if improved else self.stale + 1
        return kept

    def restore(self, step: int) -> None:
        """Take up the curve a killed run wrote, up to the checkpoint at ``step`` that training resumes from.

        Later records (an epoch validated after that checkpoint was saved) are dropped: that epoch trains
        again. The best, its epoch and the epochs without improvement follow from the records kept; the
        adapter the earlier part kept in ``adapter_dir`` stays until a better epoch replaces it.
        """
        if not self.curve_path.is_file():
            return
        try:
            saved = json.loads(self.curve_path.read_text())["curve"]
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"cannot resume: {self.curve_path} is not a val curve ({error!r}); move it away to "
                             "start the curve afresh.") from error
        for record in saved:
            if record["step"] > step:
                continue
            self.curve.append(record)
            if record["epoch"] > 0:  # epoch 0 is the starting model: it sets no best (see on_epoch_end)
                self._track(record)
        logger.info("resuming the val curve at step %d: %d records, best %s at epoch %s", step, len(self.curve),
                    self.best, self.best_epoch)

    def summary(self) -> dict[str, Any]:
        return {"curve": self.curve, "best_epoch": self.best_epoch, "best_val_success": self.best,
                "stopped_early": self.stopped_early, "patience": self.args.patience, "val_tasks": len(self.tasks),
                "val_split": self.args.val_split}

    def _write(self) -> None:
        atomic_write_text(self.curve_path, json.dumps(self.summary(), indent=2) + "\n")


def save_adapter(model, tokenizer, adapter_dir: Path | str, base_model_name: str | None = None) -> Path:
    """Save a PEFT model's adapter and the tokenizer. ``base_model_name`` (say, the alias ``smollm2-135m``) is
    recorded as the adapter's base instead of the resolved cache path, so the adapter stays loadable when
    the cache moves."""
    from pipeline.models import record_adapter_base

    adapter_dir = Path(adapter_dir)
    model.save_pretrained(str(adapter_dir))
    tokenizer.save_pretrained(str(adapter_dir))
    if base_model_name:
        record_adapter_base(adapter_dir, base_model_name)
    return adapter_dir


# ---------------------------------------------------------------------------------------------------
# The entry point
# ---------------------------------------------------------------------------------------------------


def parse_sft_args(argv: Sequence[str] | None = None, config: dict | None = None, extra: Sequence[type] = (),
                   where: str = "the recipe", **text: str):
    """``(SFTArguments, SFTConfig, ModelConfig)`` from turnwise's defaults, a recipe and flags (flags win).

    ``config`` is a recipe mapping (a pipeline recipe's ``sft:`` section, ``where`` in errors); ``argv``
    may also name one with ``--config FILE.yaml``. ``extra`` dataclasses (the CLI's ``--threads``) are
    parsed too and follow; ``text`` is the help's ``description``, ``epilog`` and ``usage``.
    """
    from trl import ModelConfig, SFTConfig

    from pipeline.config import parse_options

    return parse_options((SFTArguments, SFTConfig, ModelConfig, *extra), [] if argv is None else argv,
                         prog="turnwise sft", recipe=config, where=where, defaults=sft_defaults(), **text)


def sft_defaults() -> dict[str, Any]:
    """`SFT_DEFAULTS`, plus bf16 only where the hardware has it: TRL turns bf16 on by default, which fails
    without a GPU, and CPUs without native bf16 (AVX2) run bf16 matmuls some 40x slower than float32."""
    import torch

    from pipeline.config import hardware_bf16

    return {**SFT_DEFAULTS, "bf16": hardware_bf16(), "use_cpu": not torch.cuda.is_available()}


def run_sft(sft_args: SFTArguments, sft_config, model_args) -> dict[str, Any]:
    """Generate demonstrations, fine-tune a LoRA adapter on them, keep the best epoch's adapter.

    Returns where the outputs are (``adapter``, ``output_dir``, ``val_curve``, ``log_history``) and the
    numbers (``demos``, ``best_val_success``, ``best_epoch``, ``epochs``, ``wall_time_s``).
    """
    import os

    from trl import get_peft_config

    from pipeline.models import DEFAULT_MODEL, load_model
    from pipeline.training.checkpoints import CheckpointMarker, checkpoint_step, latest_complete_checkpoint
    from pipeline.training.sft_trainer import SharedPrefixSFTTrainer

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    if not model_args.use_peft:
        raise ValueError("turnwise sft trains a LoRA adapter: set use_peft: true (and lora_r, lora_target_modules).")
    if sft_config.assistant_only_loss:
        raise ValueError("assistant_only_loss must stay false: turnwise sft masks non-assistant tokens itself "
                         "(the template has no generation markers).")
    from pipeline.templates import ChatTemplate

    start = time.time()
    model_name = model_args.model_name_or_path or DEFAULT_MODEL
    model, tokenizer = load_model(model_name)
    template = ChatTemplate(tokenizer, sft_args.tool_calling)
    protocol = "native" if template.native else "text"
    val_tasks = (spread_over_intents(load_tasks(sft_args.tasks, sft_args.val_split), sft_args.val_limit)
                 if sft_args.val_limit else [])
    screening = None
    if sft_args.demos is not None:
        fmt = None if sft_args.demos_format == "auto" else sft_args.demos_format
        demos, screening = logged_demonstrations(sft_args.demos, load_tasks(sft_args.tasks), fmt,
                                                 sft_args.drop_violations, protocol, sft_args.demo_max_turns)
        on_val = sorted({d.task_id for d in demos} & {t.id for t in val_tasks})
        if on_val:
            logger.warning("%d --demos transcripts are of val tasks (%s): the val success of this run measures them "
                           "too.", len(on_val), ", ".join(on_val[:5]))
    else:
        train_tasks = load_tasks(sft_args.tasks, sft_args.train_split)
        demos = oracle_demonstrations(train_tasks, sft_args.num_demos, seed=sft_args.demo_seed,
                                      max_turns=sft_args.demo_max_turns, tool_protocol=protocol,
                                      customer=sft_args.customer)
    dataset = demonstration_dataset(demos, tokenizer, max_length=sft_config.max_length, template=template)
    n_tokens = sum(len(r) for r in dataset["input_ids"])
    n_trained = sum(sum(m) for m in dataset["assistant_masks"])
    logger.info("%d demonstrations (%s, %s tool calling): %d tokens, %d of them assistant tokens (trained on)",
                len(dataset), sft_args.demos or "oracle", template.tool_format.name, n_tokens, n_trained)
    out = Path(sft_config.output_dir)
    atomic_write_text(out / "demonstrations.jsonl", "".join(json.dumps(t.to_dict()) + "\n" for t in demos))
    sft_config.dataset_text_field = "input_ids"  # unused: the data is already tokenised
    trainer = SharedPrefixSFTTrainer(model=model, args=sft_config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=get_peft_config(model_args))
    validation = ValSuccessCallback(trainer, tokenizer, val_tasks, sft_args, out / "adapter", out / "val_curve.json",
                                    base_model_name=model_name)
    trainer.add_callback(validation)
    marker = CheckpointMarker(trainer)
    trainer.add_callback(marker)  # last: a checkpoint counts once all of it is on disk
    checkpoint = latest_complete_checkpoint(out) if sft_args.resume else None
    marker.start_clock(start, checkpoint)  # checkpoints record the whole run's time
    if sft_args.resume and checkpoint is None:
        logger.warning("--resume: no complete checkpoint in %s to resume from (save_strategy must be epoch); "
                       "starting from scratch.", out)
    if checkpoint is not None:
        logger.info("resuming from %s", checkpoint)
        validation.restore(checkpoint_step(checkpoint))
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint is not None else None)
    if not (out / "adapter" / "adapter_config.json").exists():  # e.g. max_steps ended training inside epoch 1
        validation.save_adapter()
    atomic_write_text(out / "log_history.json", json.dumps(trainer.state.log_history, indent=2) + "\n")
    summary = validation.summary()
    validation._write()
    result = {"adapter": str(out / "adapter"), "output_dir": str(out), "val_curve": str(out / "val_curve.json"),
              "log_history": str(out / "log_history.json"), "demos": len(dataset), "tokens": n_tokens,
              "assistant_tokens": n_trained, "best_val_success": summary["best_val_success"],
              "best_epoch": summary["best_epoch"], "epochs": [r["epoch"] for r in summary["curve"]],
              "stopped_early": summary["stopped_early"], "wall_time_s": round(time.time() - start, 1),
              "wall_time_total_s": marker.wall_time_s, "demos_source": sft_args.demos or "oracle",
              "tool_calling": template.tool_format.name,
              "resumed_from": str(checkpoint) if checkpoint is not None else None}
    if screening is not None:
        result["screening"] = screening.to_dict()
    atomic_write_text(out / RESULT_FILE, json.dumps(result, indent=2) + "\n")  # written last: the stage finished
    return result
