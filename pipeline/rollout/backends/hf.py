"""The Hugging Face generation backend: batched sampling with per-episode KV caches, on CPU or GPU.

One :meth:`HFBackend.generate` call runs in four steps, each a method below:

1. :meth:`~HFBackend._share_prefix`: new episodes' common prompt prefix (the system prompt) is run once,
   and its keys and values are kept as one shared copy (:mod:`~pipeline.rollout.backends.episode_cache`);
2. :meth:`~HFBackend._layout`: each request reuses what is cached for its episode, and the rows are laid
   out as one batch (:class:`_Batch`) over a preallocated cache (:mod:`~pipeline.rollout.backends.kv_cache`);
3. :meth:`~HFBackend._prefill`: the rows' new tokens (the environment's reply, on later turns) run through
   the model in a few passes of similar lengths (:func:`prefill_chunks`);
4. :meth:`~HFBackend._decode`: one token per row per step (:func:`~pipeline.rollout.backends.sampling.sample`)
   until every row stops; each finished row's cache is kept for its episode's next turn.

Every forward attends to the shared prefix and to each row's own cache
(:mod:`~pipeline.rollout.backends.prefix_attention`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Hashable, Sequence

import torch

from pipeline.rollout.backends.base import Generation, GenerationRequest
from pipeline.rollout.backends.episode_cache import EpisodeCaches, Past, SharedPrefix
from pipeline.rollout.backends.kv_cache import (
    buffered_cache,
    cache_argument,
    chunk_cache,
    returned_cache,
    set_cache_length,
    shared_prefix_length,
    whole_past,
)
from pipeline.rollout.backends.prefix_attention import prefix_attention, visible_keys
from pipeline.rollout.backends.sampling import sample, stream_seed


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
class _Batch:
    """One ``generate`` call laid out for the model, its rows sorted by how many new tokens each prefills.

    The columns of each row's own cache are ``[past (left-padded to past_len)] [new tokens (left-padded to
    width)] [sampled tokens]``; ``valid`` marks the columns that hold real tokens.
    """

    requests: list[GenerationRequest]  # in row order
    order: list[int]  # order[row]: the index of the row's request in the call
    prefix: SharedPrefix | None  # the shared prefix every row attends to, or None
    new: list[list[int]]  # the prompt tokens each row prefills (ascending lengths)
    limits: list[int]  # each row's token budget (at least 1)
    input_ids: torch.Tensor  # (B, width): the new tokens, left-padded
    positions: torch.Tensor  # (B, width): their position ids, from each row's real length
    valid: torch.Tensor  # (B, past_len + width) bool, on the model's device
    cache: Any  # a DynamicCache of BufferedLayers holding each row's past, with room for the rest
    past_len: int

    @property
    def width(self) -> int:
        return self.input_ids.shape[1]

    def in_request_order(self, results: list[Generation]) -> list[Generation]:
        ordered: list[Generation] = [None] * len(results)  # type: ignore[list-item]
        for row, index in enumerate(self.order):
            ordered[index] = results[row]
        return ordered


class HFBackend:
    """Batched sampling with a Hugging Face causal LM and per-episode KV caches.

    New episodes share one cached copy of their common prompt prefix (the system prompt): its keys and
    values are stored once and attended to by every row, so neither memory nor a decode step's reads grow
    with the number of episodes times the prefix length. Each row's cache holds only what follows the
    prefix. A batched call left-pads every row's cache to a common length (masked out), prefills the
    episodes' new tokens together (logits only for the last one), then decodes one token per step for all
    rows until each row stops. Position ids follow each row's real length, so padding never shifts
    positions. When a row stops, its cache is compacted (padding removed) and kept under its episode key.

    ``temperature == 0`` decodes greedily. Otherwise each episode draws from its own random stream, seeded
    by ``seed`` and the request's ``seed`` (:func:`~pipeline.rollout.backends.sampling.stream_seed`), so
    its tokens do not depend on the other episodes in the batch, nor on how long finished rows ride
    along. ``stop_token_ids`` end a turn (default: the tokenizer's eos).
    ``reuse_cache=False`` keeps nothing between calls (every call prefills whole prompts).
    ``prefill_tokens`` counts the tokens run through prefill and ``timings`` accumulates seconds spent in
    prefill and decode, for benchmarks.
    """

    def __init__(self, model, tokenizer, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                 stop_token_ids: Sequence[int] | None = None, reuse_cache: bool = True) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.temperature, self.top_p = temperature, top_p
        eos = tokenizer.eos_token_id
        self.stop_token_ids = set(stop_token_ids or ([eos] if isinstance(eos, int) else eos))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.stop_token_ids))
        self.seed = seed
        self.streams: dict[Hashable, torch.Generator] = {}  # each live episode's random stream, by key
        self._unnamed_streams = 0  # streams handed to requests without a seed, in the order they came
        self.caches = EpisodeCaches(enabled=reuse_cache)
        self._cache_arg = cache_argument(model)
        self.min_shared_prefix = 32  # tokens; shorter shared prefixes are not worth a separate forward pass
        self.prefill_tokens = 0
        self.timings = {"prefill_s": 0.0, "decode_s": 0.0}

    def release(self, key: Hashable) -> None:
        self.caches.release(key)
        self.streams.pop(key, None)

    def _stream(self, request: GenerationRequest) -> torch.Generator:
        """The episode's random stream, created at its first request."""
        generator = self.streams.get(request.key)
        if generator is None:
            stream = request.seed
            if stream is None:
                stream, self._unnamed_streams = self._unnamed_streams, self._unnamed_streams + 1
            generator = torch.Generator(device="cpu").manual_seed(stream_seed(self.seed, stream))
            self.streams[request.key] = generator
        return generator

    @torch.no_grad()
    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        if not requests:
            return []
        start = time.perf_counter()
        self._share_prefix(requests)
        batch = self._layout(requests)
        logits = self._prefill(batch)
        decode_start = time.perf_counter()
        self.timings["prefill_s"] += decode_start - start
        results = self._decode(batch, logits)
        self.timings["decode_s"] += time.perf_counter() - decode_start
        return batch.in_request_order(results)

    def _forward(self, input_ids, mask, positions, cache, prefix: SharedPrefix | None) -> torch.Tensor:
        """Logits (B, V) of each row's last token: ``input_ids`` and ``positions`` (B, q) on top of ``cache``
        and ``prefix``, with ``mask`` (B, 1, q, S) from :func:`visible_keys`."""
        device = self.model.device
        with prefix_attention(self.model, prefix.layers if prefix is not None else None):
            out = self.model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                             position_ids=positions.to(device), use_cache=True, logits_to_keep=1,
                             **{self._cache_arg: cache})
        return out.logits[:, -1, :].float()

    def _share_prefix(self, requests: Sequence[GenerationRequest]) -> None:
        """Compute, once, the KV cache of the prompt prefix that new episodes share.

        Episodes of one domain start with the same system prompt (instructions, policy, tool schemas),
        most of the first turn's prompt. Its cache is computed for one sequence and reused by every new
        episode instead of being prefilled once per episode.
        """
        fresh = self.caches.prompts_needing_a_prefix(requests)
        if not fresh:
            return
        length = shared_prefix_length(fresh)
        if length < self.min_shared_prefix:
            return
        out = self.model(input_ids=torch.tensor([fresh[0][:length]], device=self.model.device), use_cache=True,
                         logits_to_keep=1)
        cache = returned_cache(out)
        self.caches.prefix = SharedPrefix(fresh[0][:length], [(layer.keys, layer.values) for layer in cache.layers])
        self.prefill_tokens += length

    def _layout(self, requests: Sequence[GenerationRequest]) -> _Batch:
        """The call as one batch: each row's reusable past written into a preallocated cache, and its new
        tokens and their positions as left-padded tensors."""
        pasts = [self.caches.lookup(r) for r in requests]
        prefix = pasts[0].prefix if len({id(p.prefix) for p in pasts}) == 1 else None
        if prefix is None:  # rows on different prefixes (or none): give each row its whole past
            pasts = [Past(None, whole_past(p.prefix.layers if p.prefix is not None else None, p.layers), p.covered)
                     for p in pasts]
        start_col = len(prefix.ids) if prefix is not None else 0
        new = [r.prompt_ids[p.covered :] for r, p in zip(requests, pasts)]
        # Rows go in order of how many new tokens they prefill, so that rows of similar length share a
        # prefill pass (see prefill_chunks); results are put back in request order at the end.
        order = sorted(range(len(requests)), key=lambda b: len(new[b]))
        requests, pasts, new = [requests[b] for b in order], [pasts[b] for b in order], [new[b] for b in order]
        own = [p.covered - start_col for p in pasts]  # tokens in each row's own cache
        past_len, width, rows = max(own), max(len(x) for x in new), len(requests)
        limits = [max(1, r.max_new_tokens) for r in requests]

        valid = torch.zeros(rows, past_len + width, dtype=torch.bool)
        input_ids = torch.full((rows, width), self.pad_id, dtype=torch.long)
        positions = torch.zeros(rows, width, dtype=torch.long)
        for b, (past, m, toks) in enumerate(zip(pasts, own, new)):
            valid[b, past_len - m : past_len] = True
            valid[b, past_len + width - len(toks) :] = True
            input_ids[b, width - len(toks) :] = torch.tensor(toks)
            positions[b, width - len(toks) :] = torch.arange(past.covered, past.covered + len(toks))
        cache = buffered_cache(self.model, [p.layers for p in pasts], past_len, capacity=past_len + width + max(limits))
        return _Batch(requests, order, prefix, new, limits, input_ids, positions, valid.to(self.model.device), cache,
                      past_len)

    def _prefill(self, batch: _Batch) -> torch.Tensor:
        """Run every row's new tokens into ``batch.cache``; returns the logits (B, V) of each row's last one."""
        self.prefill_tokens += sum(len(x) for x in batch.new)
        width, past_len = batch.width, batch.past_len
        logits = []
        for lo, hi in prefill_chunks([len(x) for x in batch.new]):
            # Rows lo:hi prefill their new tokens (at most ``w``) into their rows of the shared buffers.
            w = len(batch.new[hi - 1])
            part = chunk_cache(batch.cache, lo, hi, past_len + width - w)
            logits.append(self._forward(batch.input_ids[lo:hi, width - w :], visible_keys(batch.valid[lo:hi], w),
                                        batch.positions[lo:hi, width - w :], part, batch.prefix))
        set_cache_length(batch.cache, past_len + width)
        return torch.cat(logits)

    def _decode(self, batch: _Batch, logits: torch.Tensor) -> list[Generation]:
        """Sample one token per row per step, from the prefill's ``logits`` (B, V) on, until every row has
        sampled a stop token or reached its limit. Returns the generations in row order; each finished
        row's cache is kept for its episode."""
        cache, valid, prefix = batch.cache, batch.valid, batch.prefix
        next_pos = batch.positions[:, -1] + 1
        n = len(batch.requests)
        rows = list(range(n))  # the batch row held in each cache row
        done: set[int] = set()
        sampled: list[list[int]] = [[] for _ in range(n)]
        logps: list[list[float]] = [[] for _ in range(n)]
        results: list[Generation | None] = [None] * n
        streams = [self._stream(r) for r in batch.requests]
        while True:
            # only rows still decoding draw: a finished row riding along must not use up its episode's stream
            drawing = [j for j, b in enumerate(rows) if b not in done]
            picked, picked_logps = sample(logits if len(drawing) == len(rows) else logits[drawing], self.temperature,
                                          self.top_p, [streams[rows[j]] for j in drawing])
            tokens = torch.full((len(rows),), self.pad_id, dtype=torch.long)
            tokens[drawing] = picked
            for j, tok, logp in zip(drawing, picked.tolist(), picked_logps.tolist()):
                b = rows[j]
                sampled[b].append(tok)
                logps[b].append(logp)
                stopped = tok in self.stop_token_ids
                if stopped or len(sampled[b]) >= batch.limits[b]:
                    results[b] = Generation(sampled[b], logps[b], truncated=not stopped)
                    self.caches.keep(batch.requests[b], sampled[b], prefix, cache, j, valid[j])
                    done.add(b)
            if len(done) == n:
                return results  # type: ignore[return-value]
            # Finished rows ride along (their outputs are ignored) until a quarter of the batch has
            # finished: dropping a row copies every layer's cache, so it is done in bulk.
            if sum(b in done for b in rows) * 4 >= len(rows):
                keep = [j for j, b in enumerate(rows) if b not in done]
                cache.batch_select_indices(torch.tensor(keep, device=self.model.device))
                valid, next_pos, tokens = valid[keep], next_pos[keep], tokens[keep]
                rows = [rows[j] for j in keep]
            valid = torch.cat([valid, valid.new_ones(len(rows), 1)], dim=1)
            logits = self._forward(tokens.view(-1, 1), visible_keys(valid, 1), next_pos.view(-1, 1), cache, prefix)
            next_pos = next_pos + 1
