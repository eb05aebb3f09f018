"""Tests for pipeline/training/grpo_trainer.py: multi-turn GRPO on a tiny model (see conftest.py for the
shrunk settings), the registered estimators in training, and the pins on the private TRL hooks."""

from __future__ import annotations

import inspect

import pytest
import torch
from trl import GRPOTrainer

from pipeline.training import ESTIMATORS, AdvantageInput, register_estimator
from pipeline.training.grpo_trainer import TRL_HOOKS, TurnwiseGRPOTrainer


def lora_and_base(trainer):
    params = dict(trainer.model.named_parameters())
    lora = [n for n in params if "lora_" in n]
    base = [n for n in params if "lora_" not in n]
    assert lora and base
    return params, lora, base


# -- the pins on TRL -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TRL_HOOKS))
def test_each_overridden_trl_hook_has_the_signature_it_was_written_for(name):
    """Fails when a TRL upgrade changes a private method turnwise overrides: re-read TRL's new version of
    the method, adapt the override, then update TRL_HOOKS."""
    assert str(inspect.signature(getattr(GRPOTrainer, name))) == TRL_HOOKS[name]


def test_every_private_trl_method_overridden_is_pinned():
    overridden = {name for name, value in vars(TurnwiseGRPOTrainer).items() if callable(value)
                  and name.startswith("_") and not name.startswith("__") and hasattr(GRPOTrainer, name)}
    assert overridden == {name for name in TRL_HOOKS if name.startswith("_")}


def test_recorded_metrics_are_averaged_into_the_next_log(make_trainer):
    """The one write to TRL's private metric buffer: values recorded in a logging window reach log() as
    their mean, next to TRL's own, and the buffer is emptied."""
    trainer = make_trainer()
    trainer.model.train()
    trainer._record_metrics("train", [("rollout/reward/mean", 0.25), ("rollout/reward/mean", 0.75),
                                      ("value/loss", 2.0)])
    trainer.log({"loss": 1.5})
    logged = trainer.state.log_history[-1]
    assert logged["rollout/reward/mean"] == 0.5 and logged["value/loss"] == 2.0 and logged["loss"] == 1.5
    trainer.log({"loss": 1.0})
    assert "rollout/reward/mean" not in trainer.state.log_history[-1]


# -- training ------------------------------------------------------------------------------------------


def test_lora_weights_change_and_base_weights_do_not(make_trainer):
    trainer = make_trainer()
    params, lora, base = lora_and_base(trainer)
    before = {n: p.detach().clone() for n, p in params.items()}
    trainer.train()
    assert any(not torch.equal(before[n], params[n]) for n in lora if "lora_B" in n)
    assert all(torch.equal(before[n], params[n]) for n in base)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2 and all("rollout/reward/mean" in h for h in logged)


@pytest.mark.parametrize("advantage", ["reinforce_pp", "opo", "gpg"])
def test_each_added_estimator_trains_a_step(make_trainer, advantage):
    """One GRPO step with REINFORCE++, OPO and GPG advantages: the loss is logged, the LoRA weights move,
    the base weights do not, and the advantages sit on assistant tokens only."""
    # 4 episodes per step (2 tasks x 2 generations), so the batch has two groups to compare
    trainer = make_trainer(advantage, max_steps=1, per_device_train_batch_size=4)
    params, lora, base = lora_and_base(trainer)
    before = {n: p.detach().clone() for n, p in params.items()}
    seen = []
    generate = trainer._generate_and_score_completions

    def keep(inputs):
        output = generate(inputs)
        seen.append(output)
        return output

    trainer._generate_and_score_completions = keep
    trainer.train()
    output = seen[0]
    assert output["advantages"].shape == output["completion_ids"].shape  # per token, not TRL's per episode
    assert (output["advantages"] != 0).any()
    assert (output["advantages"][output["tool_mask"] == 0] == 0).all()
    assert any(not torch.equal(before[n], params[n]) for n in lora if "lora_B" in n)
    assert all(torch.equal(before[n], params[n]) for n in base)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 1 and isinstance(logged[0]["loss"], float)


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_group_based_keeps_trls_advantages_and_the_estimator_gives_the_same(make_trainer, rows, scale_rewards):
    """advantage=group_based leaves TRL's own GRPO advantages (one per episode) in place, and the registered
    group_based estimator computes exactly those numbers from the same batch."""
    trainer = make_trainer("group_based", scale_rewards=scale_rewards)
    trainer.model.train()
    output = trainer._generate_and_score_completions(rows(trainer, [0, 0, 1, 1]))
    assert output["advantages"].shape == (4,)  # TRL's, untouched
    trajectories = trainer.rollout.last
    batch = trainer.advantage_input(trajectories, [t.task_id for t in trajectories])
    ours = ESTIMATORS["group_based"].estimator(batch)
    for episode, turns in enumerate(ours):
        assert len(turns) == len(trajectories[episode].turns)
        assert all(torch.equal(torch.tensor(a, dtype=torch.float32), output["advantages"][episode]) for a in turns)
    if scale_rewards != "none":
        assert (output["advantages"] != 0).any()


def test_the_trainer_writes_a_registered_estimators_turn_values_on_each_turns_tokens(make_trainer, rows):
    """An estimator registered from outside turnwise is used as is: turn t of episode i gets the value the
    estimator returned for it on exactly that turn's tokens, and 0 elsewhere; what it logs is logged."""

    @register_estimator("test_turn_index")
    def turn_index(batch: AdvantageInput) -> list[list[float]]:
        batch.log_metric("test/episodes", len(batch.turn_rewards))
        return [[10.0 * i + t + 1 for t in range(len(r))] for i, r in enumerate(batch.turn_rewards)]

    try:
        trainer = make_trainer("test_turn_index")
        trainer.model.train()
        output = trainer._generate_and_score_completions(rows(trainer, [0, 0, 1, 1]))
    finally:
        ESTIMATORS.pop("test_turn_index")
    advantages = output["advantages"]
    for i, trajectory in enumerate(trainer.rollout.last):
        start = trajectory.tokens.turn_spans[0][0]
        expected = torch.zeros(advantages.shape[1])
        for t, (s, e) in enumerate(trajectory.tokens.turn_spans):
            expected[s - start: e - start] = 10.0 * i + t + 1
        assert torch.equal(advantages[i], expected)
    assert trainer._metrics["train"]["test/episodes"] == [4]


def test_masked_environment_tokens_get_zero_gradient(make_trainer, rows):
    """The loss's gradient reaches the logits that predict sampled assistant tokens and never those that
    predict environment tokens (tool results, customer replies, template tokens)."""
    # Episode-level advantages are non-zero on every completion token, environment tokens included, so
    # only the mask can keep those tokens out of the gradient. The plain forward (share_prefix off) keeps
    # one hidden state per input position; test_shared_prefix.py shows the shared one is equal.
    trainer = make_trainer(advantage="group_based", share_prefix=False)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which this test bypasses
    inputs = trainer._generate_and_score_completions(rows(trainer, [0, 0, 1, 1]))
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


def test_resume_after_step_two_reaches_the_same_weights_at_step_four(make_trainer, tmp_path):
    """A run stopped after step 2 and resumed from its checkpoint ends, at step 4, where an uninterrupted
    run ends: the optimizer state, data order and rollout sampling all resume exactly."""
    straight = make_trainer(output_dir=tmp_path / "a", max_steps=4, save_strategy="steps", save_steps=2)
    straight.train()
    checkpoint = tmp_path / "a" / "checkpoint-2"
    assert (checkpoint / "optimizer.pt").exists() and (checkpoint / "trainer_state.json").exists()

    resumed = make_trainer(output_dir=tmp_path / "b", max_steps=4, save_strategy="steps", save_steps=2)
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
    assert not list(checkpoint.glob("*.pt.tmp")) and not (checkpoint / "value_head.pt").exists()  # no critic here


def test_trained_ids_are_the_sampled_ids_over_five_turns(make_trainer, rows):
    """What the loss sees as completion tokens is the episode's token sequence after the opening prompt,
    and its assistant positions hold exactly the ids sampled at each of the five turns."""
    trainer = make_trainer()
    trainer.rollout.config.max_turns = 5
    trainer.model.train()
    inputs = trainer._generate_and_score_completions(rows(trainer, [0, 0]))
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


# -- the gae critic ------------------------------------------------------------------------------------


def test_gae_trains_its_value_head_and_writes_token_advantages(make_trainer, rows):
    """advantage=gae: a short run completes, the value head (its own parameters and optimiser) moves
    while being fitted to the lambda-returns, and the advantages are per token, zero off assistant tokens."""
    trainer = make_trainer(advantage="gae")
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    inputs = trainer._generate_and_score_completions(rows(trainer, [0, 0, 1, 1]))
    assert inputs["advantages"].shape == inputs["completion_ids"].shape
    assert (inputs["advantages"][inputs["tool_mask"] == 0] == 0).all()
    head = trainer.estimator.head
    assert not any(p is q for p in head.parameters() for q in trainer.model.parameters())
    before = [p.detach().clone() for p in head.parameters()]
    trainer.train()
    assert any(not torch.equal(a, b) for a, b in zip(before, head.parameters()))
    logged = [h for h in trainer.state.log_history if "value/loss" in h]
    assert len(logged) == 2 and all(h["value/loss"] >= 0 for h in logged)


def test_hidden_states_are_computed_only_for_an_estimator_that_asks(make_trainer, rows, monkeypatch):
    import pipeline.training.grpo_trainer as grpo_trainer

    calls = []
    original = grpo_trainer.boundary_hidden_states
    monkeypatch.setattr(grpo_trainer, "boundary_hidden_states", lambda *a: calls.append(1) or original(*a))
    for advantage, expected in (("rloo", 0), ("gae", 1)):
        calls.clear()
        trainer = make_trainer(advantage=advantage)
        trainer.model.train()
        trainer._generate_and_score_completions(rows(trainer, [0, 0]))
        assert len(calls) == expected, advantage


def test_gae_resume_restores_the_value_head_and_its_optimiser(make_trainer, tmp_path, caplog):
    """advantage=gae: checkpoints carry the value head and its Adam state (written from on_save), so a run
    resumed from step 2 ends at step 4 with the same critic and the same LoRA weights as an uninterrupted run."""
    straight = make_trainer(advantage="gae", output_dir=tmp_path / "a", max_steps=4, save_strategy="steps",
                            save_steps=2)
    straight.train()
    checkpoint = tmp_path / "a" / "checkpoint-2"
    assert (checkpoint / "value_head.pt").exists() and not list(checkpoint.glob("*.tmp"))
    saved = torch.load(checkpoint / "value_head.pt", weights_only=True)
    assert saved["hidden_size"] == 16 and saved["optimizer"]["state"]  # Adam's moments, not a fresh optimiser

    resumed = make_trainer(advantage="gae", output_dir=tmp_path / "b", max_steps=4, save_strategy="steps",
                           save_steps=2)
    assert resumed.load_estimator_state(checkpoint)
    with caplog.at_level("WARNING"):
        resumed.train(resume_from_checkpoint=str(checkpoint))
    assert "starts again from scratch" not in caplog.text
    assert resumed.rollout.calls == 2
    for a, b in zip(straight.estimator.head.parameters(), resumed.estimator.head.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    a = {n: p for n, p in straight.model.named_parameters() if "lora_" in n}
    b = {n: p for n, p in resumed.model.named_parameters() if "lora_" in n}
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)
