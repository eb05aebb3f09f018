"""KV caches for batched decoding: a preallocated cache layer, batch assembly, and chunk views.

:class:`HFBackend <pipeline.rollout.backends.hf.HFBackend>` decodes dozens of episodes at once, each
with a cache of a few thousand tokens. transformers' ``DynamicLayer`` concatenates on every decode step,
copying the whole cache each time; on CPU that copying, not the model, dominates decoding. A
:class:`BufferedLayer` writes each new token into a buffer allocated once per call.

A call's cache is assembled from every row's own past, left-padded to a common length
(:func:`buffered_cache`); prefill passes then write into row ranges of it through views
(:func:`chunk_cache`). The helpers at the end bridge transformers versions (:func:`returned_cache`,
:func:`cache_argument`) and find the prompt prefix a batch shares (:func:`shared_prefix_length`).
"""

from __future__ import annotations

import inspect
from typing import Sequence

import torch
from transformers.cache_utils import DynamicLayer


class BufferedLayer(DynamicLayer):
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
        self.set_length(end)
        return self.keys, self.values

    def set_length(self, length: int) -> None:
        """Make the buffers' first ``length`` columns the cache's content (what attention reads)."""
        self.length = length
        self.keys, self.values = self._k[:, :, :length], self._v[:, :, :length]

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._k, self._v = self._k[indices], self._v[indices]
        self.set_length(self.length)


def buffered_cache(model, pasts: list, past_len: int, capacity: int):
    """A cache whose layers hold every row's own past (``pasts[b]``: per-layer ``(k, v)`` of shape
    (1, H, n_b, D), or None), left-padded to ``past_len``, with room to grow to ``capacity``."""
    from transformers import DynamicCache

    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    cache = DynamicCache()
    cache.layers = [BufferedLayer(capacity) for _ in range(config.num_hidden_layers)]
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
        layer.set_length(past_len)
    return cache


def chunk_cache(cache, lo: int, hi: int, start: int):
    """A cache over rows ``lo:hi`` of ``cache``'s buffers (views, so writes land in ``cache``) whose next
    tokens are written from column ``start``."""
    from transformers import DynamicCache

    part = DynamicCache()
    part.layers = []
    for layer in cache.layers:
        view = BufferedLayer(layer.capacity)
        view._k, view._v = layer._k[lo:hi], layer._v[lo:hi]
        view.dtype, view.device, view.is_initialized = layer.dtype, layer.device, True
        view.set_length(start)
        part.layers.append(view)
    return part


def set_cache_length(cache, length: int) -> None:
    """Make the first ``length`` columns of every layer of a :func:`buffered_cache` its content."""
    for layer in cache.layers:
        layer.set_length(length)


def row_layers(cache, row: int, valid: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Row ``row``'s keys and values without its padding: per layer ``(k, v)`` of shape (1, H, n, D), where
    ``valid`` (S,) bool marks the row's columns that hold real tokens (n of them)."""
    keep = valid.nonzero().view(-1)
    return [(layer.keys[row : row + 1].index_select(2, keep), layer.values[row : row + 1].index_select(2, keep))
            for layer in cache.layers]


def whole_past(prefix_layers: list | None, layers: list | None) -> list | None:
    """A row's whole past, per layer: the shared prefix's keys/values (or none) followed by the row's own."""
    if prefix_layers is None:
        return layers
    if layers is None:
        return prefix_layers
    return [(torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)) for (pk, pv), (k, v) in zip(prefix_layers, layers)]


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
