"""Generation backends for the rollout engine.

A backend turns token prompts into sampled continuations: ``generate(requests) -> generations``. It
works on token ids, never on text, so what the trainer later scores are exactly the ids that were
sampled. :class:`HFBackend` runs a Hugging Face causal LM on CPU or GPU and keeps each episode's
key/value cache between turns, so a later turn prefills only the tokens added since the last one
(the environment's reply), not the whole conversation. A vLLM backend implements the same protocol on
GPU.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import time
from dataclasses import dataclass, field
from typing import Hashable, Protocol, Sequence, runtime_checkable

import torch
from transformers import AttentionInterface
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


def _buffered_cache(model, pasts: list, past_len: int, capacity: int):
    """A cache whose layers hold every row's own past (``pasts[b]``: per-layer ``(k, v)`` of shape
    (1, H, n_b, D), or None), left-padded to ``past_len``, with room to grow to ``capacity``."""
    from transformers import DynamicCache

    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    cache = DynamicCache()
    cache.layers = [_BufferedLayer(capacity) for _ in range(config.num_hidden_layers)]
    ref = next((layers for layers in pasts if layers is not None), None)
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    like = torch.empty(0, dtype=model.dtype, device=model.device)
    for i, layer in enumerate(cache.layers):
        if ref is not None:
            k0, v0 = ref[i]
            layer._allocate(len(pasts), k0.shape[1], k0.shape[3], v0.shape[3], k0)
        else:
            layer._allocate(len(pasts), heads, dim, dim, like)
        for b, layers in enumerate(pasts):
            if layers is not None:
                k, v = layers[i]
                n = k.shape[2]
                if n:
                    layer._k[b, :, past_len - n : past_len] = k[0]
                    layer._v[b, :, past_len - n : past_len] = v[0]
        layer.length = past_len
        layer.keys, layer.values = layer._k[:, :, :past_len], layer._v[:, :, :past_len]
    return cache


def _chunk_cache(cache, lo: int, hi: int, start: int):
    """A cache over rows ``lo:hi`` of ``cache``'s buffers (views, so writes land in ``cache``) whose next
    tokens are written from column ``start``."""
    from transformers import DynamicCache

    part = DynamicCache()
    part.layers = []
    for layer in cache.layers:
        view = _BufferedLayer(layer.capacity)
        view._k, view._v = layer._k[lo:hi], layer._v[lo:hi]
        view.dtype, view.device, view.is_initialized = layer.dtype, layer.device, True
        view.length = start
        view.keys, view.values = view._k[:, :, :start], view._v[:, :, :start]
        part.layers.append(view)
    return part


def _prefill_chunks(lengths: Sequence[int], overhead: int = 64) -> list[tuple[int, int]]:
    """Split rows (sorted by ``lengths``, ascending) into contiguous ranges, one prefill pass each.

    A pass over rows ``i:j`` computes ``(j - i) * lengths[j - 1]`` token positions (shorter rows are padded)
    plus a fixed cost of about ``overhead`` positions (reading the weights once). The split minimises the
    total, so an environment reply of 400 tokens does not make 31 replies of 20 tokens pay for 400 each.

    >>> _prefill_chunks([10, 10, 12, 300, 310])
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


def returned_cache(output):
    """The KV cache a forward returned (``cache`` since transformers 5.24, ``past_key_values`` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def shared_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """How many leading tokens all ``sequences`` share, at most one less than the shortest (so that every
    sequence keeps a token of its own after the prefix)."""
    first, limit = sequences[0], min(len(s) for s in sequences) - 1
    return next((n for n in range(limit) if any(s[n] != first[n] for s in sequences[1:])), limit)


def cache_argument(model) -> str:
    """The forward argument that takes a KV cache: transformers 5.24 renamed ``past_key_values`` to ``cache``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


# --- attention over a shared prefix --------------------------------------------------------------------------
# The episodes of a batch share their system prompt, usually most of the context (about 1,700 of 2,000 tokens
# in the customer-service domain). Its keys and values are kept once, shape (1, H_kv, P, D), not once per row;
# each row's cache holds only what follows the prefix. Attention then runs in two parts, one matmul of every
# row's queries against the shared prefix and a batched matmul against each row's own keys, joined by one
# softmax. A decode step reads the prefix once instead of once per episode, which on CPU is most of its cost.
_ACTIVE_PREFIX: contextvars.ContextVar[list | None] = contextvars.ContextVar("turnwise_prefix", default=None)
_ATTENTION_NAME = "turnwise_shared_prefix"


def shared_prefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention of ``query`` (B, Hq, q, D) over the active shared prefix (1, Hkv, P, D) of layer
    ``module.layer_idx``, visible to every query, then each row's own ``key``/``value`` (B, Hkv, S, D)
    under ``attention_mask`` (B, 1, q, S) bool, True = attend. Returns (B, q, Hq, D) like transformers'
    attention functions. Rows that see no key at all get zeros (never NaN, which would poison the cache)."""
    prefix = _ACTIVE_PREFIX.get()
    batch, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    scale = scaling if scaling is not None else dim**-0.5
    # (B, Hkv, g*q, D): the query heads of one key/value head side by side (no repeat of keys/values)
    q = query.reshape(batch, kv_heads, group * q_len, dim)
    scores = torch.matmul(q, key.transpose(-1, -2)).float() * scale  # (B, Hkv, g*q, S)
    if attention_mask is not None:
        mask = attention_mask[:, :, None].expand(batch, 1, group, q_len, attention_mask.shape[-1])
        scores = scores.masked_fill(~mask.reshape(batch, 1, group * q_len, -1), float("-inf"))
    top = scores.amax(-1, keepdim=True)
    layers = prefix[module.layer_idx] if prefix is not None else None
    if layers is not None:
        pk, pv = layers
        qp = q.transpose(0, 1).reshape(kv_heads, batch * group * q_len, dim)  # every row against one prefix
        prefix_scores = torch.matmul(qp, pk[0].transpose(-1, -2)).float() * scale  # (Hkv, B*g*q, P)
        prefix_scores = prefix_scores.view(kv_heads, batch, group * q_len, -1).transpose(0, 1)
        top = torch.maximum(top, prefix_scores.amax(-1, keepdim=True))
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    weights = (scores - top).exp()
    total = weights.sum(-1, keepdim=True)
    out = torch.matmul(weights.to(value.dtype), value).float()  # (B, Hkv, g*q, D)
    if layers is not None:
        prefix_weights = (prefix_scores - top).exp()
        total = total + prefix_weights.sum(-1, keepdim=True)
        pw = prefix_weights.transpose(0, 1).reshape(kv_heads, batch * group * q_len, -1).to(pv.dtype)
        out = out + torch.matmul(pw, pv[0]).float().view(kv_heads, batch, group * q_len, -1).transpose(0, 1)
    out = (out / total.clamp_min(1e-30)).to(query.dtype)
    return out.reshape(batch, heads, q_len, -1).transpose(1, 2).contiguous(), None


AttentionInterface.register(_ATTENTION_NAME, shared_prefix_attention)


@contextlib.contextmanager
def _prefix_attention(model, prefix_layers: list | None):
    """Run ``model`` with :func:`shared_prefix_attention` (over ``prefix_layers``, or none) for the duration."""
    config = model.config
    previous = config._attn_implementation
    token = _ACTIVE_PREFIX.set(prefix_layers)
    config._attn_implementation = _ATTENTION_NAME
    try:
        yield
    finally:
        config._attn_implementation = previous
        _ACTIVE_PREFIX.reset(token)


def _attention_mask(valid: torch.Tensor, q_len: int) -> torch.Tensor:
    """(B, 1, q, S) bool: key column ``s`` is visible to query ``i`` when it holds a real token (``valid``,
    (B, S)) and is not after the query (queries are the last ``q_len`` columns)."""
    width = valid.shape[1]
    if q_len == 1:
        return valid[:, None, None, :]
    cols = torch.arange(width, device=valid.device)
    causal = cols[None, :] <= (width - q_len + torch.arange(q_len, device=valid.device))[:, None]
    return valid[:, None, None, :] & causal[None, None]


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
        with _prefix_attention(self.model, prefix.layers if prefix is not None else None):
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
        # prefill pass (see _prefill_chunks); results are put back in request order at the end.
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
        cache = _buffered_cache(self.model, pasts, past_len, capacity=past_len + width + max(limits))
        valid = valid.to(device)
        logits = []
        for lo, hi in _prefill_chunks([len(x) for x in new]):
            # Rows lo:hi prefill their new tokens (at most ``w``) into their rows of the shared buffers.
            w = len(new[hi - 1])
            part = _chunk_cache(cache, lo, hi, past_len + width - w)
            logits.append(self._forward(input_ids[lo:hi, width - w :], _attention_mask(valid[lo:hi], w),
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
            logits = self._forward(tokens.view(-1, 1), _attention_mask(valid, 1), next_pos.view(-1, 1), cache, prefix)
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


class VLLMBackend:
    """The backend protocol on vLLM (GPU): token prompts in, sampled ids and their logprobs out.

    vLLM keeps KV caches itself: with ``enable_prefix_caching`` (on by default here) a later turn's
    prompt, which extends the earlier one token for token, reuses the cached blocks, so ``key`` and
    :meth:`release` need no bookkeeping. ``model`` is a ``vllm.LLM`` or a model name/path to build one
    with ``llm_kwargs``. Logprobs are requested as processed (after temperature and top-p) where the
    installed vLLM supports it, to match :class:`HFBackend`. vLLM is imported only here, and only when
    the backend is built; it is not a turnwise dependency (install it on the GPU image).

    Weight updates during training are not synchronised by this class: it serves a fixed policy
    (evaluation, baselines, or a trainer that reloads it between steps).
    """

    def __init__(self, model, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                 stop_token_ids: Sequence[int] | None = None, **llm_kwargs) -> None:
        try:
            import vllm
        except ImportError as err:
            raise ImportError(
                "VLLMBackend needs the vllm package, which turnwise does not install: on a GPU machine run "
                "`pip install vllm`, or use HFBackend (CPU or GPU)."
            ) from err
        self._vllm = vllm
        if isinstance(model, str):
            llm_kwargs.setdefault("enable_prefix_caching", True)
            llm_kwargs.setdefault("logprobs_mode", "processed_logprobs")
            try:
                model = vllm.LLM(model=model, seed=seed, **llm_kwargs)
            except TypeError:  # older vLLM without logprobs_mode
                llm_kwargs.pop("logprobs_mode")
                model = vllm.LLM(model=model, seed=seed, **llm_kwargs)
        self.llm = model
        self.temperature, self.top_p, self.seed = temperature, top_p, seed
        tokenizer = self.llm.get_tokenizer()
        eos = tokenizer.eos_token_id
        self.stop_token_ids = set(stop_token_ids or ([eos] if isinstance(eos, int) else eos))
        self._calls = 0

    def release(self, key: Hashable) -> None:
        """Nothing to forget: vLLM's prefix cache evicts blocks itself."""

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        if not requests:
            return []
        vllm = self._vllm
        self._calls += 1
        params = [vllm.SamplingParams(max_tokens=max(1, r.max_new_tokens), temperature=self.temperature,
                                      top_p=self.top_p, logprobs=0, stop_token_ids=sorted(self.stop_token_ids),
                                      ignore_eos=False, seed=self.seed + 1_000_003 * self._calls + i)
                  for i, r in enumerate(requests)]
        prompts = [{"prompt_token_ids": list(r.prompt_ids)} for r in requests]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        results = []
        for request, output in zip(requests, outputs):
            completion = output.outputs[0]
            ids = list(completion.token_ids)
            logprobs = [float(step[token].logprob) for token, step in zip(ids, completion.logprobs)]
            stopped = completion.finish_reason == "stop"
            if stopped and (not ids or ids[-1] not in self.stop_token_ids):
                raise RuntimeError(
                    f"vLLM stopped request {request.key!r} without returning its stop token (finish_reason "
                    f"{completion.finish_reason!r}, stop_reason {getattr(completion, 'stop_reason', None)!r}); "
                    "turnwise stops turns only on stop token ids, so do not pass stop strings to the LLM."
                )
            results.append(Generation(ids, logprobs, truncated=not stopped))
        return results
