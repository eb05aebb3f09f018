"""Tests for pipeline/trainer.py: multi-turn GRPO on a tiny model.

Shrunk settings, each on purpose: a 2-layer random Llama (logic, not quality), 4 tasks, 2 generations
per task, 2 assistant turns of at most 6 new tokens, 2 optimiser steps. The reward is an arbitrary
function of the sampled ids, so groups differ and advantages are non-zero even for a random model.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from trl import GRPOConfig

from pipeline.envs import load_tasks
from pipeline.models import load_model
from pipeline.trainer import EpisodeRollout, RolloutConfig, TrajectoryReward, TurnwiseGRPOTrainer, task_dataset


def token_count_reward(trajectory) -> float:
    return sum(sum(turn.completion_ids) for turn in trajectory.turns) % 7 / 7.0


def make_trainer(tiny_model_dir, tmp_path, advantage="group_based", share_prefix=True,
                 **overrides) -> TurnwiseGRPOTrainer:
    model, tokenizer = load_model(str(tiny_model_dir))
    tasks = load_tasks("customer_service", "train")[:4]
    config = RolloutConfig(max_turns=2, max_new_tokens=6, max_total_tokens=8000, advantage=advantage,
                           share_prefix=share_prefix)
    rollout = EpisodeRollout(tasks, config)
    settings = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=2, num_generations=2, max_steps=2,
        learning_rate=5e-2,  # large, so two steps visibly move the LoRA weights
        logging_steps=1, report_to=[], use_cpu=True, bf16=False, save_strategy="no", max_completion_length=8000,
        beta=0.0, temperature=1.0, seed=0,
    )
    args = GRPOConfig(**{**settings, **overrides})
    return TurnwiseGRPOTrainer(
        model=model, processing_class=tokenizer, args=args, train_dataset=task_dataset(tasks),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        rollout=rollout, reward=TrajectoryReward(token_count_reward, rollout), rollout_config=config,
    )


def test_lora_weights_change_and_base_weights_do_not(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path)
    params = dict(trainer.model.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    trainer.train()
    lora = [n for n in params if "lora_" in n]
    base = [n for n in params if "lora_" not in n]
    assert lora and base
    assert any(not torch.equal(before[n], params[n]) for n in lora if "lora_B" in n)
    assert all(torch.equal(before[n], params[n]) for n in base)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2 and all("rollout/reward/mean" in h for h in logged)


def test_masked_environment_tokens_get_zero_gradient(tiny_model_dir, tmp_path):
    """The loss's gradient reaches the logits that predict sampled assistant tokens and never those that
    predict environment tokens (tool results, customer replies, template tokens)."""
    # Episode-level advantages are non-zero on every completion token, environment tokens included, so
    # only the mask can keep those tokens out of the gradient. The plain forward (share_prefix off) keeps
    # one hidden state per input position; test_shared_prefix_forward_... shows the shared one is equal.
    trainer = make_trainer(tiny_model_dir, tmp_path, advantage="group_based", share_prefix=False)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which this test bypasses
    inputs = trainer._generate_and_score_completions(
        [{"prompt": row["prompt"], "task_id": row["task_id"]} for row in trainer.train_dataset.select([0, 0, 1, 1])])
    env_mask = inputs["tool_mask"]
    assert (env_mask == 0).any() and (env_mask == 1).any()
    assert (inputs["advantages"] != 0).any()
    captured = {}

    def keep(module, args, output):
        output.retain_grad()
        captured["hidden"] = output

    # The final norm's output at position j is what predicts token j + 1 (TRL computes logits from it).
    handle = trainer.model.get_base_model().model.norm.register_forward_hook(keep)
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    handle.remove()
    hidden = captured["hidden"]
    prompt_len, completion_len = inputs["prompt_ids"].shape[1], inputs["completion_ids"].shape[1]
    assert hidden.shape[1] == prompt_len + completion_len
    per_token = hidden.grad[:, prompt_len - 1 : prompt_len + completion_len - 1].abs().sum(-1)  # (B, C)
    valid = inputs["completion_mask"].bool()
    assert torch.all(per_token[valid & (env_mask == 0)] == 0)
    assert (per_token[valid & (env_mask == 1)] > 0).any()


def test_shared_prefix_forward_gives_the_full_forwards_logps_and_gradients(tiny_model_dir, tmp_path):
    """Running the episodes' common prefix (the system prompt) once and the rest on its repeated KV cache
    gives the plain forward's per-token log-probs, entropies and LoRA gradients, on TRL's layout (left-padded
    prompts of different lengths, right-padded completions of different lengths)."""
    trainer = make_trainer(tiny_model_dir, tmp_path, advantage="group_based", gradient_checkpointing=False)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    inputs = trainer._generate_and_score_completions(
        [{"prompt": row["prompt"], "task_id": row["task_id"]} for row in trainer.train_dataset.select([0, 0, 2, 3])])
    prompt_mask, completion_mask = inputs["prompt_mask"], inputs["completion_mask"]
    assert len(set(prompt_mask.sum(1).tolist())) > 1 and len(set(completion_mask.sum(1).tolist())) > 1
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([prompt_mask, completion_mask], 1)
    width = inputs["completion_ids"].size(1)
    lora = [p for n, p in trainer.model.named_parameters() if "lora_" in n]

    def run(share: bool):
        trainer.rollout_config.share_prefix = share
        trainer.model.zero_grad()
        logps, entropies, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, width,
                                                                        batch_size=3, compute_entropy=True)
        (logps * completion_mask * torch.arange(1.0, width + 1)).sum().backward()  # weights every position apart
        return logps.detach(), entropies.detach(), [p.grad.clone() for p in lora]

    calls = []
    decoder = trainer.model.get_base_model().model
    handle = decoder.register_forward_hook(lambda module, args, kwargs, out: calls.append(kwargs["input_ids"].shape),
                                           with_kwargs=True)
    shared = run(True)
    handle.remove()
    full = run(False)
    prefix = calls[0][1]
    assert calls[0][0] == 1 and prefix > 1000  # the system prompt ran once, as one row
    assert [c[0] for c in calls] == [1, 3, 1, 1]  # then the rest: a chunk of 3 rows and one of 1
    assert all(c[1] < ids.size(1) - prefix + 1 for c in calls[1:] if c[0] > 1)
    torch.testing.assert_close(shared[0], full[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(shared[1], full[1], rtol=1e-4, atol=1e-5)
    assert (full[0][completion_mask.bool()] != 0).all() and (full[0][~completion_mask.bool()] == 0).all()
    assert any(g.abs().sum() > 0 for g in full[2])
    for a, b in zip(shared[2], full[2]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)


def test_resume_after_step_two_reaches_the_same_weights_at_step_four(tiny_model_dir, tmp_path):
    """A run stopped after step 2 and resumed from its checkpoint ends, at step 4, where an uninterrupted
    run ends: the optimizer state, data order and rollout sampling all resume exactly."""
    straight = make_trainer(tiny_model_dir, tmp_path / "a", max_steps=4, save_strategy="steps", save_steps=2)
    straight.train()
    checkpoint = tmp_path / "a" / "checkpoint-2"
    assert (checkpoint / "optimizer.pt").exists() and (checkpoint / "trainer_state.json").exists()

    resumed = make_trainer(tiny_model_dir, tmp_path / "b", max_steps=4, save_strategy="steps", save_steps=2)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 4
    assert resumed.rollout.calls == 2  # it really resumed: only steps 3 and 4 were played

    a = {n: p for n, p in straight.model.named_parameters() if "lora_" in n}
    b = {n: p for n, p in resumed.model.named_parameters() if "lora_" in n}
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)
    # and training did move them between step 2 and step 4
    from safetensors.torch import load_file

    at_two = load_file(str(checkpoint / "adapter_model.safetensors"))
    assert any(not torch.allclose(v, a[k.replace(".weight", ".default.weight")], atol=1e-6)
               for k, v in at_two.items() if "lora_B" in k and k.replace(".weight", ".default.weight") in a)


def test_trained_ids_are_the_sampled_ids_over_five_turns(tiny_model_dir, tmp_path):
    """What the loss sees as completion tokens is the episode's token sequence after the opening prompt,
    and its assistant positions hold exactly the ids sampled at each of the five turns."""
    trainer = make_trainer(tiny_model_dir, tmp_path)
    trainer.rollout.config.max_turns = 5
    trainer.model.train()
    inputs = trainer._generate_and_score_completions(
        [{"prompt": row["prompt"], "task_id": row["task_id"]} for row in trainer.train_dataset.select([0, 0])])
    for row, traj in enumerate(trainer.rollout.last):
        assert len(traj.turns) == 5
        start = traj.tokens.turn_spans[0][0]
        expected = traj.tokens.input_ids[start:]
        n = len(expected)
        assert inputs["completion_ids"][row, :n].tolist() == expected
        assert inputs["prompt_ids"][row][inputs["prompt_mask"][row].bool()].tolist() == traj.tokens.input_ids[:start]
        mask = inputs["tool_mask"][row, :n].bool()
        sampled = [tok for turn in traj.turns for tok in turn.completion_ids]
        assert inputs["completion_ids"][row, :n][mask].tolist() == sampled


def test_train_entry_point_validates_writes_samples_and_saves_the_adapter(tiny_model_dir, tmp_path, caplog):
    """``train()`` runs the whole loop: validation through pipeline.evaluation, trajectory samples as
    JSONL at each logging step, and a saved adapter; ``resume`` continues from the last checkpoint."""
    import json

    from trl import GRPOConfig, ModelConfig

    from pipeline.config import TaskArguments
    from pipeline.trainer import train

    # --resume on a fresh output directory starts from scratch (a pipeline run resumes every stage this way)
    task_args = TaskArguments(train_limit=2, val_limit=2, val_every=1, resume=True)
    tmp_path = tmp_path / "run"
    rollout_config = RolloutConfig(max_turns=2, max_new_tokens=4, max_total_tokens=8000)
    model_args = ModelConfig(model_name_or_path=str(tiny_model_dir), use_peft=True, lora_r=4, lora_alpha=8,
                             lora_target_modules=["q_proj", "v_proj"])

    def grpo_args(steps):
        return GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, num_generations=2, max_steps=steps,
                          logging_steps=1, report_to=[], use_cpu=True, bf16=False, save_strategy="steps", save_steps=1, beta=0.0,
                          learning_rate=1e-2)

    with caplog.at_level("WARNING", logger="pipeline.trainer"):
        result = train(task_args, rollout_config, grpo_args(2), model_args, reward_fn=token_count_reward)
    assert "--resume: no checkpoint in" in caplog.text
    assert result["steps"] == 2 and set(result["val"]) == {"val/success", "val/pass@1", "val/completion"}
    samples = sorted((tmp_path / "samples").glob("step-*.jsonl"))
    assert [p.name for p in samples] == ["step-000001.jsonl", "step-000002.jsonl"]
    record = json.loads(samples[0].read_text().splitlines()[0])
    assert record["task_id"] and record["tokens"]["assistant_mask"]
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    history = json.loads((tmp_path / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
    assert any("val/success" in h for h in history)  # validation ran during training (val_every=1)
    assert any("rollout/turns/mean" in h and "analysis/zero_adv_groups" in h for h in history)
    final_history = json.loads((tmp_path / "log_history.json").read_text())
    # val_every=1 validated step 2 already: the final val is that one, not a second evaluation
    assert [h["step"] for h in final_history if "val/success" in h] == [1, 2]
    assert (tmp_path / "grpo_result.json").is_file()

    again = train(task_args, rollout_config, grpo_args(3), model_args, reward_fn=token_count_reward)
    assert again["steps"] == 3
    assert (tmp_path / "samples" / "step-000003.jsonl").exists()


def test_keep_best_val_returns_the_best_validations_adapter_and_a_resume_keeps_competing(tiny_model_dir, tmp_path,
                                                                                        monkeypatch):
    """keep_best_val: the adapter of the step with the best val success (ties: the earlier) is kept in
    best_adapter/ with its step, and is the run's result adapter; the last step's stays in adapter/. A
    resumed run starts from the kept best; a fresh run in the same directory replaces it."""
    import json

    from safetensors.torch import load_file
    from trl import GRPOConfig, ModelConfig

    from pipeline.config import TaskArguments
    from pipeline.trainer import BEST_FILE, ValidationCallback, train

    scores = iter([0.25, 0.75, 0.75, 0.5, 0.5])  # steps 1-3, then a resumed step 4, then a fresh run

    def validate(self):
        return {"val/success": next(scores), "val/pass@1": 0.0, "val/completion": 0.0}

    monkeypatch.setattr(ValidationCallback, "validate", validate)
    rollout_config = RolloutConfig(max_turns=2, max_new_tokens=4, max_total_tokens=8000)
    model_args = ModelConfig(model_name_or_path=str(tiny_model_dir), use_peft=True, lora_r=4, lora_alpha=8,
                             lora_target_modules=["q_proj", "v_proj"])

    def run(steps, resume):
        grpo_args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, num_generations=2,
                               max_steps=steps, logging_steps=1, report_to=[], use_cpu=True, bf16=False,
                               save_strategy="steps", save_steps=1, beta=0.0, learning_rate=1e-2)
        task_args = TaskArguments(train_limit=2, val_limit=1, val_every=1, keep_best_val=True, foothold_tasks=0,
                                  resume=resume)
        return train(task_args, rollout_config, grpo_args, model_args, reward_fn=token_count_reward)

    def weights(directory):
        return load_file(str(directory / "adapter_model.safetensors"))

    result = run(3, resume=False)
    best = tmp_path / "best_adapter"
    assert result["adapter"] == str(best) and result["final_adapter"] == str(tmp_path / "adapter")
    assert result["best_val"] == {"step": 2, "val/success": 0.75, "adapter": str(best)}
    assert json.loads((best / BEST_FILE).read_text()) == result["best_val"]
    kept, step_2, last = weights(best), weights(tmp_path / "checkpoint-2"), weights(tmp_path / "adapter")
    assert kept.keys() == step_2.keys() and all(torch.equal(kept[k], step_2[k]) for k in kept)
    assert any(not torch.equal(kept[k], last[k]) for k in kept)
    assert json.loads((best / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model_dir)
    assert not list(tmp_path.glob(".best_adapter*"))  # no staging left behind

    resumed = run(4, resume=True)  # step 4 validates 0.5: the step-2 adapter stays the best
    assert resumed["best_val"]["step"] == 2 and all(torch.equal(kept[k], v) for k, v in weights(best).items())

    fresh = run(1, resume=False)  # a new run in the same directory does not compete with the old best
    assert fresh["best_val"] == {"step": 1, "val/success": 0.5, "adapter": str(best)}


def test_keep_best_val_needs_periodic_validation():
    from pipeline.config import TaskArguments

    with pytest.raises(ValueError, match="keep_best_val chooses among periodic validations: set val_every"):
        TaskArguments(keep_best_val=True)


def test_gae_trains_its_value_head_and_writes_token_advantages(tiny_model_dir, tmp_path):
    """advantage=gae: a short run completes, the value head (its own parameters and optimiser) moves
    while being fitted to the lambda-returns, and the advantages are per token, zero off assistant tokens."""
    trainer = make_trainer(tiny_model_dir, tmp_path, advantage="gae")
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    rows = [{"prompt": r["prompt"], "task_id": r["task_id"]} for r in trainer.train_dataset.select([0, 0, 1, 1])]
    inputs = trainer._generate_and_score_completions(rows)
    assert inputs["advantages"].shape == inputs["completion_ids"].shape
    assert (inputs["advantages"][inputs["tool_mask"] == 0] == 0).all()
    head = trainer.value_head
    assert not any(p is q for p in head.parameters() for q in trainer.model.parameters())
    before = [p.detach().clone() for p in head.parameters()]
    trainer.train()
    assert any(not torch.equal(a, b) for a, b in zip(before, head.parameters()))
    logged = [h for h in trainer.state.log_history if "value/loss" in h]
    assert len(logged) == 2 and all(h["value/loss"] >= 0 for h in logged)


def test_gae_resume_restores_the_value_head_and_its_optimiser(tiny_model_dir, tmp_path):
    """advantage=gae: checkpoints carry the value head and its Adam state, so a run resumed from step 2
    ends at step 4 with the same critic and the same LoRA weights as an uninterrupted run."""
    straight = make_trainer(tiny_model_dir, tmp_path / "a", advantage="gae", max_steps=4, save_strategy="steps",
                            save_steps=2)
    straight.train()
    checkpoint = tmp_path / "a" / "checkpoint-2"
    assert (checkpoint / "value_head.pt").exists()

    resumed = make_trainer(tiny_model_dir, tmp_path / "b", advantage="gae", max_steps=4, save_strategy="steps",
                           save_steps=2)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.rollout.calls == 2
    for a, b in zip(straight.value_head.parameters(), resumed.value_head.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    a = {n: p for n, p in straight.model.named_parameters() if "lora_" in n}
    b = {n: p for n, p in resumed.model.named_parameters() if "lora_" in n}
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


def test_metrics_reach_tensorboard_under_their_namespaced_names(tiny_model_dir, tmp_path):
    """report_to=tensorboard writes rollout/... and analysis/... scalars under those exact tags (not under
    transformers' train/ prefix)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = make_trainer(tiny_model_dir, tmp_path, max_steps=1, report_to=["tensorboard"])
    trainer.train()
    events = list(tmp_path.rglob("events.out.tfevents.*"))
    assert events
    tags = set()
    for path in events:
        acc = EventAccumulator(str(path))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    for name in ("rollout/reward/mean", "rollout/turns/mean", "analysis/zero_adv_groups", "rollout/completion"):
        assert name in tags, (name, sorted(tags))
    assert "train/loss" in tags  # un-namespaced metrics keep transformers' prefix
