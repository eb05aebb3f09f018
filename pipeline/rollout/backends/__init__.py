"""Generation backends for the rollout engine, by name.

A backend turns token prompts into sampled continuations (``generate(requests) -> generations``, the
protocol in :mod:`~pipeline.rollout.backends.base`, re-exported here). Two are registered:

- ``"hf"``: :class:`~pipeline.rollout.backends.hf.HFBackend` runs a Hugging Face causal LM on CPU or GPU,
  keeps each episode's KV cache between turns (:mod:`~pipeline.rollout.backends.episode_cache`,
  :mod:`~pipeline.rollout.backends.kv_cache`) and one shared copy of the system prompt's keys and values
  (:mod:`~pipeline.rollout.backends.prefix_attention`); tokens are chosen by
  :mod:`~pipeline.rollout.backends.sampling`. It generates from the model being trained, so training
  uses it.
- ``"vllm"``: :class:`~pipeline.rollout.backends.vllm.VLLMBackend` serves the same protocol from vLLM on a
  GPU (:class:`~pipeline.rollout.backends.vllm.VLLMServerBackend` from a vLLM server). Built by hand it
  serves a fixed policy (evaluation, baselines); in training (``use_vllm``) it runs on TRL's engine, whose
  weights TRL syncs from the trainer before every rollout (:mod:`pipeline.training.vllm`).

``build_backend(name, model, tokenizer, **sampling)`` builds one; ``RolloutConfig.backend`` names the one
training uses. A backend's module is imported only when that backend is built (``"hf"`` never imports
vLLM). Another backend is one :func:`register_backend` away.
"""

from __future__ import annotations

from typing import Any, Callable

from pipeline.rollout.backends.base import Generation, GenerationBackend, GenerationRequest

BackendFactory = Callable[..., GenerationBackend]  # (model, tokenizer, **sampling) -> backend

_BACKENDS: dict[str, BackendFactory] = {}


def register_backend(name: str) -> Callable[[BackendFactory], BackendFactory]:
    """Decorator: register ``factory(model, tokenizer, **sampling) -> GenerationBackend`` under ``name``.

    A factory should import its backend's module inside the function, so that registering costs no
    import. Registering a second factory under a taken name is an error.
    """
    def add(factory: BackendFactory) -> BackendFactory:
        if name in _BACKENDS and _BACKENDS[name] is not factory:
            raise ValueError(f"a generation backend named {name!r} is already registered "
                             f"({_BACKENDS[name].__module__}.{_BACKENDS[name].__qualname__}); pick another name.")
        _BACKENDS[name] = factory
        return factory

    return add


def backend_names() -> tuple[str, ...]:
    """The registered backend names, in registration order."""
    return tuple(_BACKENDS)


def check_backend_name(name: str, what: str = "backend") -> str:
    """``name`` when a backend is registered under it; otherwise a ValueError that lists the names."""
    if name not in _BACKENDS:
        raise ValueError(f"{what}={name!r} is not a generation backend; use one of {', '.join(backend_names())} "
                         "(or register another with pipeline.rollout.backends.register_backend).")
    return name


def build_backend(name: str, model: Any, tokenizer: Any, **sampling: Any) -> GenerationBackend:
    """The backend registered as ``name`` for ``model``; ``sampling`` (``temperature``, ``top_p``, ``seed``,
    ``stop_token_ids``, and the backend's own options) goes to its constructor.

    ``"hf"`` takes a loaded model and its tokenizer. ``"vllm"`` takes a ``vllm.LLM`` or a model name or
    path, and reads the tokenizer from vLLM (``tokenizer`` is ignored).
    """
    return _BACKENDS[check_backend_name(name)](model, tokenizer, **sampling)


@register_backend("hf")
def _hf(model: Any, tokenizer: Any, **sampling: Any) -> GenerationBackend:
    from pipeline.rollout.backends.hf import HFBackend

    return HFBackend(model, tokenizer, **sampling)


@register_backend("vllm")
def _vllm(model: Any, tokenizer: Any, **sampling: Any) -> GenerationBackend:
    from pipeline.rollout.backends.vllm import VLLMBackend

    return VLLMBackend(model, **sampling)


__all__ = ["BackendFactory", "Generation", "GenerationBackend", "GenerationRequest", "backend_names",
           "build_backend", "check_backend_name", "register_backend"]
