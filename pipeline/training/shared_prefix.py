"""The loss's forward pass: the batch's common prefix computed once, the LM head only where the loss looks.

Every episode of a customer-service batch opens with the same system prompt: about 1,700 of an
order-status episode's ~2,300 tokens. TRL's forward runs it once per row and projects every position
onto the vocabulary. `shared_prefix_logps` runs the shared prefix once per chunk of rows and each row's
remainder on its KV cache (:func:`remainders_on_prefix`); then it projects only the scored positions
(the assistant tokens) through the LM head, in chunks (:mod:`pipeline.training.lm_head`). The per-token
log-probs and their gradients equal the full forward's, so the trainer switches both on without changing
the loss (``RolloutConfig.share_prefix`` for the first; the second always, on one process).
"""

from __future__ import annotations

import contextlib

import torch

from pipeline.rollout.backends.kv_cache import cache_argument, returned_cache, shared_prefix_length
from pipeline.training.lm_head import IGNORE_INDEX, scored_log_probs

MIN_SHARED_PREFIX = 16  # tokens; below this the loss runs every row whole
GQA_ATTENTION = "turnwise_masked_gqa_sdpa"
PER_ROW_DEVICES = frozenset({"cpu"})  # where each row's remainder runs alone (:func:`remainders_on_prefix`)


def masked_gqa_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' SDPA attention, except that a masked call keeps the keys and values at their own heads
    (``enable_gqa``) instead of repeating them to the query heads: on a CPU, where transformers repeats
    them, the rows' remainders would otherwise save (rows, query heads, prefix + remainder, head dim) keys
    and values for backward, a gigabyte at four rows of the 135M model. Unmasked calls are transformers'."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is None or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask[:, :, :, : key.shape[-2]], dropout_p=dropout, scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def cpu_gqa_attention(model):
    """Run ``model``'s SDPA attention through :func:`masked_gqa_sdpa` for the duration, on a CPU (whose SDPA
    kernel takes grouped keys with a mask; CUDA's would fall back to its slow path). Elsewhere, and for
    other attention implementations, nothing changes. Registered with transformers on first use."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    config = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
    if config._attn_implementation != "sdpa" or next(model.parameters()).device.type != "cpu":
        yield
        return
    if AttentionInterface().get(GQA_ATTENTION) is not masked_gqa_sdpa:
        AttentionInterface.register(GQA_ATTENTION, masked_gqa_sdpa)
        AttentionMaskInterface.register(GQA_ATTENTION, sdpa_mask)  # the masks SDPA takes
    config._attn_implementation = GQA_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"


def decoder_of(model):
    """The decoder without the LM head (PEFT's LoRA layers sit inside it) of a causal LM, PEFT-wrapped or not."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return causal_lm.base_model


def shared_prefix_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int,
                        prefix: int = 0, compute_entropy: bool = False, *, scored: torch.Tensor | None = None,
                        temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs (and entropies) of the last ``logits_to_keep`` positions, as TRL's fused LM head gives
    them, computing the first ``prefix`` tokens, which all rows' prompts share, once, and the LM head only at
    ``scored`` positions.

    ``input_ids`` and ``attention_mask`` are (B, P + C) in TRL's layout: left-padded prompts, then
    right-padded completions, with ``C = logits_to_keep``. ``scored`` (B, C) marks the completion positions
    whose log-probs are wanted (default: every real completion token); the others are 0, as are positions
    past a row's last token. With ``prefix`` > 0 (0: every row runs whole), which must be shorter than every prompt
    (:func:`pipeline.rollout.backends.kv_cache.shared_prefix_length` of the prompts' real tokens), the prefix
    goes through the decoder once with a KV cache and every row's remainder runs on top of it
    (:func:`remainders_on_prefix`). Gradients reach the LoRA weights through the cached keys and values, so the
    result and its gradient equal the full forward's (positions differ by each row's left padding, which
    rotary embeddings do not see). Returns (B, C) log-probs and, with ``compute_entropy``, (B, C) entropies.
    """
    rows, width = input_ids.shape
    prompt_width = width - logits_to_keep
    scored = attention_mask[:, prompt_width:].bool() if scored is None else scored.bool() & attention_mask[
        :, prompt_width:].bool()
    decoder = decoder_of(model)
    if prefix <= 0:
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        # hidden position p predicts token p + 1: completion token k sits at prompt_width + k
        labels = input_ids[:, prompt_width:].masked_fill(~scored, IGNORE_INDEX)
        logps, entropies, _ = scored_log_probs(model, hidden[:, prompt_width - 1: width - 1], labels,
                                               temperature=temperature, with_entropy=compute_entropy)
        return logps, entropies
    real = attention_mask.bool()
    pads = (~real[:, :prompt_width]).sum(1)  # left padding of each prompt
    prompt_lens = prompt_width - pads
    ends = width - (~real).long().flip(1).cumprod(1).sum(1)  # one past each row's last real token
    cache = returned_cache(decoder(input_ids=input_ids[0, pads[0]: pads[0] + prefix].unsqueeze(0),
                                   attention_mask=attention_mask.new_ones(1, prefix), use_cache=True))
    suffix_lens = ends - pads - prefix
    length = int(suffix_lens.max())
    suffix = input_ids.new_zeros(rows, length)
    labels = torch.full_like(suffix, IGNORE_INDEX)
    # completion token k of row i sits at suffix index prompt_len_i - prefix + k, scored at one less
    index = (prompt_lens - prefix - 1).unsqueeze(1) + torch.arange(logits_to_keep, device=input_ids.device)
    valid = (index < (suffix_lens - 1).unsqueeze(1)) & scored
    for i in range(rows):
        n = int(suffix_lens[i])
        suffix[i, :n] = input_ids[i, pads[i] + prefix: ends[i]]
        at = index[i][valid[i]]
        labels[i, at] = suffix[i, at + 1]
    hidden = remainders_on_prefix(model, cache, prefix, suffix, suffix_lens.tolist())
    logps, entropies, _ = scored_log_probs(model, hidden, labels, temperature=temperature,
                                           with_entropy=compute_entropy)
    index = index.clamp(max=length - 1)

    def gather(values: torch.Tensor) -> torch.Tensor:
        return values.gather(1, index).masked_fill(~valid, 0.0)

    return gather(logps), gather(entropies) if compute_entropy else None


def shared_prefix_lm_output(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                            share: bool = True, temperature: float = 1.0):
    """What TRL's fused LM head returns for ``model(input_ids, attention_mask, labels, fused_lm_head=True)`` (a
    ``FusedCausalLMOutput`` with ``loss``, ``log_probs``, ``entropy``, ``is_top1`` and ``label_mask``, each
    (B, L - 1)), computing the prefix the rows share once and the LM head only at labelled positions.

    ``input_ids``, ``attention_mask`` and ``labels`` are (B, L) in SFT's layout: right-padded rows, labels
    ``-100`` where nothing is learnt (position ``t`` of the outputs scores ``labels[:, t + 1]``). With
    ``share``, the longest prefix all rows' real tokens share, cut so that it ends before the first
    labelled token's context is needed, runs once (when it is at least :data:`MIN_SHARED_PREFIX` tokens)
    and each row's remainder runs on its KV cache without its padding (:func:`remainders_on_prefix`);
    values and gradients equal the full forward's.
    """
    from trl.trainer.utils import FusedCausalLMOutput

    rows, width = input_ids.shape
    shifted = labels[:, 1:].masked_fill(attention_mask[:, 1:] == 0, IGNORE_INDEX)
    scored = shifted != IGNORE_INDEX
    prefix = 0
    lengths = attention_mask.sum(1)
    if share and rows > 1 and scored.any() and _right_padded(attention_mask, lengths):
        first = int(scored.any(0).nonzero()[0])  # output position t needs the hidden state of token t
        prefix = min(shared_prefix_length([row[:n].tolist() for row, n in zip(input_ids, lengths.tolist())]), first)
        prefix = prefix if prefix >= MIN_SHARED_PREFIX else 0
    decoder = decoder_of(model)
    if prefix:
        cache = returned_cache(decoder(input_ids=input_ids[:1, :prefix], attention_mask=attention_mask[:1, :prefix],
                                       use_cache=True))
        hidden = remainders_on_prefix(model, cache, prefix, input_ids[:, prefix:], (lengths - prefix).tolist())
    else:
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    logps, entropy, top1 = scored_log_probs(model, hidden[:, :-1], shifted[:, prefix:], temperature=temperature,
                                            with_entropy=True, with_top1=True)
    if prefix:  # the prefix's positions score nothing: zeros, as the fused head gives them
        logps, entropy = (torch.nn.functional.pad(x, (prefix, 0)) for x in (logps, entropy))
        top1 = torch.nn.functional.pad(top1, (prefix, 0), value=False)
    loss = -logps.sum() / scored.sum().clamp(min=1)
    return FusedCausalLMOutput(loss=loss, log_probs=logps, entropy=entropy, is_top1=top1, label_mask=scored)


def _right_padded(attention_mask: torch.Tensor, lengths: torch.Tensor) -> bool:
    """Whether every row's real tokens (``lengths`` of them) come first, as SFT's collator lays them out."""
    columns = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return bool((attention_mask.bool() == (columns < lengths[:, None])).all())


def remainders_on_prefix(model, cache, prefix: int, remainders: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """The decoder's hidden states of each row's remainder run on top of the prefix's KV ``cache`` (batch 1,
    ``prefix`` tokens): row ``i``'s first ``lengths[i]`` tokens of ``remainders`` (B, R). Returns (B, R, hidden);
    what it holds at a row's padding is undefined.

    On the devices in :data:`PER_ROW_DEVICES` (the CPU) the rows run one at a time, their padding never
    computed: a batched call runs every row to the longest one's length, and the rows of a batch differ by
    hundreds of tokens (at four oracle demonstrations, 40% more positions than the real ones), and a CPU
    gains little from the wider call (``benchmarks/sft_step.py``: 1.31x stock SFT batched, 2.24x per row).
    Elsewhere the cache is repeated over the rows and they run as one batch. Every row reads the same prefix
    keys and values, so their gradients gather there, as in the full forward. ``cache`` is consumed."""
    from transformers import DynamicCache

    decoder, argument = decoder_of(model), cache_argument(model)
    rows, width = remainders.shape
    with cpu_gqa_attention(model):
        if remainders.device.type not in PER_ROW_DEVICES:
            cache.batch_repeat_interleave(rows)
            mask = remainders.new_zeros(rows, prefix + width)
            mask[:, :prefix] = 1
            for i, n in enumerate(lengths):
                mask[i, prefix: prefix + n] = 1
            return decoder(input_ids=remainders, attention_mask=mask, use_cache=False,
                           **{argument: cache}).last_hidden_state
        past = [(layer.keys, layer.values) for layer in cache.layers]
        hidden = []
        for row, n in zip(remainders, lengths):
            own = DynamicCache(ddp_cache_data=past)  # its own layers over the shared tensors: the row's keys go there
            out = decoder(input_ids=row[None, :n], attention_mask=row.new_ones(1, prefix + n), use_cache=False,
                          **{argument: own}).last_hidden_state
            hidden.append(torch.nn.functional.pad(out, (0, 0, 0, width - n)))
    return torch.cat(hidden)
