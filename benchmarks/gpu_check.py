"""The GPU check: multi-turn rollouts and GRPO steps on one GPU at a real model shape, in one script.

    python benchmarks/gpu_check.py               # one H100/H200: under 8 minutes
    python benchmarks/gpu_check.py --cpu --tiny  # the same code paths on a CPU, on a tiny model (smoke test)

What it does, in order (each phase's numbers go into the JSON line it prints last):

1. Builds a random-weight model of Qwen2.5-0.5B's shape (``Qwen2Config`` with that model's sizes, built from
   the config class: nothing is downloaded) in bf16 on the GPU, and a tokenizer of the same vocabulary
   size (a byte-level BPE trained here on the repository's own task text, padded with filler tokens, so
   prompts tokenise to realistic lengths and every id the model samples decodes).
2. Plays 32 customer-service episodes (``--turns`` turns, ``--new-tokens`` tokens per turn) with the
   rollout engine on the HF backend, and the same 32 episodes again with a baseline backend that calls
   batched ``model.generate`` on every live episode's whole conversation each turn: ``rollout`` and
   ``generate_baseline`` tokens/s.
3. Runs two multi-turn GRPO steps with LoRA (32 episodes per step) through ``TurnwiseGRPOTrainer``, and
   checks that every logged loss is finite, the LoRA weights changed and the base weights did not.
4. GPU only: the same two steps under FSDP2 through ``accelerate launch --config_file
   configs/accelerate/fsdp.yaml --num_processes 1`` (accelerate turns FSDP on only on accelerators, so the
   CPU tests cannot cover it), checking the same things.
5. With ``--vllm`` and vLLM installed: two GRPO steps with ``use_vllm`` in colocate mode.

The last output line is one JSON object: rollout and baseline tokens/s, each GRPO step's time, the peak GPU
memory, and ``ok`` (the exit status is 0 only when every check passed).

Running it on a GPU machine without TRL or network access. The script runs from a checkout, without
installing turnwise; torch 2.11 is inside pyproject's range and every package below accepts it. On a
machine with torch 2.11, transformers 5.17, peft, accelerate 1.15, pandas, pyarrow and xxhash but no TRL or
datasets (the H200 of benchmarks/results/gpu_check_h200.json), bring these wheels. Here, in the checkout's
root (``.whl`` is ignored by git; about 17 MB):

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \\
        trl==1.16.0 transformers==5.24.0 peft==0.21.2 accelerate==1.15.0 datasets==5.2.0 dill==0.4.1 \\
        multiprocess==0.70.19 "regex==2026.*"

and there, with ``.whl`` carried along:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site python3 benchmarks/gpu_check.py

(transformers 5.24 is the top of pyproject's range; regex is there because transformers 5.24 checks for a
recent one at import.)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout: turnwise is not installed on the GPU image

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Qwen/Qwen2.5-0.5B-Instruct's config.json, the sizes that set the cost of a step
QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                  rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu")
TINY = dict(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=16384, rope_theta=10000.0, rms_norm_eps=1e-6,
            tie_word_embeddings=True, hidden_act="silu")
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
REQUIRED = {"transformers": ("5.23", "5.25"), "trl": ("1.16.0", "1.16.1"), "peft": ("0.21", "0.22"),
            "accelerate": ("1.15", "2")}  # pyproject.toml's ranges


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (with --tiny: the smoke test)")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model and short episodes instead of Qwen2.5-0.5B")
    parser.add_argument("--episodes", type=int, default=32, help="episodes in the rollout comparison and per GRPO step")
    parser.add_argument("--turns", type=int, default=None, help="turns per episode (default 6; --tiny 2)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens per turn (default 64; --tiny 8)")
    parser.add_argument("--no-fsdp", action="store_true", help="skip the FSDP2 phase")
    parser.add_argument("--vllm", action="store_true", help="also run two GRPO steps with use_vllm (colocate)")
    parser.add_argument("--phase", choices=["fsdp"], help=argparse.SUPPRESS)  # the FSDP child process
    args = parser.parse_args(argv)
    args.turns = args.turns or (2 if args.tiny else 6)
    args.new_tokens = args.new_tokens or (8 if args.tiny else 64)
    return args


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("+")[0].split(".")[:3] if part.isdigit())


def stack() -> tuple[dict, list[str]]:
    """Installed versions, and what is outside pyproject's ranges (with the fix)."""
    from importlib.metadata import PackageNotFoundError, version

    found, problems = {}, []
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "vllm"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    for name, (low, high) in REQUIRED.items():
        if found[name] is None or not version_tuple(low) <= version_tuple(found[name]) < version_tuple(high):
            problems.append(f"{name} {found[name]} is outside turnwise's range [{low}, {high}): install the wheels "
                            "this script's docstring lists (pip install --no-index --no-deps --target /tmp/site ...) "
                            "and put /tmp/site first on PYTHONPATH")
    return found, problems


def corpus() -> str:
    """The repository's own task text: the SOP, system prompts and customer messages of training tasks."""
    from pipeline.envs import load_tasks, make_env

    parts = [(REPO / "data" / "customer_service" / "sop.md").read_text()]
    for task in load_tasks("customer_service", "train")[:200]:
        parts += [m["content"] for m in make_env(task).reset(task, seed=0)]
    return "\n".join(parts)


def build_tokenizer(vocab_size: int):
    """A byte-level BPE trained on :func:`corpus`, padded with filler tokens to ``vocab_size`` ids."""
    from itertools import product

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=min(vocab_size, 8192), special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    trained.train_from_iterator([corpus()], trainer=trainer)
    model = json.loads(trained.to_str())["model"]
    vocab, merges = dict(model["vocab"]), [tuple(m) if isinstance(m, list) else tuple(m.split(" "))
                                           for m in model["merges"]]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    fillers = ("".join(chars) for n in (2, 3) for chars in product(alphabet, repeat=n))
    for token in fillers:
        if len(vocab) >= vocab_size:
            break
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        padding_side="left")
    tokenizer.chat_template = CHATML
    return tokenizer


def build_model(shape: dict, tokenizer, device: str, dtype):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**{**shape, "vocab_size": max(shape["vocab_size"], len(tokenizer))},
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(dtype)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def patient(task):
    """The task with a customer who never leaves, so every episode plays all its turns."""
    task = copy.deepcopy(task)
    task.payload["customer"]["persona"]["patience"] = 1000
    return task


class GenerateBackend:
    """The baseline: each turn, one batched ``model.generate`` over every live episode's whole prompt (left-padded;
    nothing cached between turns), sampling with the same temperature. Logprobs are not kept (zeros)."""

    def __init__(self, model, tokenizer) -> None:
        self.model, self.tokenizer = model, tokenizer

    def release(self, key) -> None:
        pass

    def generate(self, requests):
        import torch

        from pipeline.rollout.backends.base import Generation

        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        width = max(len(r.prompt_ids) for r in requests)
        ids = torch.full((len(requests), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, request in enumerate(requests):
            ids[row, width - len(request.prompt_ids):] = torch.tensor(request.prompt_ids)
            mask[row, width - len(request.prompt_ids):] = 1
        with torch.no_grad():
            out = self.model.generate(input_ids=ids.to(self.model.device), attention_mask=mask.to(self.model.device),
                                      max_new_tokens=max(r.max_new_tokens for r in requests), do_sample=True,
                                      temperature=1.0, top_p=1.0, top_k=0, eos_token_id=eos, pad_token_id=pad)
        generations = []
        for row, request in enumerate(requests):
            tokens = out[row, width:].tolist()[: request.max_new_tokens]
            stopped = eos in tokens
            tokens = tokens[: tokens.index(eos) + 1] if stopped else tokens
            generations.append(Generation(tokens, [0.0] * len(tokens), truncated=not stopped))
        return generations


def play(backend, tokenizer, tasks, args, synchronize) -> dict:
    from pipeline.envs import make_env
    from pipeline.rollout import RolloutEngine

    engine = RolloutEngine(backend, tokenizer, max_new_tokens=args.new_tokens,
                           max_total_tokens=max_total_tokens(args), batch_size=len(tasks))
    synchronize()
    start = time.perf_counter()
    trajectories = engine.run(lambda t: make_env(t, max_turns=args.turns), tasks, seeds=0)
    synchronize()
    seconds = time.perf_counter() - start
    tokens = sum(len(turn.completion_ids) for t in trajectories for turn in t.turns)
    return {"episodes": len(trajectories), "turns": sum(len(t.turns) for t in trajectories), "tokens": tokens,
            "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1)}


def max_total_tokens(args) -> int:
    return 4096 + args.turns * (args.new_tokens + 256)  # the system prompt (~2k tokens), the turns, the replies


def grpo(model, tokenizer, tasks, args, output_dir: str, **grpo_overrides) -> dict:
    """Two multi-turn GRPO steps with LoRA; the checks on the loss and the weights."""
    import torch
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig

    from pipeline.training import (EpisodeRollout, RolloutConfig, TrajectoryReward, TurnwiseGRPOTrainer,
                                   default_reward, task_dataset)

    generations = 4
    per_step = args.episodes
    backend = "vllm" if grpo_overrides.get("use_vllm") else "hf"
    config = RolloutConfig(max_turns=args.turns, max_new_tokens=args.new_tokens,
                           max_total_tokens=max_total_tokens(args), backend=backend)
    step_tasks = tasks[: 2 * per_step // generations]  # distinct tasks for two steps
    rollout = EpisodeRollout(step_tasks, config, seed=0)
    reward = TrajectoryReward(default_reward(None, step_tasks), rollout)
    accumulation = max(1, per_step // 8)
    settings = dict(output_dir=output_dir, per_device_train_batch_size=per_step // accumulation,
                    gradient_accumulation_steps=accumulation, num_generations=generations, max_steps=2,
                    learning_rate=1e-4, logging_steps=1, report_to=[], save_strategy="no", beta=0.0,
                    loss_type="dapo", temperature=1.0, seed=0, max_completion_length=config.max_total_tokens,
                    use_cpu=args.cpu, bf16=not args.cpu)
    trainer = TurnwiseGRPOTrainer(
        model=model, processing_class=tokenizer, args=GRPOConfig(**{**settings, **grpo_overrides}),
        train_dataset=task_dataset(step_tasks),
        peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                               target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
        rollout=rollout, reward=reward, rollout_config=config)
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            times.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            times[-1] = time.perf_counter() - times[-1]

    trainer.add_callback(StepTimer())
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    params = dict(unwrapped.named_parameters())
    watched_base = [n for n in params if "lora_" not in n and "layers.0." in n][:4]
    before = {n: _full(p).detach().float().cpu().clone() for n, p in params.items() if "lora_B" in n or n in watched_base}
    trainer.train()
    params = dict(trainer.accelerator.unwrap_model(trainer.model).named_parameters())
    after = {n: _full(params[n]).detach().float().cpu() for n in before}
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"steps": trainer.state.global_step, "episodes_per_step": per_step,
            "step_time_s": [round(t, 2) for t in times], "loss": losses,
            "loss_finite": bool(losses) and all(math.isfinite(x) for x in losses),
            "lora_changed": any(not torch.equal(before[n], after[n]) for n in before if "lora_B" in n),
            "base_unchanged": all(torch.equal(before[n], after[n]) for n in watched_base),
            "distributed_type": str(trainer.accelerator.distributed_type).split(".")[-1],
            "rollout_turns_mean": _mean(h.get("rollout/turns/mean") for h in trainer.state.log_history)}


def _full(parameter):
    """A parameter as a whole tensor (FSDP2 keeps DTensor shards)."""
    return parameter.full_tensor() if hasattr(parameter, "full_tensor") else parameter


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return round(sum(values) / len(values), 2) if values else None


def ok(result: dict) -> bool:
    return bool(result.get("loss_finite") and result.get("lora_changed") and result.get("base_unchanged")
                and result.get("steps") == 2)


def fsdp_phase(args) -> dict:
    """Run this script's FSDP child under `accelerate launch` (one process) and read its JSON line."""
    if args.cpu:
        return {"skipped": "accelerate turns FSDP on only for processes on an accelerator"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "configs" / "accelerate" / "fsdp.yaml"), "--num_processes", "1", "--mixed_precision", "bf16",
               "--fsdp_cpu_ram_efficient_loading", "false",  # the model is built from a config, on the GPU
               str(Path(__file__).resolve()), "--phase", "fsdp", "--episodes", str(args.episodes),
               "--turns", str(args.turns), "--new-tokens", str(args.new_tokens)] + (["--tiny"] if args.tiny else [])
    path = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(REPO)]))
    run = subprocess.run(command, capture_output=True, text=True, timeout=420, env={**os.environ, "PYTHONPATH": path})
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    if run.returncode != 0 or not lines:
        return {"error": f"exit {run.returncode}", "tail": (run.stdout + run.stderr)[-3000:]}
    return json.loads(lines[-1])


def vllm_phase(new_model, tokenizer, tasks, args) -> dict:
    """Two GRPO steps with use_vllm (colocate) on a fresh copy of the model, saved for vLLM to load."""
    from pipeline.training.vllm import vllm_installed

    if not args.vllm:
        return {"skipped": "run with --vllm to include it"}
    if args.cpu or not vllm_installed():
        return {"skipped": "vLLM needs a GPU" if args.cpu else "vllm is not installed"}
    with tempfile.TemporaryDirectory() as checkpoint, tempfile.TemporaryDirectory() as out:
        model = new_model()
        model.save_pretrained(checkpoint)  # vLLM loads the base weights from a directory, then gets TRL's syncs
        tokenizer.save_pretrained(checkpoint)
        model = type(model).from_pretrained(checkpoint, dtype=model.dtype).to(model.device)
        result = grpo(model, tokenizer, tasks, args, out, use_vllm=True, vllm_mode="colocate",
                      vllm_gpu_memory_utilization=0.3, vllm_importance_sampling_mode="token_truncate")
    result["ok"] = ok(result)
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    started = time.perf_counter()
    versions, problems = stack()
    if problems:
        print("\n".join(problems), file=sys.stderr)
        print(json.dumps({"check": "gpu_check", "ok": False, "stack": versions, "problems": problems}))
        return 2
    if not args.cpu and not torch.cuda.is_available():
        print("No CUDA GPU is visible: run on a GPU machine, or pass --cpu --tiny for the smoke test.", file=sys.stderr)
        return 2
    device = "cpu" if args.cpu else "cuda"
    dtype = torch.float32 if args.cpu else torch.bfloat16
    synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    shape = TINY if args.tiny else QWEN25_05B
    tokenizer = build_tokenizer(shape["vocab_size"])
    model = build_model(shape, tokenizer, device, dtype)

    from pipeline.envs import load_tasks
    from pipeline.rollout.backends.hf import HFBackend

    tasks = [patient(t) for t in load_tasks("customer_service", "train")[: args.episodes]]
    if args.phase == "fsdp":
        with tempfile.TemporaryDirectory() as out:
            result = grpo(model, tokenizer, tasks, args, out)
        result["ok"] = ok(result) and result["distributed_type"] == "FSDP"
        print(json.dumps(result))
        return 0 if result["ok"] else 1

    result = {"check": "gpu_check", "mode": "cpu-tiny" if args.cpu else "gpu" + ("-tiny" if args.tiny else ""),
              "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "stack": versions,
              "model": {"shape": "tiny" if args.tiny else "Qwen2.5-0.5B", "dtype": str(dtype).split(".")[-1],
                        "parameters": sum(p.numel() for p in model.parameters()), "vocab": len(tokenizer)}}
    play(HFBackend(model, tokenizer, temperature=1.0, seed=1), tokenizer, tasks[:2], args, synchronize)  # warm-up
    result["rollout"] = play(HFBackend(model, tokenizer, temperature=1.0, seed=0), tokenizer, tasks, args, synchronize)
    result["generate_baseline"] = play(GenerateBackend(model, tokenizer), tokenizer, tasks, args, synchronize)
    result["rollout_speedup"] = round(result["rollout"]["tokens_per_s"] / result["generate_baseline"]["tokens_per_s"], 2)
    grpo_tasks = [patient(t) for t in load_tasks("customer_service", "train")[: 2 * args.episodes // 4]]
    with tempfile.TemporaryDirectory() as out:
        result["grpo"] = grpo(model, tokenizer, grpo_tasks, args, out)
    if device == "cuda":
        result["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    result["fsdp"] = {"skipped": "--no-fsdp"} if args.no_fsdp else fsdp_phase(args)
    result["vllm"] = vllm_phase(lambda: build_model(shape, tokenizer, device, dtype), tokenizer, grpo_tasks, args)
    phases = [ok(result["grpo"])] + [result[name].get("ok", False) for name in ("fsdp", "vllm")
                                     if "skipped" not in result[name]]
    result["ok"] = all(phases)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
