"""The Hugging Face generation backend: batched sampling with per-episode KV caches, on CPU or GPU.

:class:`HFBackend` keeps each episode's key/value cache between turns, so a later turn prefills only the
tokens added since the last one (the environment's reply), not the whole conversation. New episodes
share one cached copy of their common prompt prefix (the system prompt), attended to by every row
(:mod:`~pipeline.rollout.backends.prefix_attention`); caches live in preallocated buffers
(:mod:`~pipeline.rollout.backends.kv_cache`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Hashable, Sequence

import torch

from pipeline.rollout.backends.base import Generation, GenerationRequest
from pipeline.rollout.backends.kv_cache import (
    buffered_cache,
    cache_argument,
    chunk_cache,
    returned_cache,
    shared_prefix_length,
)
from pipeline.rollout.backends.prefix_attention import prefix_attention, visible_keys


def prefill_chunks(lengths: Sequence[int], overhead: int = 64) -> list[tuple[int, int]]:
    """Split rows (sorted by ``lengths``, ascending) into contiguous ranges, one prefill pass each.

    A pass over rows ``i:j`` computes ``(j - i) * lengths[j - 1]`` token positions (shorter rows are padded)
    plus a fixed cost of about ``overhead`` positions (reading the weights once). The split minimises the
    total, so an environment reply of 400 tokens does not make 31 replies of 20 tokens pay for 400 each.

    >>> prefill_chunks([10, 10, 12, 300, 310])
    [(0, 3), (3, 5)]
    """
    n = len(lengths)
    best = [0.0] + [float("inf")] * n  # best[j]: cost of rows 0:j
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):
            cost = best[i] + (j - i) * lengths[j - 1] + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    chunks, j = [], n
    while j:
        chunks.append((cut[j], j))
        j = cut[j]
    return chunks[::-1]


@dataclass
class _Prefix:
    """A prompt prefix shared by new episodes: its ids and per-layer ``(k, v)`` of shape (1, H, P, D)."""

    ids: list[int]
    layers: list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class _Entry:
    """An episode's cache: ``ids`` it covers; ``layers`` hold the keys/values of ``ids`` after ``prefix``."""

    ids: list[int]
    prefix: _Prefix | None
    layers: list[tuple[torch.Tensor, torch.Tensor]] | None


class HFBackend:
    """Batched sampling with a Hugging Face causal LM and per-episode KV caches.

    New episodes share one cached copy of their common prompt prefix (the system prompt): its keys and
    values are stored once and attended to by every row (:func:`shared_prefix_attention`), so neither
    memory nor a decode step's reads grow with the number of episodes times the prefix length. Each row's
    cache holds only what follows the prefix. A batched call left-pads every row's cache to a common
    length (masked out), prefills the episodes' new tokens together (logits only for the last one), then
    decodes one token per step for all rows until each row stops. Position ids follow each row's real
    length, so padding never shifts positions. When a row stops, its cache is compacted (padding removed)
    and kept under its episode key.

    ``temperature == 0`` decodes greedily. ``stop_token_ids`` end a turn (default: the tokenizer's eos).
    ``timings`` accumulates seconds spent in prefill and decode, for benchmarks.
    """

    def __init__(self, model, tokenizer, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                 stop_token_ids: Sequence[int] | None = None, reuse_cache: bool = True) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.temperature, self.top_p = temperature, top_p
        self.reuse_cache = reuse_cache
        eos = tokenizer.eos_token_id
        self.stop_token_ids = set(stop_token_ids or ([eos] if isinstance(eos, int) else eos))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.stop_token_ids))
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self._cache_arg = cache_argument(model)
        self._caches: dict[Hashable, _Entry] = {}
        self._prefix: _Prefix | None = None
        self.min_shared_prefix = 32  # tokens; shorter shared prefixes are not worth a separate forward pass
        self.prefill_tokens = 0  # tokens run through prefill, for benchmarks
        self.timings = {"prefill_s": 0.0, "decode_s": 0.0}

    def release(self, key: Hashable) -> None:
        self._caches.pop(key, None)

    def _forward(self, input_ids, mask, positions, cache, prefix: _Prefix | None):
        device = self.model.device
        with prefix_attention(self.model, prefix.layers if prefix is not None else None):
            out = self.model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                             position_ids=positions.to(device), use_cache=True, logits_to_keep=1,
                             **{self._cache_arg: cache})
        return out.logits[:, -1, :].float()

    def _shared_prefix(self, requests: Sequence[GenerationRequest]) -> None:
        """Compute, once, the KV cache of the prompt prefix that new episodes share.

        Episodes of one domain start with the same system prompt (instructions, policy, tool schemas),
        most of the first turn's prompt. Its cache is computed for one sequence and reused by every new
        episode instead of being prefilled once per episode.
        """
        fresh = [r.prompt_ids for r in requests if r.key not in self._caches]
        if not self.reuse_cache or not fresh:
            return
        if self._prefix is not None and all(p[: len(self._prefix.ids)] == self._prefix.ids for p in fresh):
            return
        length = shared_prefix_length(fresh)
        if length < self.min_shared_prefix:
            return
        with torch.no_grad():
            out = self.model(input_ids=torch.tensor([fresh[0][:length]], device=self.model.device), use_cache=True,
                             logits_to_keep=1)
        cache = returned_cache(out)
        self._prefix = _Prefix(fresh[0][:length], [(layer.keys, layer.values) for layer in cache.layers])
        self.prefill_tokens += length

    def _cached(self, request: GenerationRequest) -> tuple[_Prefix | None, list | None, int]:
        """The reusable cache for a request: its shared prefix, the row's own layers after the prefix, and
        how many prompt tokens both cover together (at least one prompt token is left to feed)."""
        prompt = request.prompt_ids
        entry = self._caches.get(request.key) if self.reuse_cache else None
        if entry is not None:
            n = min(len(entry.ids), len(prompt) - 1)
            start = len(entry.prefix.ids) if entry.prefix is not None else 0
            if n >= start and prompt[:n] == entry.ids[:n]:
                layers = entry.layers
                if layers is not None and n < len(entry.ids):
                    layers = [(k[:, :, : n - start], v[:, :, : n - start]) for k, v in layers]
                return entry.prefix, layers, n
        prefix = self._prefix if self.reuse_cache else None
        if prefix is not None and len(prefix.ids) < len(prompt) and prompt[: len(prefix.ids)] == prefix.ids:
            return prefix, None, len(prefix.ids)
        return None, None, 0

    @torch.no_grad()
    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        if not requests:
            return []
        device = self.model.device
        start = time.perf_counter()
        self._shared_prefix(requests)
        resolved = [self._cached(r) for r in requests]
        prefixes = {id(p) for p, _, _ in resolved}
        prefix = resolved[0][0] if len(prefixes) == 1 else None
        if prefix is None:  # rows on different prefixes (or none): give each row its whole past
            resolved = [(None, _with_prefix(p, layers), n) for p, layers, n in resolved]
        start_col = len(prefix.ids) if prefix is not None else 0
        pasts = [layers for _, layers, _ in resolved]
        own = [n - start_col for _, _, n in resolved]  # tokens in each row's own cache
        past_len = max(own)
        new = [r.prompt_ids[n:] for r, (_, _, n) in zip(requests, resolved)]
        # Rows go in order of how many new tokens they prefill, so that rows of similar length share a
        # prefill pass (see prefill_chunks); results are put back in request order at the end.
        order = sorted(range(len(requests)), key=lambda b: len(new[b]))
        requests, resolved, new = [requests[b] for b in order], [resolved[b] for b in order], [new[b] for b in order]
        pasts, own = [pasts[b] for b in order], [own[b] for b in order]
        width = max(len(x) for x in new)
        batch = len(requests)
        limits = [max(1, r.max_new_tokens) for r in requests]
        self.prefill_tokens += sum(len(x) for x in new)

        # Columns of the rows' own caches: [past (left-padded)] [new tokens (left-padded)] [sampled tokens]
        valid = torch.zeros(batch, past_len + width, dtype=torch.bool)
        input_ids = torch.full((batch, width), self.pad_id, dtype=torch.long)
        positions = torch.zeros(batch, width, dtype=torch.long)
        for b, ((_, _, n), m, toks) in enumerate(zip(resolved, own, new)):
            valid[b, past_len - m : past_len] = True
            valid[b, past_len + width - len(toks) :] = True
            input_ids[b, width - len(toks) :] = torch.tensor(toks)
            positions[b, width - len(toks) :] = torch.arange(n, n + len(toks))
        cache = buffered_cache(self.model, pasts, past_len, capacity=past_len + width + max(limits))
        valid = valid.to(device)
        logits = []
        for lo, hi in prefill_chunks([len(x) for x in new]):
            # Rows lo:hi prefill their new tokens (at most ``w``) into their rows of the shared buffers.
            w = len(new[hi - 1])
            part = chunk_cache(cache, lo, hi, past_len + width - w)
            logits.append(self._forward(input_ids[lo:hi, width - w :], visible_keys(valid[lo:hi], w),
                                        positions[lo:hi, width - w :], part, prefix))
        for layer in cache.layers:
            layer.length = past_len + width
            layer.keys, layer.values = layer._k[:, :, : layer.length], layer._v[:, :, : layer.length]
        logits = torch.cat(logits)
        next_pos = positions[:, -1] + 1
        decode_start = time.perf_counter()
        self.timings["prefill_s"] += decode_start - start

        rows = list(range(batch))  # original request index of each batch row
        done: set[int] = set()
        sampled: list[list[int]] = [[] for _ in requests]
        logps: list[list[float]] = [[] for _ in requests]
        results: list[Generation | None] = [None] * batch
        while True:
            tokens, token_logps = self._sample(logits)
            token_list, logp_list = tokens.tolist(), token_logps.tolist()
            for j, b in enumerate(rows):
                if b in done:
                    continue
                tok = token_list[j]
                sampled[b].append(tok)
                logps[b].append(logp_list[j])
                stopped = tok in self.stop_token_ids
                if stopped or len(sampled[b]) >= limits[b]:
                    results[b] = Generation(sampled[b], logps[b], truncated=not stopped)
                    self._store(requests[b], prefix, cache, valid, j, sampled[b])
                    done.add(b)
            if len(done) == batch:
                break
            # Finished rows ride along (their outputs are ignored) until a quarter of the batch has
            # finished: dropping a row copies every layer's cache, so it is done in bulk.
            finished_here = [j for j, b in enumerate(rows) if b in done]
            if len(finished_here) * 4 >= len(rows):
                keep = [j for j, b in enumerate(rows) if b not in done]
                cache.batch_select_indices(torch.tensor(keep, device=device))
                valid, next_pos, tokens = valid[keep], next_pos[keep], tokens[keep]
                rows = [rows[j] for j in keep]
            valid = torch.cat([valid, valid.new_ones(len(rows), 1)], dim=1)
            logits = self._forward(tokens.view(-1, 1), visible_keys(valid, 1), next_pos.view(-1, 1), cache, prefix)
            next_pos = next_pos + 1
        self.timings["decode_s"] += time.perf_counter() - decode_start
        ordered: list[Generation] = [None] * batch  # type: ignore[list-item]
        for k, b in enumerate(order):
            ordered[b] = results[k]
        return ordered

    def _sample(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens (B,) and their log-probabilities (B,) under the (temperature, top-p) distribution."""
        if self.temperature <= 0:
            logprobs = torch.log_softmax(logits, dim=-1)
            tokens = logits.argmax(dim=-1)
            return tokens.cpu(), logprobs.gather(-1, tokens.view(-1, 1)).view(-1).cpu()
        logprobs = torch.log_softmax(logits / self.temperature, dim=-1)
        probs = logprobs.exp()
        if self.top_p < 1.0:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            drop = sorted_probs.cumsum(-1) - sorted_probs > self.top_p
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        tokens = torch.multinomial(probs.cpu(), 1, generator=self.generator).view(-1)
        return tokens, logprobs.cpu().gather(-1, tokens.view(-1, 1)).view(-1)

    def _store(self, request: GenerationRequest, prefix: _Prefix | None, cache, valid: torch.Tensor, row: int,
               sampled: list[int]) -> None:
        """Keep the row's own cache, padding removed. With the prefix it covers the prompt and all sampled
        tokens but the last (whose key/value is computed when it is fed next turn)."""
        if not self.reuse_cache:
            return
        keep = valid[row].nonzero().view(-1)
        layers = [(layer.keys[row : row + 1].index_select(2, keep), layer.values[row : row + 1].index_select(2, keep))
                  for layer in cache.layers]
        self._caches[request.key] = _Entry(list(request.prompt_ids) + sampled[:-1], prefix, layers)


def _with_prefix(prefix: _Prefix | None, layers: list | None) -> list | None:
    """A row's whole past: the shared prefix's keys/values followed by the row's own."""
    if prefix is None:
        return layers
    if layers is None:
        return prefix.layers
    return [(torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)) for (pk, pv), (k, v) in zip(prefix.layers, layers)]
