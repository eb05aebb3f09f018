"""Rollout throughput: the batched engine against batched ``generate`` and one episode at a time, in one run.

    python benchmarks/rollout.py            # full: 32 concurrent episodes of 6 turns
    python benchmarks/rollout.py --quick    # 8 episodes of 3 turns, under 6 minutes on a 2-core CPU

Both sides play the same customer-service episodes with the embedded model, greedy, with the same
number of new tokens per turn (end-of-turn is suppressed so every turn generates exactly
``--new-tokens``) and the customer's patience raised so every episode runs ``--turns`` turns.

- batched: :class:`RolloutEngine` with :class:`HFBackend` (all live episodes decode together; each
  episode's KV cache is kept between turns);
- batched generate: the same episodes (the first ``--generate-episodes``, default all), every live
  episode's conversation re-rendered and re-encoded at each turn and continued by one batched
  ``model.generate`` call (left padding, no cache kept between turns): what a plain TRL ``rollout_func``
  does;
- sequential: a plain loop, one episode at a time, ``model.generate`` on the re-rendered conversation
  at each turn (no batching, no cache reuse), run on the first ``--sequential`` of the same episodes.

Keys of the last output line (JSON):

- ``speedup_vs_batched_generate``: engine tokens/s / batched-generate tokens/s (generated tokens over the
  wall time of the whole rollout, environment steps, rendering and encoding included, on both sides);
- ``speedup``: engine tokens/s / sequential tokens/s;
- ``tokens_per_s``: batched;
- ``roofline_fraction_with_prefill``: the engine's model FLOPs per second over the matmul FLOP/s measured
  here, counting prefill and decode: 2 x parameters per generated token, and 2 x (parameters - the LM
  head) per prefilled token, whose logits are not computed (attention over the context is extra work
  this roof does not count); ``batched_generate_roofline_fraction_with_prefill`` is the same for the
  baseline, over the real (unpadded) tokens it prefilled;
- ``roofline_fraction``: the older figure, generated tokens only (engine tokens/s over the matmul FLOP/s
  / 2 x parameters);
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
    parser.add_argument("--generate-episodes", type=int, default=None,
                        help="episodes for the batched-generate baseline (default: all of them)")
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--model", default="smollm2-135m")
    add_threads_option(parser)
    args = parser.parse_args()
    if args.quick:
        args.episodes, args.turns, args.new_tokens, args.sequential = 8, 3, 16, 1
    generate_episodes = args.episodes if args.generate_episodes is None else args.generate_episodes

    set_threads(args.threads)
    import torch

    from pipeline.envs import load_tasks, make_env
    from pipeline.models import load_model
    from pipeline.rollout import RolloutEngine, run_batched, run_policy
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

    # batched generate: re-render and re-encode every live conversation, one generate call per turn
    left = copy.copy(tokenizer)
    left.padding_side = "left"
    generate_prefill = [0]

    def batch_policy(conversations):
        texts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
        encoded = left(texts, add_special_tokens=False, padding=True, return_tensors="pt")
        generate_prefill[0] += int(encoded["attention_mask"].sum())
        with torch.no_grad():
            out = model.generate(**encoded, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id)
        width = encoded["input_ids"].shape[1]
        return [tokenizer.decode(row[width:], skip_special_tokens=True) for row in out]

    start = time.perf_counter()
    generated = run_batched(env_factory, tasks[:generate_episodes], batch_policy)
    generate_s = time.perf_counter() - start
    generate_tokens = sum(len(t.turns) for t in generated) * args.new_tokens

    flops = matmul_flops()
    params = sum(p.numel() for p in model.parameters())
    head = model.get_output_embeddings().weight.numel()

    def model_flops(generated_tokens: int, prefilled_tokens: int) -> float:
        return 2 * params * generated_tokens + 2 * (params - head) * prefilled_tokens

    batched_tps = batched_tokens / batched_s
    sequential_tps = sequential_tokens / sequential_s
    generate_tps = generate_tokens / generate_s
    result = {
        "speedup_vs_batched_generate": round(batched_tps / generate_tps, 3),
        "roofline_fraction_with_prefill": round(model_flops(batched_tokens, backend.prefill_tokens) / batched_s / flops, 4),
        "speedup": round(batched_tps / sequential_tps, 3),
        "tokens_per_s": round(batched_tps, 2),
        "batched_generate_tokens_per_s": round(generate_tps, 2),
        "sequential_tokens_per_s": round(sequential_tps, 2),
        "batched_generate_roofline_fraction_with_prefill": round(
            model_flops(generate_tokens, generate_prefill[0]) / generate_s / flops, 4),
        "roofline_fraction": round(batched_tps / (flops / (2 * params)), 4),
        "turn6_over_turn1": round(turn_times[5] / turn_times[0], 3) if len(turn_times) >= 6 else None,
        "turn6_over_turn1_decode": round(decode_times[5] / decode_times[0], 3) if len(decode_times) >= 6 else None,
        "turn_times_s": [round(x, 2) for x in turn_times],
        "turn_decode_s": [round(x, 2) for x in decode_times],
        "episodes_per_turn": turn_episodes,
        "batched_prefill_tokens": backend.prefill_tokens, "batched_generate_prefill_tokens": generate_prefill[0],
        "matmul_gflops": round(flops / 1e9, 1), "flops_per_token": 2 * params,
        "episodes": args.episodes, "sequential_episodes": args.sequential, "generate_episodes": generate_episodes,
        "turns": args.turns, "batched_generate_s": round(generate_s, 1),
        "new_tokens_per_turn": args.new_tokens, "batched_s": round(batched_s, 1),
        "sequential_s": round(sequential_s, 1), "model": args.model, "quick": args.quick, "machine": machine(),
        "command": " ".join(["python benchmarks/rollout.py", *sys.argv[1:]]),
    }
    write_result("rollout_quick" if args.quick else "rollout", result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
