"""One GRPO optimisation step: turnwise's multi-turn step against TRL's stock single-turn step.

    python benchmarks/train_step.py            # 8 episodes
    python benchmarks/train_step.py --quick    # 4 episodes of 2 turns, one timed step each (< 5 min, 2 cores)
    python benchmarks/train_step.py --quick --shared-prefix   # also the step with the system prompt run once

Both trainers wrap the embedded model in the same LoRA adapter and run forward, clipped GRPO loss and
backward (``compute_loss`` + ``backward``, what ``training_step`` does after preparing inputs) on a
prepared batch; generation is outside the timed region, and the two steps are timed in turns (after a
warm-up each, which ``--quick`` skips) so that load from other processes hits both alike. The stock batch is single-turn
completions of the *same number of trained tokens* as the multi-turn batch's assistant tokens, on the
same opening prompts. The multi-turn batch also carries environment tokens (masked out of the loss but
still run through the model), which is the overhead this measures. The timed steps bypass
``Trainer.train()``, so activation checkpointing is off on both sides unless
``--activation-checkpointing`` turns it on.

Keys of the last output line (JSON): ``ratio`` (ours / stock step time, median of ``--repeats``) and
``peak_rss_gb`` (peak resident memory of the process). ``--shared-prefix`` also times turnwise's step with
the system prompt, which every episode shares, run once per batch instead of once per episode
(``shared_prefix_speedup``: plain / shared; ``shared_prefix_ratio_vs_stock``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time

import torch

from common import add_threads_option, machine, set_threads, write_result


def timed_step(trainer, inputs) -> float:
    """Forward, loss and backward on a prepared batch: the body of ``Trainer.training_step`` without TRL's
    ``_prepare_inputs``, which would generate again."""
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    start = time.perf_counter()
    with trainer.compute_loss_context_manager():
        loss = trainer.compute_loss(trainer.model, inputs, num_items_in_batch=inputs.get("num_items_in_batch"))
    trainer.accelerator.backward(loss)
    elapsed = time.perf_counter() - start
    trainer.model.zero_grad(set_to_none=True)
    return elapsed


def first_rows(inputs: dict, n: int = 1) -> dict:
    """The batch cut to its first ``n`` rows: a cheap warm-up of the same kernels."""
    rows = inputs["completion_ids"].shape[0]
    return {k: v[:n] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == rows else v
            for k, v in inputs.items()}


def alternating(*sides, repeats: int, warmup: bool = True) -> list[list[float]]:
    """Time each side (trainer, inputs) in turns, so that load from other processes on a shared machine
    falls on all sides alike; ``warmup`` first runs one untimed step each on the batch's first row."""
    for trainer, inputs in sides if warmup else ():
        timed_step(trainer, first_rows(inputs))
    times: list[list[float]] = [[] for _ in sides]
    for _ in range(repeats):
        for side, out in zip(sides, times):
            out.append(timed_step(*side))
    return times


class SharedPrefix:
    """A view of turnwise's trainer whose loss runs the shared system prompt once per batch (the
    ``share_prefix`` path, which ``Trainer.train()`` takes when gradient checkpointing is off)."""

    def __init__(self, trainer) -> None:
        object.__setattr__(self, "trainer", trainer)

    def __getattr__(self, name):
        return getattr(self.trainer, name)

    def __setattr__(self, name, value) -> None:
        setattr(self.trainer, name, value)

    def compute_loss(self, *args, **kwargs):
        args_, config = self.trainer.args, self.trainer.rollout_config
        saved = args_.gradient_checkpointing, config.share_prefix
        args_.gradient_checkpointing, config.share_prefix = False, True
        try:
            return self.trainer.compute_loss(*args, **kwargs)
        finally:
            args_.gradient_checkpointing, config.share_prefix = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--episodes", type=int, default=8)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the untimed warm-up steps")
    parser.add_argument("--model", default="smollm2-135m")
    add_threads_option(parser)
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="recompute activations in backward on both sides, as Trainer.train() does when "
                             "gradient_checkpointing is on (less memory, more time)")
    parser.add_argument("--shared-prefix", action="store_true",
                        help="also time turnwise's step with the shared system prompt run once per batch "
                             "(RolloutConfig.share_prefix); the ratio above stays the plain forward's")
    args = parser.parse_args()
    if args.shared_prefix and args.activation_checkpointing:
        parser.error("--shared-prefix runs without activation checkpointing (the loss falls back to the plain "
                     "forward with it); drop one of the two.")
    if args.quick:
        # one timed step each, no warm-up: both models have already run forward passes while generating
        args.episodes, args.turns, args.new_tokens, args.repeats, args.warmup = 4, 2, 24, 1, False
    os.environ["TRL_EXPERIMENTAL_SILENCE"] = "1"

    set_threads(args.threads)
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    from pipeline.envs import load_tasks, make_env
    from pipeline.models import load_model
    from pipeline.training import EpisodeRollout, RolloutConfig, TrajectoryReward, TurnwiseGRPOTrainer, task_dataset

    torch.manual_seed(0)
    groups = args.episodes // 2
    tasks = load_tasks("customer_service", "train")[:groups]
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    common = dict(per_device_train_batch_size=args.episodes, num_generations=2, max_steps=1, report_to=[],
                  use_cpu=True, bf16=False, save_strategy="no", beta=0.0, temperature=1.0, seed=0, logging_steps=1)

    # turnwise: multi-turn episodes, scored by a reward that varies within groups
    model, tokenizer = load_model(args.model)
    config = RolloutConfig(max_turns=args.turns, max_new_tokens=args.new_tokens, max_total_tokens=8192)
    rollout = EpisodeRollout(tasks, config)
    reward = TrajectoryReward(lambda t: sum(map(sum, (x.completion_ids for x in t.turns))) % 7 / 7.0, rollout)
    ours = TurnwiseGRPOTrainer(
        model=model, processing_class=tokenizer, peft_config=lora, rollout=rollout, reward=reward, rollout_config=config,
        args=GRPOConfig(output_dir=tempfile.mkdtemp(), max_completion_length=8192, **common),
        train_dataset=task_dataset(tasks))
    ours.model.train()
    rows = [{"prompt": r["prompt"], "task_id": r["task_id"]} for r in ours.train_dataset for _ in range(2)]
    ours_inputs = ours._generate_and_score_completions(rows)
    trained = int((ours_inputs["completion_mask"] * ours_inputs["tool_mask"]).sum())
    env_tokens = int((ours_inputs["completion_mask"] * (1 - ours_inputs["tool_mask"])).sum())
    per_episode = max(1, round(trained / args.episodes))

    # stock TRL: single-turn completions of the same length from the same opening prompts
    model2, _ = load_model(args.model)
    openings = [make_env(t).reset(t) for t in tasks]
    stock = GRPOTrainer(
        model=model2, processing_class=tokenizer, peft_config=lora,
        reward_funcs=[lambda completions, **kw: [float(len(c[0]["content"]) % 7) for c in completions]],
        args=GRPOConfig(output_dir=tempfile.mkdtemp(), max_completion_length=per_episode,
                        generation_kwargs={"min_new_tokens": per_episode}, **common),
        train_dataset=Dataset.from_list([{"prompt": o} for o in openings]))
    stock.model.train()
    stock_inputs = stock._generate_and_score_completions([{"prompt": o} for o in openings for _ in range(2)])
    stock_trained = int(stock_inputs["completion_mask"].sum())
    if args.activation_checkpointing:  # what Trainer.train() would switch on; the timed steps bypass train()
        for trainer in (ours, stock):
            trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config.share_prefix = False  # the plain forward: every row runs its whole sequence
    sides = [(ours, ours_inputs), (stock, stock_inputs)]
    if args.shared_prefix:
        sides.append((SharedPrefix(ours), ours_inputs))
    ours_times, stock_times, *shared_times = alternating(*sides, repeats=args.repeats, warmup=args.warmup)

    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    result = {
        "ratio": round(statistics.median(ours_times) / statistics.median(stock_times), 3),
        "peak_rss_gb": round(peak_gb, 2),
        "ours_step_s": [round(x, 2) for x in ours_times], "stock_step_s": [round(x, 2) for x in stock_times],
        "trained_tokens": {"ours": trained, "stock": stock_trained}, "ours_env_tokens": env_tokens,
        "ours_sequence_len": int(ours_inputs["prompt_ids"].shape[1] + ours_inputs["completion_ids"].shape[1]),
        "stock_sequence_len": int(stock_inputs["prompt_ids"].shape[1] + stock_inputs["completion_ids"].shape[1]),
        "episodes": args.episodes, "turns": args.turns, "new_tokens_per_turn": args.new_tokens, "warmup": args.warmup,
        "model": args.model, "lora_r": 16, "quick": args.quick,
        "activation_checkpointing": args.activation_checkpointing,
        "machine": machine(), "command": " ".join(["python benchmarks/train_step.py", *sys.argv[1:]]),
    }
    if shared_times:
        [shared] = shared_times
        result.update({
            "shared_prefix_step_s": [round(x, 2) for x in shared],
            "shared_prefix_speedup": round(statistics.median(ours_times) / statistics.median(shared), 3),
            "shared_prefix_ratio_vs_stock": round(statistics.median(shared) / statistics.median(stock_times), 3),
        })
    write_result("train_step" + ("_quick" if args.quick else "")
                 + ("_activation_checkpointing" if args.activation_checkpointing else "")
                 + ("_shared_prefix" if args.shared_prefix else ""), result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
