"""The generation backend protocol served by vLLM on a GPU.

vLLM is imported only when a :class:`VLLMBackend` is built; it is not a turnwise dependency (install it on
the GPU image).
"""

from __future__ import annotations

from typing import Hashable, Sequence

from pipeline.rollout.backends.base import Generation, GenerationRequest


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
        if not isinstance(model, str) and not hasattr(model, "get_tokenizer"):
            raise TypeError(
                f"VLLMBackend takes a vllm.LLM or a model name or path, got a {type(model).__name__}: vLLM loads "
                "its own copy of the weights and does not follow a loaded model's (or a trainer's) updates. "
                "Generate from a loaded model with the 'hf' backend (RolloutConfig.backend='hf'), or pass the "
                "model's name or directory to serve that fixed policy with vLLM."
            )
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
