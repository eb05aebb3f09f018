"""Tests for pipeline/training/shared_prefix.py: the loss's forward with the batch's common prefix run once."""

from __future__ import annotations

import torch


def test_shared_prefix_forward_gives_the_full_forwards_logps_and_gradients(make_trainer, rows):
    """Running the episodes' common prefix (the system prompt) once and the rest on its repeated KV cache
    gives the plain forward's per-token log-probs, entropies and LoRA gradients, on TRL's layout (left-padded
    prompts of different lengths, right-padded completions of different lengths)."""
    trainer = make_trainer(advantage="group_based", gradient_checkpointing=False)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    inputs = trainer._generate_and_score_completions(rows(trainer, [0, 0, 2, 3]))
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
