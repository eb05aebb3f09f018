"""Tests for pipeline/rollout/backends/vllm.py, the backend protocol seam: the vLLM backend through a
stand-in vllm module, driven by the real rollout engine, and its error when vllm is missing.

No GPU or vllm install is needed: ``FakeVLLM`` plays vllm's ``LLM.generate`` with a deterministic
"model" that samples from token ids, and records every prompt it was given.
"""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import pytest

from pipeline.rollout import RolloutEngine
from pipeline.rollout.backends import GenerationBackend, build_backend
from pipeline.rollout.backends.vllm import VLLMBackend
from tests.rollout.envs_for_tests import EchoEnv, tasks


class FakeLLM:
    """vllm.LLM's generate: a continuation of each token prompt, with a logprob per sampled token."""

    def __init__(self, tokenizer, eos_after: int = 5) -> None:
        self.tokenizer, self.eos_after, self.prompts = tokenizer, eos_after, []

    def get_tokenizer(self):
        return self.tokenizer

    def generate(self, prompts, params, use_tqdm=False):
        outputs = []
        for prompt, p in zip(prompts, params):
            ids = prompt["prompt_token_ids"]
            self.prompts.append(list(ids))
            n = min(self.eos_after, p.max_tokens)
            sampled = [65 + (len(ids) + k) % 26 for k in range(n)]  # letters, from the prompt's length
            stop = n == self.eos_after
            if stop:
                sampled[-1] = p.stop_token_ids[0]
            logprobs = [{t: SimpleNamespace(logprob=-0.1 * (k + 1))} for k, t in enumerate(sampled)]
            finish = "stop" if stop else "length"
            outputs.append(SimpleNamespace(outputs=[SimpleNamespace(token_ids=sampled, logprobs=logprobs,
                                                                    finish_reason=finish)]))
        return outputs


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.SamplingParams = lambda **kw: SimpleNamespace(**kw)
    module.LLM = None
    monkeypatch.setitem(sys.modules, "vllm", module)
    return module


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_vllm_backend_drives_the_rollout_engine_with_exact_tokens(fake_vllm, tokenizer):
    """Through the protocol, a vLLM-backed engine records exactly the ids and logprobs vLLM returned,
    and every later turn's prompt extends the previous one token for token (what vLLM's prefix cache
    reuses)."""
    llm = FakeLLM(tokenizer)
    backend = VLLMBackend(llm, temperature=1.0)
    assert isinstance(backend, GenerationBackend)
    trajs = RolloutEngine(backend, tokenizer, max_new_tokens=8).run(lambda t: EchoEnv(3), tasks(2))
    for traj in trajs:
        data = traj.tokens
        assert len(traj.turns) == 3
        for turn, (start, end) in zip(traj.turns, data.turn_spans):
            assert data.input_ids[start:end] == turn.completion_ids
            assert turn.completion_ids[-1] == tokenizer.eos_token_id and not turn.truncated
            assert data.logprobs[start:end] == pytest.approx([-0.1 * (k + 1) for k in range(5)])
    by_episode = [llm.prompts[0::2], llm.prompts[1::2]]  # two episodes, batched at each turn
    for prompts, traj in zip(by_episode, trajs):
        for earlier, later in zip(prompts, prompts[1:]):
            assert later[: len(earlier)] == earlier
        assert traj.tokens.input_ids[: len(prompts[-1])] == prompts[-1]


def test_vllm_backend_reports_truncation_at_the_token_limit(fake_vllm, tokenizer):
    backend = VLLMBackend(FakeLLM(tokenizer, eos_after=50))
    [traj] = RolloutEngine(backend, tokenizer, max_new_tokens=4).run(lambda t: EchoEnv(2), tasks(1))
    assert all(turn.truncated and len(turn.completion_ids) == 4 for turn in traj.turns)


def test_vllm_backend_without_vllm_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    with pytest.raises(ImportError, match="pip install vllm"):
        VLLMBackend("some/model")


def test_build_backend_vllm_serves_a_vllm_llm(fake_vllm, tokenizer):
    """By name, "vllm" wraps the given vllm.LLM with the sampling settings (the tokenizer comes from vLLM)."""
    llm = FakeLLM(tokenizer)
    backend = build_backend("vllm", llm, None, temperature=0.5, top_p=0.9, seed=3)
    assert isinstance(backend, VLLMBackend) and backend.llm is llm
    assert (backend.temperature, backend.top_p, backend.seed) == (0.5, 0.9, 3)
    assert backend.stop_token_ids == {tokenizer.eos_token_id}
