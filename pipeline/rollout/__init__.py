"""Running policies in environments.

- :mod:`pipeline.rollout.policies`: ``run_policy`` plays one episode with any ``(messages) -> str``
  policy; ``run_batched`` plays many with a batch policy.
- :mod:`pipeline.rollout.engine`: :class:`RolloutEngine`, the model path. Batched like ``run_batched``,
  but on token ids, with a generation backend that reuses each episode's KV cache across turns; it
  records the sampled ids exactly, their logprobs, the assistant mask and each turn's token span.
- :mod:`pipeline.rollout.backends`: the generation backends (``hf``, ``vllm``) behind one protocol, and
  ``build_backend(name, ...)``.
"""

from pipeline.rollout.engine import RolloutEngine, TemplateError
from pipeline.rollout.policies import BatchPolicy, Policy, run_batched, run_policy

__all__ = ["BatchPolicy", "Policy", "RolloutEngine", "TemplateError", "run_batched", "run_policy"]
