"""Decode-step time against the number of live rows, on the embedded model with a real task's prompt.

    python benchmarks/decode_step.py --threads 2

What continuous batching can save depends on what an idle slot costs. On a GPU a decode step takes about as
long for 1 row as for 16, so a chunk waiting on its longest episode wastes nearly whole steps; on a CPU a
step's time grows with the rows, so the step a straggler runs alone is cheap. This prints, for 1 to 16 rows
of the same ~1,750-token prompt (prefilled once, untimed), the median time of a one-token decode step with
the KV cache, and that time per row. Last output line (JSON): ``decode_step_by_live_rows``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from common import add_threads_option, machine, set_threads, write_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=12, help="timed decode steps per row count (the first 2 dropped)")
    add_threads_option(parser)
    args = parser.parse_args()
    set_threads(args.threads)
    import torch
    from transformers import DynamicCache

    from pipeline.envs import load_tasks, make_env
    from pipeline.models import load_model

    model, tokenizer = load_model(args.model)
    model.eval()
    task = load_tasks("customer_service", "test")[0]
    prompt = tokenizer.apply_chat_template(make_env(task).reset(task, seed=0), add_generation_prompt=True,
                                           return_tensors="pt")
    prompt = prompt if torch.is_tensor(prompt) else prompt["input_ids"]
    by_rows = {}
    with torch.no_grad():
        for rows in (1, 2, 4, 8, 16):
            out = model(input_ids=prompt.repeat(rows, 1), past_key_values=DynamicCache(), use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            times = []
            for _ in range(args.steps):
                start = time.perf_counter()
                out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
                times.append(time.perf_counter() - start)
                token = out.logits[:, -1:].argmax(-1)
            step = statistics.median(times[2:])
            by_rows[rows] = {"step_ms": round(step * 1000, 1), "ms_per_row": round(step * 1000 / rows, 1)}
            print(rows, by_rows[rows], flush=True)
    result = {"decode_step_by_live_rows": by_rows, "one_row_over_sixteen": round(by_rows[1]["step_ms"]
                                                                             / by_rows[16]["step_ms"], 3),
              "prompt_tokens": int(prompt.shape[1]), "model": args.model, "machine": machine(),
              "command": " ".join(["python benchmarks/decode_step.py", *sys.argv[1:]])}
    write_result("decode_step", result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
