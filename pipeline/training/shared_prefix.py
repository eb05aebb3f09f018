"""The loss's forward pass with the batch's common prefix computed once.

Every episode of a customer-service batch opens with the same system prompt: about 1,700 of an
order-status episode's ~2,300 tokens. TRL's forward runs it once per row. :func:`shared_prefix_logps`
runs it once per chunk, repeats its KV cache over the rows, and runs each row's remainder on top; the
per-token log-probs and their gradients equal the full forward's, so the trainer can switch it on
without changing the loss (``RolloutConfig.share_prefix``).
"""

from __future__ import annotations

import torch

from pipeline.rollout.backends.kv_cache import cache_argument, returned_cache

MIN_SHARED_PREFIX = 16  # tokens; below this the loss runs TRL's plain forward


def shared_prefix_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int,
                        prefix: int, compute_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs (and entropies) of the last ``logits_to_keep`` positions, as TRL's fused LM head
    gives them, computing the first ``prefix`` tokens, which all rows' prompts share, once.

    ``input_ids`` and ``attention_mask`` are (B, P + C) in TRL's layout: left-padded prompts, then
    right-padded completions, with ``C = logits_to_keep``; ``prefix`` must be shorter than every prompt
    (`pipeline.rollout.backends.kv_cache.shared_prefix_length` of the prompts' real tokens). The prefix goes through the
    decoder once with a KV cache; the cache is repeated over the rows and every row's remainder is run on
    top of it. Gradients reach the LoRA weights through the cached keys and values, so the result and its
    gradient equal the full forward's (positions differ by each row's left padding, which rotary
    embeddings do not see). Returns (B, C) log-probs and, with ``compute_entropy``, (B, C) entropies;
    positions past a row's last token are 0.
    """
    rows = input_ids.size(0)
    width = input_ids.size(1)
    prompt_width = width - logits_to_keep
    real = attention_mask.bool()
    pads = (~real[:, :prompt_width]).sum(1)  # left padding of each prompt
    prompt_lens = prompt_width - pads
    ends = width - (~real).long().flip(1).cumprod(1).sum(1)  # one past each row's last real token
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = causal_lm.base_model  # the decoder without the LM head; PEFT's LoRA layers sit inside it
    cache = returned_cache(decoder(input_ids=input_ids[0, pads[0]: pads[0] + prefix].unsqueeze(0),
                                   attention_mask=attention_mask.new_ones(1, prefix), use_cache=True))
    cache.batch_repeat_interleave(rows)
    suffix_lens = ends - pads - prefix
    length = int(suffix_lens.max())
    suffix = input_ids.new_zeros(rows, length)
    shift_labels = torch.full_like(suffix, -100)
    mask = attention_mask.new_zeros(rows, prefix + length)
    mask[:, :prefix] = 1
    for i in range(rows):
        n = int(suffix_lens[i])
        suffix[i, :n] = input_ids[i, pads[i] + prefix: ends[i]]
        mask[i, prefix: prefix + n] = 1
        # label position t scores suffix token t + 1; only the completion's tokens are scored
        scored = int(prompt_lens[i]) - prefix - 1
        shift_labels[i, scored: n - 1] = suffix[i, scored + 1: n]
    out = model(input_ids=suffix, attention_mask=mask, shift_labels=shift_labels, fused_lm_head=True,
                **{cache_argument(model): cache})
    # completion token k of row i sits at suffix index prompt_len_i - prefix + k, scored at label index one less
    index = (prompt_lens - prefix - 1).unsqueeze(1) + torch.arange(logits_to_keep, device=input_ids.device)
    valid = index < (suffix_lens - 1).unsqueeze(1)
    index = index.clamp(max=length - 1)

    def gather(values: torch.Tensor) -> torch.Tensor:
        return values.gather(1, index).masked_fill(~valid, 0.0)

    return gather(out.log_probs), gather(out.entropy) if compute_entropy else None
