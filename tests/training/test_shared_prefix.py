"""Tests for pipeline/training/shared_prefix.py: the loss's forward with the batch's common prefix run once and
the LM head run only at the scored positions, against TRL's own forward (the fused LM head over every
position)."""

from __future__ import annotations

import functools

import pytest
import torch
from trl import GRPOTrainer

import pipeline.training.lm_head as lm_head
import pipeline.training.shared_prefix as shared_prefix


@pytest.fixture
def batch(make_trainer, rows):
    """A trainer and one rollout batch in TRL's layout: left-padded prompts of different lengths, right-padded
    completions of different lengths, with environment tokens inside the completions (tool_mask 0)."""
    trainer = make_trainer(advantage="group_based", gradient_checkpointing=False)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    inputs = trainer._generate_and_score_completions(rows(trainer, [0, 0, 2, 3]))
    prompt_mask, completion_mask = inputs["prompt_mask"], inputs["completion_mask"]
    assert len(set(prompt_mask.sum(1).tolist())) > 1 and len(set(completion_mask.sum(1).tolist())) > 1
    assert (inputs["tool_mask"][completion_mask.bool()] == 0).any()  # environment replies inside the completions
    return trainer, inputs


def trl_forward(trainer):
    """TRL's own ``_get_per_token_logps_and_entropies`` bound to the trainer."""
    return functools.partial(GRPOTrainer._get_per_token_logps_and_entropies, trainer)


@pytest.mark.parametrize("per_row", [True, False], ids=["rows_one_at_a_time", "rows_batched"])
def test_shared_and_plain_forwards_give_trls_logps_entropies_and_gradients_at_the_scored_positions(
        batch, per_row, monkeypatch):
    """With the prefix shared or not, and only the trained positions (assistant tokens) projected through
    the LM head, the log-probs, entropies and LoRA gradients equal TRL's fused forward over every position,
    wherever the loss looks; elsewhere the values are 0. The prefix (the system prompt) runs once per chunk
    of rows, and the LM head sees exactly the scored tokens. The remainders run one row at a time, without
    their padding (the CPU's way), or as one padded batch on the repeated cache (other devices')."""
    monkeypatch.setattr(shared_prefix, "PER_ROW_DEVICES", frozenset({"cpu"}) if per_row else frozenset())
    trainer, inputs = batch
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    width = inputs["completion_ids"].size(1)
    scored = (inputs["completion_mask"] * inputs["tool_mask"]).bool()
    weights = torch.arange(1.0, width + 1) * scored  # the loss looks at scored positions only, each weighted apart
    lora = [p for n, p in trainer.model.named_parameters() if "lora_" in n]

    def run(forward, share: bool):
        trainer.rollout_config.share_prefix = share
        trainer.model.zero_grad()
        trainer._scored_positions = scored.long()
        try:
            logps, entropies, _ = forward(trainer.model, ids, mask, width, batch_size=3, compute_entropy=True)
        finally:
            trainer._scored_positions = None
        (logps * weights).sum().backward()
        return logps.detach(), entropies.detach(), [p.grad.clone() for p in lora]

    calls, projected = [], []
    decoder = trainer.model.get_base_model().model
    handle = decoder.register_forward_hook(lambda module, args, kwargs, out: calls.append(kwargs["input_ids"].shape),
                                           with_kwargs=True)
    original = lm_head.selective_log_probs
    lm_head.selective_log_probs = lambda hidden, *a, **k: projected.append(hidden.shape[0]) or original(hidden, *a, **k)
    try:
        shared = run(trainer._get_per_token_logps_and_entropies, True)
    finally:
        handle.remove()
        lm_head.selective_log_probs = original
    plain = run(trainer._get_per_token_logps_and_entropies, False)
    reference = run(trl_forward(trainer), False)

    prefix = calls[0][1]
    assert calls[0][0] == 1 and prefix > 1000  # the system prompt ran once, as one row
    if per_row:  # then each row of the chunk of 3 on the prefix, its real tokens only; then the chunk of 1
        assert [c[0] for c in calls] == [1] * 6
        assert [c[1] for c in calls[1:4]] == [int(n) - prefix for n in mask[:3].sum(1)]
    else:  # then the rest: a chunk of 3 rows and one of 1
        assert [c[0] for c in calls] == [1, 3, 1, 1]
        assert calls[1][1] == int(mask[:3].sum(1).max()) - prefix
    assert sum(projected) == int(scored.sum())  # the LM head saw the trained tokens and nothing else
    for ours in (shared, plain):
        torch.testing.assert_close(ours[0][scored], reference[0][scored], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours[1][scored], reference[1][scored], rtol=1e-4, atol=1e-5)
        assert (ours[0][~scored] == 0).all() and (ours[1][~scored] == 0).all()
        for a, b in zip(ours[2], reference[2]):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)
    assert (reference[0][~scored & inputs["completion_mask"].bool()] != 0).all()  # TRL scores env tokens too
    assert any(g.abs().sum() > 0 for g in reference[2])


def test_the_grpo_loss_and_its_gradients_equal_trls(batch):
    """End to end through ``compute_loss`` (which names the trained positions): the loss, TRL's logged
    entropy and the LoRA gradients equal those of TRL's own forward."""
    trainer, inputs = batch
    lora = [p for n, p in trainer.model.named_parameters() if "lora_" in n]

    def run(ours: bool):
        trainer.model.zero_grad()
        trainer._metrics["train"].clear()
        if not ours:
            trainer._get_per_token_logps_and_entropies = trl_forward(trainer)
        try:
            loss = trainer.compute_loss(trainer.model, inputs)
        finally:
            trainer.__dict__.pop("_get_per_token_logps_and_entropies", None)
        loss.backward()
        return loss.detach(), trainer._metrics["train"]["entropy"][-1], [p.grad.clone() for p in lora]

    ours, reference = run(True), run(False)
    torch.testing.assert_close(ours[0], reference[0], rtol=1e-5, atol=1e-7)
    assert ours[1] == pytest.approx(reference[1], rel=1e-5)
    assert any(g.abs().sum() > 0 for g in reference[2])
    for a, b in zip(ours[2], reference[2]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)
    assert trainer._scored_positions is None  # the positions are known only for the duration of the call


def test_masked_gqa_attention_equals_transformers_sdpa_and_is_switched_on_for_the_block_only(tiny_model_dir):
    """The remainders' attention keeps grouped keys and values at their own heads; with a mask it computes
    transformers' SDPA attention (which repeats them to the query heads), gradients included, and the model
    is back on SDPA after the block."""
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from pipeline.models import load_model
    from pipeline.training.shared_prefix import GQA_ATTENTION, cpu_gqa_attention, masked_gqa_sdpa

    torch.manual_seed(0)
    module = SimpleNamespace(num_key_value_groups=3, is_causal=True)
    q = torch.randn(2, 6, 5, 8, requires_grad=True)
    k, v = (torch.randn(2, 2, 9, 8, requires_grad=True) for _ in range(2))
    mask = torch.ones(2, 1, 5, 9, dtype=torch.bool).tril(diagonal=4)
    mask[1, :, :, :3] = False  # a row that does not see the first keys
    outs = []
    for fn in (masked_gqa_sdpa, sdpa_attention_forward):
        out, _ = fn(module, q, k, v, mask, scaling=0.3)
        grads = torch.autograd.grad((out * torch.arange(out.numel()).view_as(out)).sum(), (q, k, v))
        outs.append((out, grads))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    for a, b in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(a, b)

    model, _ = load_model(str(tiny_model_dir))
    assert model.config._attn_implementation == "sdpa"
    with cpu_gqa_attention(model):
        assert model.config._attn_implementation == GQA_ATTENTION
    assert model.config._attn_implementation == "sdpa"
