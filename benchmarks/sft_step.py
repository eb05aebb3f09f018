"""SFT throughput: turnwise's SFT step against TRL's stock ``SFTTrainer`` on the same demonstrations.

    python benchmarks/sft_step.py            # 4 oracle demonstrations per step, three alternating repeats
    python benchmarks/sft_step.py --quick    # 2 demonstrations per step (under 6 minutes on 2 cores)
    python benchmarks/sft_step.py --profile  # where each side's step spends its time (torch profiler)

Both sides train the same LoRA adapter (r=16 on q, k, v, o; the same initial weights, with B drawn small
rather than 0 so that gradients reach both factors) on the embedded model, and time forward and backward
(``compute_loss`` + ``backward``) over the ``--demos`` oracle demonstrations of one optimiser step:

- stock: TRL's ``SFTTrainer`` as turnwise used it, one demonstration per batch with the step's
  demonstrations accumulated (``per_device_train_batch_size=1``), each running its whole sequence, the
  LM head projecting every position;
- turnwise: :class:`~pipeline.training.sft_trainer.SharedPrefixSFTTrainer` with the step's
  demonstrations in one batch: their shared system prompt runs once, and the LM head only at the
  assistant tokens.

Both normalise the loss by the step's labelled tokens (``num_items_in_batch``), so the two compute the
same loss and gradients; the run checks it (``loss_rel_diff``, ``grad_max_rel_diff``, and
``equal_loss_and_gradients`` within ``rtol=1e-3``). Gradient checkpointing is off on both sides. Each side
runs in its own process (so each one's ``peak_rss_gb`` is its own, and one side's freed memory never
crowds the other), and the two are timed in turns, ``--repeats`` times, so that load from other processes
hits both alike.

Keys of the last output line (JSON): ``speedup`` (turnwise demonstrations/s over stock's, medians),
``equal_loss_and_gradients``. With ``--profile``, one step of each side (after a warm-up step) runs under
torch's profiler instead, and the line holds each side's seconds by kind of work (``attention``: the SDPA
kernels; ``matmul``; ``lm_head``: TRL's chunked log-prob functions, stock's side only, their matmuls
included) and its top operators (``sft_step_profile.json``).
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


def lora_grads(trainer) -> dict:
    return {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}


def step(trainer, batches, items) -> tuple[float, float]:
    """Forward and backward over ``batches`` (one optimiser step's worth); returns (seconds, summed loss)."""
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    total = 0.0
    for batch in batches:
        with trainer.compute_loss_context_manager():
            loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=items)
        trainer.accelerator.backward(loss)
        total += float(loss.detach())
    return time.perf_counter() - start, total


def build_side(side: str, args):
    """The side's trainer, its batches for one optimiser step, and the step's labelled-token count."""
    import torch
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from pipeline.envs import load_tasks
    from pipeline.models import load_model
    from pipeline.sft import demonstration_dataset, oracle_demonstrations
    from pipeline.training.sft_trainer import SharedPrefixSFTTrainer

    demos = oracle_demonstrations(load_tasks("customer_service", "train"), args.demos)
    model, tokenizer = load_model(args.model)
    torch.manual_seed(0)
    cls, batch_size, accumulation = (SFTTrainer, 1, len(demos)) if side == "stock" else (SharedPrefixSFTTrainer,
                                                                                          len(demos), 1)
    trainer = cls(model=model, processing_class=tokenizer, train_dataset=demonstration_dataset(demos, tokenizer),
                  peft_config=LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
                  args=SFTConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch_size,
                                 gradient_accumulation_steps=accumulation, max_length=None, report_to=[],
                                 use_cpu=True, bf16=False, gradient_checkpointing=False, save_strategy="no",
                                 dataset_text_field="input_ids"))
    generator = torch.Generator().manual_seed(1)
    for name, p in sorted(trainer.model.named_parameters()):
        if "lora_B" in name:
            p.data.copy_(torch.randn(p.shape, generator=generator) * 0.01)
    rows = [trainer.train_dataset[i] for i in range(len(demos))]
    batches = [trainer.data_collator([row]) for row in rows] if side == "stock" else [trainer.data_collator(rows)]
    items = sum(int((trainer.data_collator([row])["labels"][:, 1:] != -100).sum()) for row in rows)
    info = {"demos": len(demos), "lengths": [len(r["input_ids"]) for r in rows], "items": items}
    return trainer, batches, info


def built_in_worker(side: str, args):
    """:func:`build_side` inside a worker process, with the run's threads."""
    set_threads(args.threads)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    return build_side(side, args)


def worker(side: str, args, conn) -> None:
    """One side in its own process: build, then time a step on each ``"step"`` (the first also sends its loss
    and LoRA gradients) until ``"stop"``."""
    trainer, batches, info = built_in_worker(side, args)
    give_back_memory()
    conn.send(info)
    first = True
    while True:
        if conn.recv() == "stop":
            conn.send({"peak_rss_gb": round(peak_rss_gb(), 2)})
            return
        seconds, loss = step(trainer, batches, info["items"])
        conn.send((seconds, loss, lora_grads(trainer) if first else None))
        first = False
        trainer.model.zero_grad(set_to_none=True)
        give_back_memory()


def profile_worker(side: str, args, conn) -> None:
    """One side in its own process: a warm-up step, then one step under torch's profiler; sends its breakdown."""
    from torch.profiler import ProfilerActivity, profile

    trainer, batches, info = built_in_worker(side, args)
    step(trainer, batches, info["items"])
    trainer.model.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        seconds, _ = step(trainer, batches, info["items"])
    events = prof.key_averages()
    self_s = {e.key: e.self_cpu_time_total / 1e6 for e in events}
    kinds = {"attention": sum(v for k, v in self_s.items() if "scaled_dot_product" in k),
             "matmul": sum(v for k, v in self_s.items() if k in ("aten::mm", "aten::addmm", "aten::addmm_",
                                                                 "aten::bmm")),
             "lm_head": sum(e.cpu_time_total / 1e6 for e in events if e.key.startswith("ChunkedLogProb"))}
    top = sorted(self_s.items(), key=lambda kv: -kv[1])[:12]
    print(f"{side}: {seconds:.1f} s\n" + events.table(sort_by="self_cpu_time_total", row_limit=12))
    conn.send({"step_s": round(seconds, 2), "profiled_s": round(sum(self_s.values()), 2),
               "by_kind_s": {k: round(v, 2) for k, v in kinds.items()},
               "top_self_s": {k: round(v, 2) for k, v in top}, "lengths": info["lengths"]})


def profile_sides(args) -> dict:
    """Each side's :func:`profile_worker` breakdown, one process after the other."""
    result = {}
    for side in ("stock", "ours"):
        process, conn = start_worker(profile_worker, side, args)
        result[side] = receive(conn, side)
        process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--demos", type=int, default=4, help="demonstrations per optimiser step (8 in one batch "
                        "peaked at 13.9 GB on turnwise's side: see the README's Benchmarks section)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--profile", action="store_true", help="profile one step of each side instead of timing "
                        "repeats (writes sft_step_profile.json)")
    add_threads_option(parser)
    args = parser.parse_args()
    if args.quick:
        args.demos = 2
    if args.demos < 1 or args.repeats < 1:
        parser.error("--demos and --repeats must be at least 1.")
    set_threads(args.threads)  # the workers set theirs; this one is for the machine description
    if args.profile:
        result = {**profile_sides(args), "demos": args.demos, "model": args.model, "machine": machine(),
                  "command": " ".join(["python benchmarks/sft_step.py", *sys.argv[1:]])}
        write_result("sft_step_profile", result)
        print(json.dumps(result))
        return

    sides = {}
    for side in ("stock", "ours"):  # one at a time, so the two builds never hold memory together
        process, conn = start_worker(worker, side, args)
        sides[side] = (process, conn, receive(conn, side))
    stock_info, ours_info = sides["stock"][2], sides["ours"][2]
    if (stock_info["lengths"], stock_info["items"]) != (ours_info["lengths"], ours_info["items"]):
        raise SystemExit(f"the two sides built different demonstrations: {stock_info} vs {ours_info}")
    times = {"stock": [], "ours": []}
    checked = {}
    for _ in range(args.repeats):
        for side in ("stock", "ours"):
            conn = sides[side][1]
            conn.send("step")
            seconds, loss, grads = receive(conn, side)
            times[side].append(seconds)
            if grads is not None:
                checked[side] = (loss, grads)
    peaks = {}
    for side, (process, conn, _) in sides.items():
        conn.send("stop")
        peaks[side] = receive(conn, side)["peak_rss_gb"]
        process.join()
    (stock_loss, stock_grads), (ours_loss, ours_grads) = checked["stock"], checked["ours"]
    loss_rel = abs(ours_loss - stock_loss) / max(abs(stock_loss), 1e-12)
    grad_rel = max(float((ours_grads[n] - g).abs().max() / g.abs().max().clamp(min=1e-12)) for n, g in stock_grads.items())
    equal = loss_rel < 1e-3 and grad_rel < 1e-3

    demos, lengths = stock_info["demos"], stock_info["lengths"]
    stock_dps = demos / statistics.median(times["stock"])
    ours_dps = demos / statistics.median(times["ours"])
    result = {
        "speedup": round(ours_dps / stock_dps, 3),
        "equal_loss_and_gradients": equal,
        "loss_rel_diff": loss_rel, "grad_max_rel_diff": grad_rel,
        "demos_per_s": round(ours_dps, 4), "stock_demos_per_s": round(stock_dps, 4),
        "ours_step_s": [round(x, 2) for x in times["ours"]], "stock_step_s": [round(x, 2) for x in times["stock"]],
        "demos": demos, "tokens": sum(lengths), "tokens_per_demo_max": max(lengths),
        "labelled_tokens": stock_info["items"],
        "peak_rss_gb": peaks["ours"], "stock_peak_rss_gb": peaks["stock"],
        "repeats": args.repeats, "model": args.model, "lora_r": 16, "quick": args.quick, "machine": machine(),
        "command": " ".join(["python benchmarks/sft_step.py", *sys.argv[1:]]),
    }
    write_result("sft_step_quick" if args.quick else "sft_step", result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
