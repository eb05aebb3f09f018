"""Tests for pipeline/rollout/backends/hf.py: HFBackend's KV-cache reuse, shared prefix and batching.

Every test compares what the backend samples against a reference that does none of the work being
tested: a full forward pass over the whole sequence, a backend without cache reuse, or each prompt
generated alone.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.rollout import RolloutEngine
from pipeline.rollout.backends import GenerationRequest
from pipeline.rollout.backends.hf import HFBackend, prefill_chunks
from tests.rollout.envs_for_tests import EchoEnv, LongPromptEnv, engine, tasks


def test_sampling_logprobs_match_a_full_forward_pass(tiny):
    """Logprobs recorded while decoding with reused KV caches equal those of one forward pass over the
    whole sequence: the cache, padding and position ids did not change what the model computed."""
    model, _ = tiny
    [traj] = engine(tiny).run(lambda t: EchoEnv(4), tasks(1))
    ids = torch.tensor([traj.tokens.input_ids])
    with torch.no_grad():
        logps = torch.log_softmax(model(ids).logits.float(), dim=-1)[0]
    for start, end in traj.tokens.turn_spans:
        expected = [float(logps[i - 1, traj.tokens.input_ids[i]]) for i in range(start, end)]
        assert traj.tokens.logprobs[start:end] == pytest.approx(expected, abs=1e-4)


def test_cache_reuse_and_batching_do_not_change_greedy_tokens(tiny):
    """Greedy rollouts are identical with and without KV-cache reuse, and batched or one at a time."""
    batch = engine(tiny, temperature=0).run(lambda t: EchoEnv(4), tasks(3))
    fresh = engine(tiny, temperature=0, reuse_cache=False).run(lambda t: EchoEnv(4), tasks(3))
    single = [engine(tiny, temperature=0).run(lambda t: EchoEnv(4), [t])[0] for t in tasks(3)]
    for a, b, c in zip(batch, fresh, single):
        assert a.tokens.input_ids == b.tokens.input_ids == c.tokens.input_ids
        assert a.tokens.logprobs == pytest.approx(c.tokens.logprobs, abs=1e-4)


def test_cache_reuse_prefills_only_new_tokens(tiny):
    """With reuse, later turns prefill the environment's reply, not the whole conversation."""
    model, tokenizer = tiny
    reuse = HFBackend(model, tokenizer, temperature=0.0)
    none = HFBackend(model, tokenizer, temperature=0.0, reuse_cache=False)
    [traj] = RolloutEngine(reuse, tokenizer, max_new_tokens=8).run(lambda t: EchoEnv(4), tasks(1))
    RolloutEngine(none, tokenizer, max_new_tokens=8).run(lambda t: EchoEnv(4), tasks(1))
    env_tokens = len(traj.tokens.input_ids) - sum(traj.tokens.assistant_mask)
    assert reuse.prefill_tokens <= env_tokens + len(traj.turns)
    assert none.prefill_tokens > 2 * reuse.prefill_tokens


def test_backend_honours_per_request_token_limits(tiny):
    model, tokenizer = tiny
    backend = HFBackend(model, tokenizer, temperature=1.0, seed=3)
    out = backend.generate([GenerationRequest("a", [1, 2, 3], 2), GenerationRequest("b", [4, 5], 5)])
    assert len(out[0].token_ids) <= 2 and len(out[1].token_ids) <= 5
    assert all(len(g.token_ids) == len(g.logprobs) for g in out)


def test_new_episodes_share_the_cached_system_prompt(tiny):
    """The first turn prefills the common prompt prefix once, not once per episode, and the result is
    the same as prefilling every episode on its own."""
    model, tokenizer = tiny
    shared = HFBackend(model, tokenizer, temperature=0.0)
    alone = HFBackend(model, tokenizer, temperature=0.0, reuse_cache=False)
    common = list(range(60, 120))  # 60 shared tokens
    prompts = [common + [200 + i, 201 + i] for i in range(4)]
    a = shared.generate([GenerationRequest(i, p, 5) for i, p in enumerate(prompts)])
    b = alone.generate([GenerationRequest(i, p, 5) for i, p in enumerate(prompts)])
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert shared.prefill_tokens == 60 + 4 * 2
    assert alone.prefill_tokens == 4 * 62


def test_shared_prefix_attention_matches_a_full_forward_pass(tiny):
    """Episodes that share a long system prompt attend to one stored copy of it across every turn, and
    what they sample is what the model gives on the whole sequence: logprobs match a full forward pass
    and greedy tokens match rollouts without any cache reuse."""
    model, tokenizer = tiny
    eng = engine(tiny)
    trajs = eng.run(lambda t: LongPromptEnv(4), tasks(3))
    assert eng.backend.caches.prefix is not None and len(eng.backend.caches.prefix.ids) > 100
    for traj in trajs:
        ids = torch.tensor([traj.tokens.input_ids])
        with torch.no_grad():
            logps = torch.log_softmax(model(ids).logits.float(), dim=-1)[0]
        for start, end in traj.tokens.turn_spans:
            expected = [float(logps[i - 1, traj.tokens.input_ids[i]]) for i in range(start, end)]
            assert traj.tokens.logprobs[start:end] == pytest.approx(expected, abs=1e-4)
    greedy = engine(tiny, temperature=0).run(lambda t: LongPromptEnv(4), tasks(3))
    fresh = engine(tiny, temperature=0, reuse_cache=False).run(lambda t: LongPromptEnv(4), tasks(3))
    assert [t.tokens.input_ids for t in greedy] == [t.tokens.input_ids for t in fresh]


def test_episodes_on_different_shared_prefixes_can_share_a_batch(tiny):
    """A call that mixes an episode cached on one shared prefix with new episodes on another still
    samples what an uncached backend samples."""
    model, tokenizer = tiny
    cached = HFBackend(model, tokenizer, temperature=0.0)
    plain = HFBackend(model, tokenizer, temperature=0.0, reuse_cache=False)
    first = [list(range(60, 120)) + [200 + i] for i in range(2)]
    second = [list(range(130, 190)) + [210 + i] for i in range(2)]
    turn1 = cached.generate([GenerationRequest(i, p, 4) for i, p in enumerate(first)])
    follow = first[0] + turn1[0].token_ids + [7, 8]
    mixed = [GenerationRequest(0, follow, 4)] + [GenerationRequest(10 + i, p, 4) for i, p in enumerate(second)]
    expected = plain.generate([GenerationRequest(r.key, r.prompt_ids, 4) for r in mixed])
    assert [g.token_ids for g in cached.generate(mixed)] == [g.token_ids for g in expected]


def test_rows_of_very_different_lengths_prefill_in_separate_passes(tiny):
    """A long prompt and short ones in one call prefill in separate passes (no padding of the short rows
    to the long one), write into one decode batch, and sample what each samples alone, in request order."""
    model, tokenizer = tiny
    prompts = [[5 + i for i in range(4)], [7 + i % 90 for i in range(300)], [9, 10, 11]]
    assert len(prefill_chunks(sorted(map(len, prompts)))) == 2
    together = HFBackend(model, tokenizer, temperature=0.0).generate(
        [GenerationRequest(i, p, 5) for i, p in enumerate(prompts)])
    alone = [HFBackend(model, tokenizer, temperature=0.0).generate([GenerationRequest(0, p, 5)])[0] for p in prompts]
    assert [g.token_ids for g in together] == [g.token_ids for g in alone]
    for a, b in zip(together, alone):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)


def test_doctests():
    import doctest

    import pipeline.rollout.backends.hf as hf

    result = doctest.testmod(hf)
    assert result.attempted and not result.failed
