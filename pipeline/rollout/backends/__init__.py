"""Generation backends for the rollout engine.

A backend turns token prompts into sampled continuations (``generate(requests) -> generations``, the
protocol in :mod:`~pipeline.rollout.backends.base`).

- :mod:`~pipeline.rollout.backends.hf`: :class:`HFBackend` runs a Hugging Face causal LM on CPU or GPU
  and keeps each episode's KV cache between turns (:mod:`~pipeline.rollout.backends.kv_cache`), with one
  shared copy of the system prompt's keys and values
  (:mod:`~pipeline.rollout.backends.prefix_attention`).
- :mod:`~pipeline.rollout.backends.vllm`: :class:`VLLMBackend` serves the same protocol from vLLM on a GPU.
"""

from pipeline.rollout.backends.base import Generation, GenerationBackend, GenerationRequest

__all__ = ["Generation", "GenerationBackend", "GenerationRequest"]
