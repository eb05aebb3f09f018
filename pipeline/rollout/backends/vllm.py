"""The generation backend protocol served by vLLM on a GPU: an in-process ``vllm.LLM`` or a vLLM server.

vLLM is imported only when a backend is built; it is not a turnwise dependency (install it on the GPU
image). Training reaches these backends through TRL's own vLLM engine (:mod:`pipeline.training.vllm`),
which keeps the engine's weights in step with the trainer's; built by hand, they serve a fixed model.

Logprobs. Each sampled token comes back with its logprob as vLLM computes it under
``logprobs_mode="processed_logprobs"`` (TRL sets it in colocate mode; start a server with
``--logprobs-mode processed_logprobs``): after the penalties, temperature, min-p and the top-k/top-p cut,
renormalised over the tokens that survive the cut. :class:`~pipeline.rollout.backends.hf.HFBackend`
records the log-probability under the tempered distribution *before* the cut (``log_softmax(logits / T)``),
which is what TRL's loss recomputes. With ``top_p == 1``, ``top_k == 0`` and ``min_p == 0`` (turnwise's
training recipes) the two are the same quantity; with a cut they differ by the log of the nucleus's mass,
``log Z <= 0``: vLLM's value is the probability the token was really drawn with (the behaviour policy),
HF's the one the loss trains. TRL's importance-sampling correction divides one by the other, so under a
cut its ratio carries ``Z`` on every sampled token (see ``pipeline.training.vllm``).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Hashable, Sequence

from pipeline.rollout.backends.base import Generation, GenerationRequest


def _import_vllm():
    try:
        import vllm
    except ImportError as err:
        raise ImportError(
            "The vllm backend needs the vllm package, which turnwise does not install: on a GPU machine run "
            "`pip install vllm`, or use HFBackend (CPU or GPU)."
        ) from err
    return vllm


class VLLMBackend:
    """The backend protocol on an in-process ``vllm.LLM`` (GPU): token prompts in, sampled ids and logprobs out.

    Each :meth:`generate` is one ``LLM.generate`` call over every live episode's prompt. vLLM keeps KV caches
    itself: with prefix caching (vLLM's default, and set here when the backend builds the engine) a later
    turn's prompt, which extends the earlier one token for token, reuses the cached blocks, so ``key`` and
    :meth:`release` need no bookkeeping. ``model`` is a ``vllm.LLM`` or a model name/path to build one with
    ``llm_kwargs``. A turn ends on ``stop_token_ids`` alone (default: the tokenizer's eos), exactly as in
    ``HFBackend``: vLLM's own end-of-sequence ids from the model's generation config are ignored
    (``ignore_eos``), so both backends build the same episodes. Each request gets its own seed.

    Built by hand, it serves a fixed policy (evaluation, baselines); in training, TRL's engine syncs the
    trainer's weights into the same ``vllm.LLM`` before every rollout (``pipeline.training.vllm``).
    """

    def __init__(self, model, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                 stop_token_ids: Sequence[int] | None = None, top_k: int = 0, min_p: float = 0.0,
                 repetition_penalty: float = 1.0, sampling_kwargs: dict[str, Any] | None = None,
                 **llm_kwargs) -> None:
        if not isinstance(model, str) and not hasattr(model, "get_tokenizer"):
            raise TypeError(
                f"VLLMBackend takes a vllm.LLM or a model name or path, got a {type(model).__name__}: vLLM loads "
                "its own copy of the weights and does not follow a loaded model's (or a trainer's) updates. "
                "Generate from a loaded model with the 'hf' backend (RolloutConfig.backend='hf'), or pass the "
                "model's name or directory to serve that fixed policy with vLLM (in training, use_vllm: true)."
            )
        vllm = _import_vllm()
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
        self.top_k, self.min_p, self.repetition_penalty = top_k, min_p, repetition_penalty
        self.sampling_kwargs = dict(sampling_kwargs or {})
        if stop_token_ids is None:
            eos = self.llm.get_tokenizer().eos_token_id
            stop_token_ids = [eos] if isinstance(eos, int) else eos
        self.stop_token_ids = set(stop_token_ids)
        self._calls = 0

    def release(self, key: Hashable) -> None:
        """Nothing to forget: vLLM's prefix cache evicts blocks itself."""

    def sampling_params(self, max_new_tokens: int, seed: int):
        return self._vllm.SamplingParams(
            max_tokens=max(1, max_new_tokens), temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            min_p=self.min_p, repetition_penalty=self.repetition_penalty, logprobs=0,
            stop_token_ids=sorted(self.stop_token_ids), ignore_eos=True, seed=seed, **self.sampling_kwargs)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        if not requests:
            return []
        self._calls += 1
        params = [self.sampling_params(r.max_new_tokens, self.seed + 1_000_003 * self._calls + i)
                  for i, r in enumerate(requests)]
        prompts = [{"prompt_token_ids": list(r.prompt_ids)} for r in requests]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        results = []
        for request, output in zip(requests, outputs):
            completion = output.outputs[0]
            ids = list(completion.token_ids)
            logprobs = [float(step[token].logprob) for token, step in zip(ids, completion.logprobs)]
            results.append(_generation(request, ids, logprobs, self.stop_token_ids,
                                       completion.finish_reason == "stop"))
        return results


class VLLMServerBackend:
    """The backend protocol on a vLLM server (TRL's ``VLLMClient``; ``vllm_mode: server`` in training).

    Each live episode's turn is one ``/v1/completions`` request with the whole token prompt, sent
    concurrently: the server batches them, and its prefix cache (start it with prefix caching on) reuses
    each episode's earlier turns. Every request carries its own seed, so the ``num_generations`` episodes
    of a task, whose first prompts are identical, are sampled independently even across a server's
    data-parallel engines. Stop tokens and sampling settings are as in :class:`VLLMBackend`.
    """

    def __init__(self, client, stop_token_ids: Sequence[int], temperature: float = 1.0, top_p: float = 1.0,
                 seed: int = 0, top_k: int = 0, min_p: float = 0.0, repetition_penalty: float = 1.0,
                 sampling_kwargs: dict[str, Any] | None = None, max_concurrency: int = 64) -> None:
        self.client = client
        self.stop_token_ids = set(stop_token_ids)
        self.temperature, self.top_p, self.seed = temperature, top_p, seed
        self.top_k, self.min_p, self.repetition_penalty = top_k, min_p, repetition_penalty
        self.sampling_kwargs = dict(sampling_kwargs or {})
        self.max_concurrency = max_concurrency
        self._calls = 0

    def release(self, key: Hashable) -> None:
        """Nothing to forget: the server's prefix cache evicts blocks itself."""

    def _one(self, request: GenerationRequest, seed: int) -> Generation:
        max_tokens = max(1, request.max_new_tokens)
        output = self.client.generate(
            prompts=[list(request.prompt_ids)], n=1, repetition_penalty=self.repetition_penalty,
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p, max_tokens=max_tokens,
            logprobs=0, generation_kwargs={"seed": seed, "stop_token_ids": sorted(self.stop_token_ids),
                                           "ignore_eos": True, **self.sampling_kwargs})
        ids = list(output["completion_ids"][0])
        logprobs = [float(token[0]) if isinstance(token, (list, tuple)) else float(token)
                    for token in (output["logprobs"] or [[]])[0]]
        if len(logprobs) != len(ids):
            raise RuntimeError(f"The vLLM server returned {len(ids)} tokens but {len(logprobs)} logprobs for request "
                               f"{request.key!r}; it must return the sampled token's logprob (logprobs=0).")
        stopped = bool(ids) and ids[-1] in self.stop_token_ids
        if not stopped and len(ids) < max_tokens:
            raise RuntimeError(
                f"The vLLM server ended request {request.key!r} after {len(ids)} of {max_tokens} tokens without a stop "
                "token; turnwise stops turns only on stop token ids, so do not configure stop strings on the server.")
        return Generation(ids, logprobs, truncated=not stopped)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        if not requests:
            return []
        self._calls += 1
        seeds = [self.seed + 1_000_003 * self._calls + i for i in range(len(requests))]
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(requests))) as pool:
            return list(pool.map(self._one, requests, seeds))


def _generation(request: GenerationRequest, ids: list[int], logprobs: list[float], stop_token_ids: set[int],
                stopped: bool) -> Generation:
    if stopped and (not ids or ids[-1] not in stop_token_ids):
        raise RuntimeError(
            f"vLLM stopped request {request.key!r} without returning one of its stop tokens {sorted(stop_token_ids)}; "
            "turnwise stops turns only on stop token ids, so do not pass stop strings to the LLM."
        )
    return Generation(ids, logprobs, truncated=not stopped)
