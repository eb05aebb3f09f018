"""Rollout throughput: the batched engine against one episode at a time, in one run.

    python benchmarks/rollout.py            # full: 32 concurrent episodes
    python benchmarks/rollout.py --quick    # under 5 minutes on a 2-core CPU

Both sides play the same customer-service episodes with the embedded model, greedy, with the same
number of new tokens per turn (end-of-turn is suppressed so every turn generates exactly
``--new-tokens``) and the customer's patience raised so every episode runs ``--turns`` turns.

- batched: :class:`RolloutEngine` with :class:`HFBackend` (all live episodes decode together; each
  episode's KV cache is kept between turns);
- sequential: a plain loop, one episode at a time, ``model.generate`` on the re-rendered conversation
  at each turn (no batching, no cache reuse), run on the first ``--sequential`` of the same episodes.

Keys of the last output line (JSON):

- ``speedup``: batched tokens/s / sequential tokens/s (generated tokens over the wall time of the whole
  rollout, environment steps and rendering included, on both sides);
- ``tokens_per_s``: batched;
- ``roofline_fraction``: batched tokens/s / (matmul FLOP/s measured here / FLOPs per token, taken as
  2 x parameters; attention over the context is extra work this roof does not count);
- ``turn6_over_turn1``: the 6th batched turn's time / the 1st's. Every turn generates the same number of
  new tokens for every episode. A turn's time is the whole backend call: prefilling what is new in the
  prompt (turn 1: the system prompt, once for all episodes, and each episode's first user message;
  later turns: the environment's reply) and decoding. ``turn6_over_turn1_decode`` is the same ratio for
  decoding alone, where the 6th turn attends to a longer context than the 1st.

``--threads`` sets torch's CPU threads (default: torch's own); both sides use the same.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time

from common import add_threads_option, machine, matmul_flops, set_threads, write_result


def patient(task):
    task = copy.deepcopy(task)
    task.payload["customer"]["persona"]["patience"] = 1000
    return task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer episodes and tokens (< 5 min on 2 cores)")
    parser.add_argument("--episodes", type=int, default=32)
    parser.add_argument("--sequential", type=int, default=4, help="episodes for the one-at-a-time baseline")
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--model", default="smollm2-135m")
    add_threads_option(parser)
    args = parser.parse_args()
    if args.quick:
        args.new_tokens, args.sequential = 16, 1

    set_threads(args.threads)
    import torch

    from pipeline.envs import load_tasks, make_env
    from pipeline.models import load_model
    from pipeline.rollout import RolloutEngine, run_policy
    from pipeline.rollout.backends.hf import HFBackend

    model, tokenizer = load_model(args.model)
    model.eval()
    tasks = [patient(t) for t in load_tasks("customer_service", "test")[: args.episodes]]
    env_factory = lambda t: make_env(t, max_turns=args.turns)  # noqa: E731

    # batched engine; -1 is no token id, so no turn ends early and every turn has the same new tokens
    backend = HFBackend(model, tokenizer, temperature=0.0, stop_token_ids=[-1])
    turn_times: list[float] = []
    decode_times: list[float] = []
    turn_episodes: list[int] = []
    generate = backend.generate

    def timed(requests):
        start, decoding = time.perf_counter(), backend.timings["decode_s"]
        out = generate(requests)
        turn_times.append(time.perf_counter() - start)
        decode_times.append(backend.timings["decode_s"] - decoding)
        turn_episodes.append(len(requests))
        return out

    backend.generate = timed
    engine = RolloutEngine(backend, tokenizer, max_new_tokens=args.new_tokens, max_total_tokens=1 << 20,
                           batch_size=args.episodes)
    start = time.perf_counter()
    trajectories = engine.run(env_factory, tasks)
    batched_s = time.perf_counter() - start
    batched_tokens = sum(sum(t.tokens.assistant_mask) for t in trajectories)

    # sequential baseline: re-render and generate from scratch at every turn
    def policy(messages):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id)
        return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)

    start = time.perf_counter()
    seq = [run_policy(env_factory(t), t, policy) for t in tasks[: args.sequential]]
    sequential_s = time.perf_counter() - start
    sequential_tokens = sum(len(s.turns) for s in seq) * args.new_tokens

    flops = matmul_flops()
    params = sum(p.numel() for p in model.parameters())
    batched_tps = batched_tokens / batched_s
    sequential_tps = sequential_tokens / sequential_s
    result = {
        "speedup": round(batched_tps / sequential_tps, 3),
        "tokens_per_s": round(batched_tps, 2),
        "sequential_tokens_per_s": round(sequential_tps, 2),
        "roofline_fraction": round(batched_tps / (flops / (2 * params)), 4),
        "turn6_over_turn1": round(turn_times[5] / turn_times[0], 3) if len(turn_times) >= 6 else None,
        "turn6_over_turn1_decode": round(decode_times[5] / decode_times[0], 3) if len(decode_times) >= 6 else None,
        "turn_times_s": [round(x, 2) for x in turn_times],
        "turn_decode_s": [round(x, 2) for x in decode_times],
        "episodes_per_turn": turn_episodes,
        "batched_prefill_tokens": backend.prefill_tokens,
        "matmul_gflops": round(flops / 1e9, 1), "flops_per_token": 2 * params,
        "episodes": args.episodes, "sequential_episodes": args.sequential, "turns": args.turns,
        "new_tokens_per_turn": args.new_tokens, "batched_s": round(batched_s, 1),
        "sequential_s": round(sequential_s, 1), "model": args.model, "quick": args.quick, "machine": machine(),
        "command": " ".join(["python benchmarks/rollout.py", *sys.argv[1:]]),
    }
    write_result("rollout_quick" if args.quick else "rollout", result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
