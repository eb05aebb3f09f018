"""vLLM rollouts in training, through TRL's own vLLM support: ``use_vllm: true`` with ``backend: vllm``.

Design. TRL 1.16's ``GRPOTrainer`` builds the vLLM engine (``trainer.vllm_generation``) in either mode:
``vllm_mode: colocate``, a ``vllm.LLM`` inside every training process on its GPU, or ``vllm_mode: server``,
a separate ``trl vllm-serve`` (``vllm serve``) process that the main process reaches through TRL's
``VLLMClient``. turnwise keeps TRL's generation out of the way (its ``rollout_func`` plays whole episodes)
but keeps everything else TRL does around it:

- **Weight sync.** Before it calls the ``rollout_func``, ``GRPOTrainer._generate`` runs
  ``vllm_generation.sync_weights()`` whenever the optimiser has stepped since the last sync: once per
  rollout phase. The sync merges the LoRA adapter into the base weights (gathering ZeRO-3 or FSDP shards
  first), pushes them into the engine (``load_weights`` in colocate mode, NCCL from the main process in
  server mode), unmerges, and resets the engine's prefix cache, so no KV block computed under the old
  weights is reused. In server mode every process waits at a barrier after the sync, so none generates
  before the main process has pushed the new weights.
- **One engine call per turn.** :class:`~pipeline.rollout.RolloutEngine` sends each turn of every live
  episode to the engine as the episode's whole token sequence so far: one ``LLM.generate`` over all live
  episodes (colocate), or one ``/v1/completions`` request per episode, sent concurrently (server).
  Prefix caching (vLLM's default) reuses the KV blocks of the episode's earlier turns and of the system
  prompt the episodes share. Each request carries its own seed.
- **Tokens and logprobs from the engine.** The sampled ids are appended to the episode as they are
  (never re-tokenised), with the logprob vLLM reports for each (``processed_logprobs``). The
  ``rollout_func`` returns them as ``logprobs``, which TRL keeps as ``sampling_per_token_logps``.
- **Importance sampling.** With ``use_vllm``, TRL recomputes the trainer's log-probs of the same tokens
  (``old_per_token_logps``) and weights the loss by ``exp(old - sampling)`` over the model's tokens only
  (environment tokens are masked by ``env_mask``): ``vllm_importance_sampling_correction``, with
  ``vllm_importance_sampling_mode`` and its clips. Multi-turn episodes hold hundreds of sampled tokens, so a
  sequence-level ratio (TRL's default, ``sequence_mask``) multiplies hundreds of small mismatches and masks
  whole episodes; the recipes use ``token_truncate``. TRL's loss scores the tempered distribution without
  top-p/top-k, while vLLM reports the logprob after the cut (see :mod:`pipeline.rollout.backends.vllm`): with
  a cut every ratio carries the nucleus mass, so keep ``top_p: 1.0`` and ``top_k: 0`` with vLLM (a warning
  says so otherwise).

A missing ``vllm`` package or GPU fails in :func:`check_vllm_config`, which ``turnwise train`` runs before
it loads the model.

Why not ``trl.experimental.async_grpo`` (``AsyncGRPOTrainer``: an external vLLM server fed by a rollout
worker process, weights over NCCL, samples consumed up to ``max_staleness`` policy versions late). Read in
the pinned 1.16 sources, it does not fit multi-turn episodes as turnwise trains them, so turnwise stays on
the synchronous ``GRPOTrainer`` path:

- It is a separate, experimental trainer (``_BaseTrainer``), not ``GRPOTrainer``: no ``rollout_func``, and it
  loads the model itself from a name, so the per-turn advantages, the shared-prefix loss, the critic's
  checkpoints and TRL_HOOKS would all have to be rebuilt against an API that may change without notice.
- Each training row carries one scalar advantage (``RolloutSample.advantage``); turnwise's per-turn
  estimators (``group_based_per_turn``, ``monte_carlo``, ``gae``) write a value per turn onto the tokens, and
  ``gae`` reads the policy's hidden states, which the rollout worker has no access to.
- Its worker plays conversations with TRL's tool protocol (chat-template tools, ``parse_response``,
  ``environment_factory`` objects whose methods are the tools) and re-tokenises the whole conversation every
  turn, forking a row when the tokens drift. turnwise's environments talk through text (a simulated
  customer, ``<tool_call>`` blocks, an SOP and a strict outcome) and its engine keeps the sampled ids exactly.
  Hosting turnwise's engine in a custom ``RolloutWorkerProtocol`` would mean writing the worker process,
  queue and scoring ourselves: the home-made distribution layer the architecture rules out.
- With bounded staleness, the turns of one 12-turn episode can be sampled under several policy versions;
  the only correction is the clipped ratio against the sampler's logprobs.

What it would buy is overlap: generation and training run at the same time, which matters when episodes
are long. That is worth revisiting when a stable TRL release lets a rollout function drive it.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from contextlib import contextmanager
from typing import Any, Iterator

logger = logging.getLogger(__name__)

VLLM_REQUIREMENT = "vllm>=0.22,<0.32"  # the versions TRL 1.16 supports (trl.import_utils.is_vllm_available)


def vllm_installed() -> bool:
    """Whether ``import vllm`` can succeed, without importing it."""
    if "vllm" in sys.modules:
        return sys.modules["vllm"] is not None
    return importlib.util.find_spec("vllm") is not None


def gpu_available() -> bool:
    """Whether a CUDA GPU is visible (vLLM generates on one)."""
    import torch

    return torch.cuda.is_available()


def require_vllm_runtime(what: str = "use_vllm=True") -> None:
    """Fail with the fix when the ``vllm`` package or a CUDA GPU is missing."""
    if not vllm_installed():
        raise ImportError(
            f"{what} needs the vllm package, which is not installed (turnwise does not install it): on a GPU machine "
            f"run `pip install '{VLLM_REQUIREMENT}'` (the versions TRL 1.16 supports), or set use_vllm: false and "
            "backend: hf to generate with the HF backend.")
    if not gpu_available():
        raise RuntimeError(
            f"{what} needs a CUDA GPU, and none is visible here (torch.cuda.is_available() is False): run on a GPU "
            "machine, or set use_vllm: false and backend: hf to generate with the HF backend on this one.")


def check_vllm_config(grpo_args: Any, rollout_config: Any) -> None:
    """Fail before the model loads when vLLM rollouts are asked for but cannot run, or half-configured.

    ``backend: vllm`` and TRL's ``use_vllm: true`` go together: the first makes turnwise's rollout engine
    generate with vLLM, the second makes TRL build the engine and keep its weights in step.
    """
    use_vllm = bool(getattr(grpo_args, "use_vllm", False))
    backend = rollout_config.backend
    if backend == "vllm" and not use_vllm:
        raise ValueError(
            "backend='vllm' generates with TRL's vLLM engine, which TRL builds and keeps in step with the trainer's "
            "weights only with use_vllm=True: set use_vllm: true and vllm_mode: colocate (or server), or use "
            "backend: hf.")
    if not use_vllm:
        return
    if backend != "vllm":
        raise ValueError(
            f"use_vllm=True starts TRL's vLLM engine, but backend={backend!r} would generate the episodes without it: "
            "set backend: vllm to play them on vLLM, or use_vllm: false to keep the HF backend.")
    mode = getattr(grpo_args, "vllm_mode", "colocate")
    if mode not in ("colocate", "server"):
        raise ValueError(f"vllm_mode={mode!r}; use 'colocate' (vLLM inside each training process) or 'server' "
                         "(a `trl vllm-serve` process).")
    require_vllm_runtime()
    if mode == "colocate" and getattr(grpo_args, "vllm_tensor_parallel_size", 1) > 1:
        raise ValueError(
            f"vllm_tensor_parallel_size={grpo_args.vllm_tensor_parallel_size} in colocate mode: the processes of a "
            "tensor-parallel group must call the engine together, turn by turn, and their episodes end at different "
            "turns. Use vllm_mode: server, with the server's own --tensor-parallel-size, or "
            "vllm_tensor_parallel_size: 1.")
    max_length = getattr(grpo_args, "vllm_max_model_length", None)
    if max_length is not None and max_length < rollout_config.max_total_tokens:
        raise ValueError(
            f"vllm_max_model_length={max_length} is below max_total_tokens={rollout_config.max_total_tokens}: the "
            "engine would refuse an episode's later turns. Raise vllm_max_model_length to at least max_total_tokens "
            "(or leave it unset: the model's context length).")
    cuts = {name: value for name, value, neutral in (("top_p", grpo_args.top_p, 1.0),
                                                      ("top_k", grpo_args.top_k or 0, 0),
                                                      ("min_p", grpo_args.min_p or 0.0, 0.0)) if value != neutral}
    if cuts and grpo_args.vllm_importance_sampling_correction:
        logger.warning(
            "use_vllm with %s: vLLM reports each token's logprob after that cut (renormalised), TRL's loss before "
            "it, so every importance-sampling ratio carries the kept mass of the distribution (<= 1) and sampled "
            "tokens are down-weighted. Keep top_p: 1.0, top_k: 0 and min_p: 0.0 with vLLM rollouts.",
            ", ".join(f"{k}={v}" for k, v in cuts.items()))
    if grpo_args.vllm_importance_sampling_correction and grpo_args.vllm_importance_sampling_mode.startswith("sequence"):
        logger.warning(
            "vllm_importance_sampling_mode=%s: one ratio per episode, the product over all its sampled tokens (often "
            "hundreds over a multi-turn episode), so small engine/trainer mismatches add up and whole episodes get "
            "masked or clipped. token_truncate (the recipes' choice) corrects each token on its own.",
            grpo_args.vllm_importance_sampling_mode)


@contextmanager
def rollout_phase(trainer: Any) -> Iterator[None]:
    """Around one ``rollout_func`` call with vLLM: after TRL's weight sync, before the first turn.

    Server mode: a barrier, so no process generates before the main process has pushed this step's weights.
    Colocate mode with ``vllm_enable_sleep_mode``: the engine's weights are pushed back and its KV cache
    woken for the rollout, and it sleeps again afterwards (what TRL's own generation does around a call).
    """
    generation = trainer.vllm_generation
    if generation.mode == "server":
        trainer.accelerator.wait_for_everyone()
        yield
        return
    sleeping = bool(getattr(generation, "enable_sleep_mode", False))
    if sleeping:
        if getattr(generation, "_llm_weights_sleeping", False):  # sleep level 2 dropped the weights: push them
            generation.sync_weights()
        generation.llm.wake_up(tags=["kv_cache"])
    try:
        yield
    finally:
        if sleeping:
            generation.llm.sleep(level=2)
            generation._llm_weights_sleeping = True


def engine_backend(trainer: Any, seed: int):
    """A generation backend on TRL's engine (``trainer.vllm_generation``) with the run's sampling settings: a
    :class:`~pipeline.rollout.backends.vllm.VLLMBackend` on the colocated ``vllm.LLM``, or a
    :class:`~pipeline.rollout.backends.vllm.VLLMServerBackend` on the server."""
    from pipeline.rollout.backends.vllm import VLLMBackend, VLLMServerBackend

    args = trainer.args
    generation = trainer.vllm_generation
    eos = trainer.processing_class.eos_token_id
    stop_token_ids = [eos] if isinstance(eos, int) else list(eos)  # as the HF backend stops: the tokenizer's eos
    sampling = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k or 0, min_p=args.min_p or 0.0,
                    repetition_penalty=args.repetition_penalty, sampling_kwargs=dict(args.generation_kwargs or {}))
    seed = seed + 7919 * trainer.accelerator.process_index  # processes never share a sampling seed
    if generation.mode == "colocate":
        _warn_without_prefix_caching(generation.llm)
        return VLLMBackend(generation.llm, seed=seed, stop_token_ids=stop_token_ids, **sampling)
    return VLLMServerBackend(server_client(trainer), stop_token_ids=stop_token_ids, seed=seed, **sampling)


def server_client(trainer: Any):
    """The main process's ``VLLMClient`` (TRL's, which also pushes the weights), or on the other processes a
    client of their own for generation only (no weight-transfer group), made once per trainer."""
    generation = trainer.vllm_generation
    client = getattr(generation, "vllm_client", None)
    if client is not None:
        return client
    client = getattr(trainer, "_turnwise_vllm_client", None)
    if client is None:
        from trl.generation.vllm_client import VLLMClient

        base_url = generation.server_base_url or f"http://{generation.server_host}:{generation.server_port}"
        client = VLLMClient(base_url=base_url, connection_timeout=generation.server_timeout)
        trainer._turnwise_vllm_client = client
    return client


def _warn_without_prefix_caching(llm: Any) -> None:
    config = getattr(getattr(getattr(llm, "llm_engine", None), "vllm_config", None), "cache_config", None)
    if config is not None and getattr(config, "enable_prefix_caching", None) is False:
        logger.warning("The colocated vLLM engine runs without prefix caching: every turn prefills its episode's "
                       "whole conversation again. vLLM enables it by default; check VLLM_* settings that turn it off.")
