"""Generation backends for the rollout engine.

A backend turns token prompts into sampled continuations: ``generate(requests) -> generations``. It
works on token ids, never on text, so what the trainer later scores are exactly the ids that were
sampled. :class:`HFBackend` runs a Hugging Face causal LM on CPU or GPU and keeps each episode's
key/value cache between turns, so a later turn prefills only the tokens added since the last one
(the environment's reply), not the whole conversation. A vLLM backend implements the same protocol on
GPU.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Hashable, Protocol, Sequence, runtime_checkable

import torch
from transformers.cache_utils import DynamicLayer


@dataclass
class GenerationRequest:
    """Continue ``prompt_ids`` for at most ``max_new_tokens``; ``key`` names the episode for cache reuse."""

    key: Hashable
    prompt_ids: list[int]
    max_new_tokens: int


@dataclass
class Generation:
    """``token_ids`` are the sampled ids (ending with the stop token when one was sampled);
    ``logprobs[i]`` is the log-probability of ``token_ids[i]`` under the sampling distribution."""

    token_ids: list[int]
    logprobs: list[float]
    truncated: bool
    stats: dict = field(default_factory=dict)


@runtime_checkable
class GenerationBackend(Protocol):
    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]: ...

    def release(self, key: Hashable) -> None:
        """Forget an episode's cached state."""
        ...


class _BufferedLayer(DynamicLayer):
    """A KV-cache layer over a preallocated buffer: appending a token writes in place.

    transformers' dynamic layer concatenates on every decode step, copying the whole cache each time;
    with dozens of episodes of a few thousand tokens that copying, not the model, dominates CPU decoding.
    """

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.length = 0
        self.keys = self.values = None
        self.is_initialized = False
        self._k = self._v = None

    def _allocate(self, batch: int, heads: int, dim_k: int, dim_v: int, like: torch.Tensor) -> None:
        self._k = like.new_zeros(batch, heads, self.capacity, dim_k)
        self._v = like.new_zeros(batch, heads, self.capacity, dim_v)
        self.dtype, self.device = like.dtype, like.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            b, h, _, d = key_states.shape
            self._allocate(b, h, d, value_states.shape[-1], key_states)
        end = self.length + key_states.shape[-2]
        if end > self._k.shape[2]:  # grow (rare: capacity covers the whole call)
            grow = max(end, 2 * self._k.shape[2]) - self._k.shape[2]
            pad = lambda t: torch.cat([t, t.new_zeros(*t.shape[:2], grow, t.shape[3])], dim=2)  # noqa: E731
            self._k, self._v = pad(self._k), pad(self._v)
        self._k[:, :, self.length : end] = key_states
        self._v[:, :, self.length : end] = value_states
        self.length = end
        self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._k, self._v = self._k[indices], self._v[indices]
        self.keys, self.values = self._k[:, :, : self.length], self._v[:, :, : self.length]


def _buffered_cache(model, caches, past_len: int, capacity: int, device):
    """A cache whose layers hold every row's past, left-padded to ``past_len``, with room to grow."""
    from transformers import DynamicCache

    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    cache = DynamicCache()
    cache.layers = [_BufferedLayer(capacity) for _ in range(config.num_hidden_layers)]
    if past_len:
        ref = next(layer for layer, n in caches if layer is not None)
        for i, layer in enumerate(cache.layers):
            k0, v0 = ref[i]
            layer._allocate(len(caches), k0.shape[1], k0.shape[3], v0.shape[3], k0.to(device))
            for b, (rows, n) in enumerate(caches):
                if rows is not None and n:
                    layer._k[b, :, past_len - n : past_len] = rows[i][0][0, :, :n]
                    layer._v[b, :, past_len - n : past_len] = rows[i][1][0, :, :n]
            layer.length = past_len
            layer.keys, layer.values = layer._k[:, :, :past_len], layer._v[:, :, :past_len]
    return cache


def _returned_cache(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


class HFBackend:
    """Batched sampling with a Hugging Face causal LM and per-episode KV caches.

    New episodes share one cached copy of their common prompt prefix (the system prompt). Each batched
    call left-pads every episode's cache to a common length (masked out), prefills the episodes' new
    tokens together, then decodes one token per step for all rows until each row stops.
    Position ids follow each row's real length, so padding never shifts positions. When a row stops,
    its cache is compacted (padding removed) and kept under its episode key.

    ``temperature == 0`` decodes greedily. ``stop_token_ids`` end a turn (default: the tokenizer's eos).
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
        # transformers 5.24 renamed the forward argument ``past_key_values`` to ``cache``; accept both.
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self._cache_arg = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
        self._caches: dict[Hashable, tuple[list[int], list[tuple[torch.Tensor, torch.Tensor]]]] = {}
        self._prefix: tuple[list[int], list[tuple[torch.Tensor, torch.Tensor]]] | None = None
        self.min_shared_prefix = 32  # tokens; shorter shared prefixes are not worth a separate forward pass
        self.prefill_tokens = 0  # tokens run through prefill, for benchmarks

    def release(self, key: Hashable) -> None:
        self._caches.pop(key, None)

    def _shared_prefix(self, requests: Sequence[GenerationRequest]) -> None:
        """Compute, once, the KV cache of the prompt prefix that new episodes share.

        Episodes of one domain start with the same system prompt (instructions, policy, tool schemas),
        most of the first turn's prompt. Its cache is computed for one sequence and reused by every new
        episode instead of being prefilled once per episode.
        """
        fresh = [r.prompt_ids for r in requests if r.key not in self._caches]
        if not self.reuse_cache or not fresh:
            return
        if self._prefix is not None and all(p[: len(self._prefix[0])] == self._prefix[0] for p in fresh):
            return
        first, limit = fresh[0], min(len(p) for p in fresh) - 1
        length = next((n for n in range(limit) if any(p[n] != first[n] for p in fresh[1:])), limit)
        if length < self.min_shared_prefix:
            return
        with torch.no_grad():
            out = self.model(input_ids=torch.tensor([first[:length]], device=self.model.device), use_cache=True)
        cache = _returned_cache(out)
        self._prefix = (first[:length], [(layer.keys, layer.values) for layer in cache.layers])
        self.prefill_tokens += length

    def _cached(self, request: GenerationRequest) -> tuple[list[tuple[torch.Tensor, torch.Tensor]] | None, int]:
        """The reusable cache for a request and how many prompt tokens it covers (at least one is left to feed)."""
        entry = self._caches.get(request.key) if self.reuse_cache else None
        if entry is None and self.reuse_cache and self._prefix is not None:
            prefix = self._prefix[0]
            if len(prefix) < len(request.prompt_ids) and request.prompt_ids[: len(prefix)] == prefix:
                entry = self._prefix
        if entry is None:
            return None, 0
        ids, layers = entry
        n = min(len(ids), len(request.prompt_ids) - 1)
        if request.prompt_ids[:n] != ids[:n]:
            return None, 0
        if n < len(ids):
            layers = [(k[:, :, :n], v[:, :, :n]) for k, v in layers]
        return layers, n

    @torch.no_grad()
    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        if not requests:
            return []
        device = self.model.device
        self._shared_prefix(requests)
        caches = [self._cached(r) for r in requests]
        past_len = max(n for _, n in caches)
        new = [r.prompt_ids[n:] for r, (_, n) in zip(requests, caches)]
        width = max(len(x) for x in new)
        batch = len(requests)
        limits = [max(1, r.max_new_tokens) for r in requests]
        self.prefill_tokens += sum(len(x) for x in new)

        # [past (left-padded)] [new tokens (left-padded)] [room for the new tokens]
        mask = torch.zeros(batch, past_len + width, dtype=torch.long)
        input_ids = torch.full((batch, width), self.pad_id, dtype=torch.long)
        positions = torch.zeros(batch, width, dtype=torch.long)
        for b, ((_, n), toks) in enumerate(zip(caches, new)):
            mask[b, past_len - n : past_len] = 1
            mask[b, past_len + width - len(toks) :] = 1
            input_ids[b, width - len(toks) :] = torch.tensor(toks)
            positions[b, width - len(toks) :] = torch.arange(n, n + len(toks))
        cache = _buffered_cache(self.model, caches, past_len, capacity=past_len + width + max(limits), device=device)
        out = self.model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                         position_ids=positions.to(device), use_cache=True, **{self._cache_arg: cache})
        logits = out.logits[:, -1, :].float()
        next_pos = positions[:, -1] + 1

        rows = list(range(batch))  # original request index of each batch row
        done: set[int] = set()
        sampled: list[list[int]] = [[] for _ in requests]
        logps: list[list[float]] = [[] for _ in requests]
        results: list[Generation | None] = [None] * batch
        while True:
            tokens, token_logps = self._sample(logits)
            for j, b in enumerate(rows):
                if b in done:
                    continue
                tok = int(tokens[j])
                sampled[b].append(tok)
                logps[b].append(float(token_logps[j]))
                stopped = tok in self.stop_token_ids
                if stopped or len(sampled[b]) >= limits[b]:
                    results[b] = Generation(sampled[b], logps[b], truncated=not stopped)
                    self._store(requests[b], cache, mask, j, sampled[b])
                    done.add(b)
            if len(done) == batch:
                break
            # Finished rows ride along (their outputs are ignored) until a quarter of the batch has
            # finished: dropping a row copies every layer's cache, so it is done in bulk.
            finished_here = [j for j, b in enumerate(rows) if b in done]
            if len(finished_here) * 4 >= len(rows):
                keep = [j for j, b in enumerate(rows) if b not in done]
                cache.batch_select_indices(torch.tensor(keep, device=device))
                mask, next_pos, tokens = mask[keep], next_pos[keep], tokens[keep]
                rows = [rows[j] for j in keep]
            mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=torch.long)], dim=1)
            out = self.model(input_ids=tokens.view(-1, 1).to(device), attention_mask=mask.to(device),
                             position_ids=next_pos.view(-1, 1).to(device), use_cache=True, **{self._cache_arg: cache})
            logits = out.logits[:, -1, :].float()
            next_pos = next_pos + 1
        return [r for r in results if r is not None]

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

    def _store(self, request: GenerationRequest, cache, mask: torch.Tensor, row: int, sampled: list[int]) -> None:
        """Keep the row's cache, padding removed. It covers the prompt and all sampled tokens but the last
        (whose key/value is computed when it is fed next turn)."""
        if not self.reuse_cache:
            return
        keep = mask[row].nonzero().view(-1).to(self.model.device)
        layers = [(layer.keys[row : row + 1].index_select(2, keep), layer.values[row : row + 1].index_select(2, keep))
                  for layer in cache.layers]
        self._caches[request.key] = ((list(request.prompt_ids) + sampled[:-1]), layers)
