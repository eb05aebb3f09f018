"""Tests for pipeline/training/lm_head.py: chunked log-probs at the scored positions, and their gradients."""

from __future__ import annotations

import pytest
import torch

from pipeline.training.lm_head import HeadTransform, chunk_tokens, head_transform, scored_log_probs, selective_log_probs


def reference(hidden, weight, bias, targets, temperature=1.0, transform=HeadTransform()):
    """The materialised computation: full logits, log-softmax, gather."""
    z = hidden @ weight.t()
    if bias is not None:
        z = z + bias
    z = z * transform.logit_scale
    if transform.softcap is not None:
        z = transform.softcap * torch.tanh(z / transform.softcap)
    logp = torch.log_softmax(z / temperature, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return logp.gather(1, targets[:, None]).squeeze(1), entropy, (z / temperature).argmax(-1) == targets


@pytest.mark.parametrize("chunk", [1, 7, 64])
@pytest.mark.parametrize("case", ["plain", "bias_temperature", "scale_softcap"])
def test_log_probs_entropies_and_gradients_equal_the_materialised_logits(chunk, case):
    """Every chunk size (one token, uneven chunks, one chunk) gives the full log-softmax's log-probs, entropies
    and top-1 flags, and the gradients of a loss that weights both outputs reach hidden, weight and bias as
    through the full logits."""
    torch.manual_seed(0)
    n, h, v = 23, 12, 50
    hidden = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(v, dtype=torch.float64, requires_grad=True) if case == "bias_temperature" else None
    targets = torch.randint(0, v, (n,))
    temperature = 0.7 if case == "bias_temperature" else 1.0
    transform = HeadTransform(0.5, 3.0) if case == "scale_softcap" else HeadTransform()
    g_logp, g_ent = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    params = [p for p in (hidden, weight, bias) if p is not None]

    def run(fn):
        for p in params:
            p.grad = None
        logp, ent, top1 = fn()
        ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()
        return logp.detach(), ent.detach(), top1, [p.grad.clone() for p in params]

    ours = run(lambda: selective_log_probs(hidden, weight, targets, bias=bias, temperature=temperature,
                                           transform=transform, with_entropy=True, with_top1=True, chunk=chunk))
    ref = run(lambda: reference(hidden, weight, bias, targets, temperature, transform))
    # float32 softmax statistics inside the kernel: tolerances of float32, not float64
    torch.testing.assert_close(ours[0], ref[0].float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[1], ref[1].float(), rtol=1e-5, atol=1e-5)
    assert torch.equal(ours[2], ref[2])
    for a, b in zip(ours[3], ref[3]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_without_entropy_the_entropy_is_none_and_only_the_log_probs_carry_gradient():
    torch.manual_seed(1)
    hidden = torch.randn(5, 4, requires_grad=True)
    weight = torch.randn(9, 4)
    targets = torch.tensor([0, 3, 8, 1, 1])
    logp, ent, top1 = selective_log_probs(hidden, weight, targets, chunk=2)
    assert ent is None and top1 is None
    logp.sum().backward()
    expected = torch.autograd.grad(reference(hidden, weight, None, targets)[0].sum(), hidden)[0]
    torch.testing.assert_close(hidden.grad, expected, rtol=1e-5, atol=1e-6)


def test_bad_shapes_and_temperature_are_rejected_with_the_values():
    with pytest.raises(ValueError, match=r"hidden \(N, H\) and weight \(V, H\); got \(3, 4\) and \(9, 5\)"):
        selective_log_probs(torch.zeros(3, 4), torch.zeros(9, 5), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"targets must be \(N,\) = \(3,\), got \(2,\)"):
        selective_log_probs(torch.zeros(3, 4), torch.zeros(9, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        selective_log_probs(torch.zeros(3, 4), torch.zeros(9, 4), torch.zeros(3, dtype=torch.long), temperature=0)


def test_chunk_tokens_bounds_one_chunks_logits():
    assert chunk_tokens(49152) * 49152 * 4 <= 32 * 2**20 < (chunk_tokens(49152) + 1) * 49152 * 4
    assert chunk_tokens(10**9) == 1


def test_head_transform_reads_the_configs_scaling_like_trl():
    from types import SimpleNamespace

    assert head_transform(SimpleNamespace()) == HeadTransform(1.0, None)
    assert head_transform(SimpleNamespace(logit_scale=0.25, final_logit_softcapping=30.0)) == HeadTransform(0.25, 30.0)
    assert head_transform(SimpleNamespace(logits_scaling=4.0, model_type="granite")) == HeadTransform(0.25, None)
    assert head_transform(SimpleNamespace(logits_scaling=4.0, model_type="hyperclovax")) == HeadTransform(4.0, None)


def test_scored_log_probs_on_a_model_equal_trls_fused_head_with_their_gradients(tiny_model_dir):
    """On a PEFT model, the decoder's hidden states through :func:`scored_log_probs` give TRL's fused LM head's
    log-probs and entropies (what the GRPO and SFT losses used before) at the scored positions, 0 elsewhere,
    and the same LoRA gradients; the unscored positions carry no gradient."""
    from peft import LoraConfig, get_peft_model
    from trl.trainer.utils import add_fused_lm_head

    from pipeline.models import load_model

    model, _ = load_model(str(tiny_model_dir))
    add_fused_lm_head(model, temperature=0.9, outputs=("log_probs", "entropy"))
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                             init_lora_weights=False))
    torch.manual_seed(0)
    ids = torch.randint(0, 200, (3, 40))
    mask = torch.ones_like(ids)
    mask[2, 30:] = 0  # a right-padded row
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :25] = -100  # only the tail is scored
    labels[1, 33] = -100  # and a hole in it
    weights = torch.randn(3, 39)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]

    def run(ours: bool):
        model.zero_grad()
        if ours:
            hidden = model.get_base_model().model(input_ids=ids, attention_mask=mask).last_hidden_state
            logp, ent, _ = scored_log_probs(model, hidden[:, :-1], labels[:, 1:], temperature=0.9, with_entropy=True)
        else:
            out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
            logp, ent = out.log_probs, out.entropy
        (logp * weights).sum().backward()
        return logp.detach(), ent.detach(), [p.grad.clone() for p in lora]

    ours, trl = run(True), run(False)
    scored = labels[:, 1:] != -100
    torch.testing.assert_close(ours[0], trl[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[1], trl[1], rtol=1e-5, atol=1e-5)
    assert (ours[0][~scored] == 0).all() and (ours[0][scored] < 0).all()
    assert any(g.abs().sum() > 0 for g in ours[2])
    for a, b in zip(ours[2], trl[2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_unscored_positions_get_no_gradient_and_an_empty_selection_still_backpropagates(tiny_model_dir):
    from pipeline.models import load_model

    model, _ = load_model(str(tiny_model_dir))
    hidden = torch.randn(2, 6, model.config.hidden_size, requires_grad=True)
    labels = torch.full((2, 6), -100)
    labels[0, 2] = 5
    logp, _, _ = scored_log_probs(model, hidden, labels)
    logp.sum().backward()
    touched = hidden.grad.abs().sum(-1) > 0
    assert touched[0, 2] and touched.sum() == 1
    empty, _, _ = scored_log_probs(model, hidden, torch.full((2, 6), -100))
    assert empty.shape == (2, 6) and not empty.any()
    empty.sum().backward()  # no error: still connected to the graph


def test_doctests():
    import doctest

    import pipeline.training.lm_head as module

    assert doctest.testmod(module).failed == 0
