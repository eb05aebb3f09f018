"""One GRPO optimisation step: turnwise's multi-turn step against TRL's stock single-turn step.

    python benchmarks/train_step.py            # 8 episodes of 4 turns
    python benchmarks/train_step.py --quick    # 4 episodes of 2 turns, three alternating timed steps each
    python benchmarks/train_step.py --quick --no-shared-prefix   # turnwise's step with every row run whole

Each side runs in its own process, so that each peak resident memory is its own: turnwise's process loads
the model, plays its episodes and steps; stock TRL's does the same with single-turn completions. Both wrap
the embedded model in the same LoRA adapter and run forward, clipped GRPO loss and backward
(``compute_loss`` + ``backward``, what ``training_step`` does after preparing inputs) on a prepared batch;
generation is outside the timed region. The steps are timed in turns, one side then the other,
``--repeats`` times (after an untimed warm-up each on the batch's first row, which ``--quick`` skips), so
that load from other processes hits both alike; the idle side waits, and hands its freed memory back to
the system between steps. The stock batch is single-turn completions of the *same number of trained
tokens* as the multi-turn batch's assistant tokens, on the same opening prompts. The multi-turn batch also
carries environment tokens (masked out of the loss but still run through the model).

turnwise's step is the one ``Trainer.train()`` runs with gradient checkpointing off: the system prompt the
episodes share runs once per batch and the LM head only at the assistant tokens
(:mod:`pipeline.training.shared_prefix`); ``--no-shared-prefix`` runs every row whole (the LM head still
at the assistant tokens only). Stock TRL's fused LM head projects every position on a CPU. The timed
steps bypass ``Trainer.train()``, so activation checkpointing is off on both sides unless
``--activation-checkpointing`` turns it on (turnwise's step then runs every row whole).

Keys of the last output line (JSON): ``ratio`` (turnwise / stock step time, medians of ``--repeats``),
``peak_rss_gb`` (peak resident memory of turnwise's process: model, generation and steps) and
``stock_peak_rss_gb`` (the same for stock TRL's).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

from common import (add_threads_option, give_back_memory, machine, peak_rss_gb, receive, set_threads, start_worker,
                    write_result)


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
    import torch

    rows = inputs["completion_ids"].shape[0]
    return {k: v[:n] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == rows else v
            for k, v in inputs.items()}


def build_side(side: str, args) -> tuple:
    """The trainer and prepared batch of one side, and what to report about them."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    from pipeline.envs import load_tasks, make_env
    from pipeline.models import load_model
    from pipeline.training import EpisodeRollout, RolloutConfig, TrajectoryReward, TurnwiseGRPOTrainer, task_dataset

    torch.manual_seed(0)
    tasks = load_tasks("customer_service", "train")[: args.episodes // 2]
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    common = dict(per_device_train_batch_size=args.episodes, num_generations=2, max_steps=1, report_to=[],
                  use_cpu=True, bf16=False, save_strategy="no", beta=0.0, temperature=1.0, seed=0, logging_steps=1,
                  gradient_checkpointing=args.activation_checkpointing)
    model, tokenizer = load_model(args.model)
    if side == "ours":
        # multi-turn episodes, scored by a reward that varies within groups
        config = RolloutConfig(max_turns=args.turns, max_new_tokens=args.new_tokens, max_total_tokens=8192,
                               share_prefix=args.shared_prefix)
        rollout = EpisodeRollout(tasks, config)
        reward = TrajectoryReward(lambda t: sum(map(sum, (x.completion_ids for x in t.turns))) % 7 / 7.0, rollout)
        trainer = TurnwiseGRPOTrainer(
            model=model, processing_class=tokenizer, peft_config=lora, rollout=rollout, reward=reward,
            rollout_config=config, args=GRPOConfig(output_dir=tempfile.mkdtemp(), max_completion_length=8192, **common),
            train_dataset=task_dataset(tasks))
        trainer.model.train()
        rows = [{"prompt": r["prompt"], "task_id": r["task_id"]} for r in trainer.train_dataset for _ in range(2)]
        inputs = trainer._generate_and_score_completions(rows)
        trained = int((inputs["completion_mask"] * inputs["tool_mask"]).sum())
        info = {"trained_tokens": trained,
                "env_tokens": int((inputs["completion_mask"] * (1 - inputs["tool_mask"])).sum())}
    else:
        # single-turn completions of the same length from the same opening prompts
        openings = [make_env(t).reset(t) for t in tasks]
        per_episode = args.stock_tokens
        trainer = GRPOTrainer(
            model=model, processing_class=tokenizer, peft_config=lora,
            reward_funcs=[lambda completions, **kw: [float(len(c[0]["content"]) % 7) for c in completions]],
            args=GRPOConfig(output_dir=tempfile.mkdtemp(), max_completion_length=per_episode,
                            generation_kwargs={"min_new_tokens": per_episode}, **common),
            train_dataset=Dataset.from_list([{"prompt": o} for o in openings]))
        trainer.model.train()
        inputs = trainer._generate_and_score_completions([{"prompt": o} for o in openings for _ in range(2)])
        info = {"trained_tokens": int(inputs["completion_mask"].sum())}
    if args.activation_checkpointing:  # what Trainer.train() would switch on; the timed steps bypass train()
        trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    info["sequence_len"] = int(inputs["prompt_ids"].shape[1] + inputs["completion_ids"].shape[1])
    return trainer, inputs, info


def worker(side: str, args, conn) -> None:
    """One side in its own process: build, then time a step on each ``"step"`` until ``"stop"``."""
    set_threads(args.threads)
    os.environ["TRL_EXPERIMENTAL_SILENCE"] = "1"
    trainer, inputs, info = build_side(side, args)
    give_back_memory()
    conn.send(info)
    while True:
        command = conn.recv()
        if command == "stop":
            conn.send({"peak_rss_gb": round(peak_rss_gb(), 2)})
            return
        elapsed = timed_step(trainer, first_rows(inputs) if command == "warmup" else inputs)
        give_back_memory()
        conn.send(elapsed)


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
    parser.add_argument("--no-shared-prefix", dest="shared_prefix", action="store_false",
                        help="run every row of turnwise's batch whole (RolloutConfig.share_prefix off)")
    args = parser.parse_args()
    if args.episodes < 2 or args.episodes % 2:
        parser.error(f"--episodes must be an even number of at least 2 (groups of 2), got {args.episodes}.")
    if args.quick:
        # three timed steps each, no warm-up: both models have already run forward passes while generating
        args.episodes, args.turns, args.new_tokens, args.warmup = 4, 2, 24, False

    set_threads(args.threads)  # the workers set theirs; this one is for the machine description
    ours, ours_conn = start_worker(worker, "ours", args)
    ours_info = receive(ours_conn, "turnwise")
    # stock completions carry as many trained tokens per episode as turnwise's episodes have on average
    stock, stock_conn = start_worker(worker, "stock", args,
                                     stock_tokens=max(1, round(ours_info["trained_tokens"] / args.episodes)))
    stock_info = receive(stock_conn, "stock TRL")
    if args.warmup:
        for conn, side in ((ours_conn, "turnwise"), (stock_conn, "stock TRL")):
            conn.send("warmup")
            receive(conn, side)
    ours_times, stock_times = [], []
    for _ in range(args.repeats):
        for conn, side, times in ((ours_conn, "turnwise", ours_times), (stock_conn, "stock TRL", stock_times)):
            conn.send("step")
            times.append(receive(conn, side))
    peaks = {}
    for name, conn, process in (("ours", ours_conn, ours), ("stock", stock_conn, stock)):
        conn.send("stop")
        peaks[name] = receive(conn, name)["peak_rss_gb"]
        process.join()

    result = {
        "ratio": round(statistics.median(ours_times) / statistics.median(stock_times), 3),
        "peak_rss_gb": peaks["ours"],
        "stock_peak_rss_gb": peaks["stock"],
        "ours_step_s": [round(x, 2) for x in ours_times], "stock_step_s": [round(x, 2) for x in stock_times],
        "trained_tokens": {"ours": ours_info["trained_tokens"], "stock": stock_info["trained_tokens"]},
        "ours_env_tokens": ours_info["env_tokens"],
        "ours_sequence_len": ours_info["sequence_len"], "stock_sequence_len": stock_info["sequence_len"],
        "shared_prefix": args.shared_prefix and not args.activation_checkpointing,
        "episodes": args.episodes, "turns": args.turns, "new_tokens_per_turn": args.new_tokens, "warmup": args.warmup,
        "repeats": args.repeats, "model": args.model, "lora_r": 16, "quick": args.quick,
        "activation_checkpointing": args.activation_checkpointing,
        "machine": machine(), "command": " ".join(["python benchmarks/train_step.py", *sys.argv[1:]]),
    }
    write_result("train_step" + ("_quick" if args.quick else "")
                 + ("_activation_checkpointing" if args.activation_checkpointing else "")
                 + ("" if args.shared_prefix else "_no_shared_prefix"), result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
