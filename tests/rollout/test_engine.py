"""Tests for pipeline/rollout/engine.py: the token-level RolloutEngine's bookkeeping over whole episodes.

Generation runs on the HF backend with the tiny model; what is checked is the engine's token sequence
(sampled ids kept exactly, the assistant mask, turn spans), its budgets and its template check.
"""

from __future__ import annotations

import pytest

from pipeline.rollout import RolloutEngine, TemplateError
from pipeline.rollout.backends.hf import HFBackend
from tests.rollout.envs_for_tests import EchoEnv, engine, tasks


def test_trained_ids_are_the_sampled_ids_across_a_five_turn_episode(tiny):
    """Each turn's span in the token sequence holds exactly the ids the backend sampled, the mask marks
    exactly those spans, and the sequence decodes to the conversation as the chat template renders it."""
    model, tokenizer = tiny
    [traj] = engine(tiny).run(lambda t: EchoEnv(5), tasks(1))
    data = traj.tokens
    assert len(traj.turns) == 5 and len(data.turn_spans) == 5
    assert len(data.input_ids) == len(data.assistant_mask) == len(data.logprobs)
    on = set()
    for turn, (start, end) in zip(traj.turns, data.turn_spans):
        assert data.input_ids[start:end] == turn.completion_ids
        assert data.logprobs[start:end] == turn.logprobs
        on.update(range(start, end))
    assert [i for i, m in enumerate(data.assistant_mask) if m] == sorted(on)
    # The environment's tokens are the template's rendering of its messages, and nothing was re-tokenised.
    # The assistant spans stand for their turns' texts (a random byte-level model samples bytes that are not
    # UTF-8 on their own, and special tokens, which its text leaves out); the rest is decoded as it is.
    last_env = len(traj.turns[-1].env_messages)
    rendered = tokenizer.apply_chat_template(traj.messages[: len(traj.messages) - last_env], tokenize=False)
    bounds = [0, *[i for span in data.turn_spans for i in span], len(data.input_ids)]
    pieces = [tokenizer.decode(data.input_ids[a:b]) for a, b in zip(bounds, bounds[1:])]
    for k, turn in enumerate(traj.turns):
        pieces[2 * k + 1] = turn.assistant + ("" if turn.truncated else tokenizer.eos_token)
    decoded = "".join(pieces)
    assert rendered.startswith(decoded)
    assert len(rendered) - len(decoded) <= len(tokenizer.eos_token + "\n")  # only the last turn's closing is left
    assert tokenizer.decode(data.input_ids[: data.turn_spans[0][0]]) == tokenizer.apply_chat_template(
        traj.messages[:2], tokenize=False, add_generation_prompt=True)


def test_max_new_tokens_truncates_turns(tiny):
    [traj] = engine(tiny, max_new_tokens=3).run(lambda t: EchoEnv(3), tasks(1))
    for turn in traj.turns:
        assert len(turn.completion_ids) <= 3
        assert turn.truncated == (len(turn.completion_ids) == 3 and turn.completion_ids[-1] != tiny[1].eos_token_id)


def test_total_token_budget_ends_the_episode_as_max_tokens(tiny):
    """When the sequence reaches max_total_tokens the episode stops, reported as incomplete, and no turn
    samples past the budget."""
    [probe] = engine(tiny, max_new_tokens=8).run(lambda t: EchoEnv(1), tasks(1))
    prompt_len = probe.tokens.turn_spans[0][0]
    budget = prompt_len + 150  # room for two or three turns: 8 sampled + ~50 byte-level env tokens each
    [traj] = engine(tiny, max_new_tokens=8, max_total_tokens=budget).run(lambda t: EchoEnv(50), tasks(1))
    assert (traj.outcome.stop_reason, traj.outcome.completed) == ("max_tokens", False)
    assert 1 < len(traj.turns) < 50
    assert all(end <= budget for _, end in traj.tokens.turn_spans)


def test_a_template_that_rewrites_history_is_refused(tiny):
    """Incremental tokenisation needs a prefix-preserving template; anything else is a clear error."""
    model, tokenizer = tiny
    rewriting = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    rewriting.chat_template = ("{% for m in messages %}{% if loop.last or m.role != 'assistant' %}<|im_start|>"
                               "{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
                               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    backend = HFBackend(model, rewriting, temperature=0.0)
    with pytest.raises(TemplateError, match="prefix"):
        RolloutEngine(backend, rewriting, max_new_tokens=4).run(lambda t: EchoEnv(3), tasks(1))


# -- scheduling: continuous batching against static chunks ---------------------------------------------


def varied(task):
    """Episodes of 1 to 4 turns depending on the task, so that static chunks wait for their longest."""
    return EchoEnv(len(task.id) // 2 % 4 + 1)


class Recording:
    """Wraps a backend and records each generate call's episode keys."""

    def __init__(self, backend) -> None:
        self.backend, self.calls = backend, []

    def generate(self, requests):
        self.calls.append([r.key for r in requests])
        return self.backend.generate(requests)

    def release(self, key):
        self.backend.release(key)


def play(tiny, schedule, batch_size, temperature=0.0, seed=0, n=7, seeds=None):
    model, tokenizer = tiny
    backend = Recording(HFBackend(model, tokenizer, temperature=temperature, seed=seed))
    engine_ = RolloutEngine(backend, tokenizer, max_new_tokens=6, batch_size=batch_size)
    turns = []
    trajectories = engine_.run(varied, tasks(n), seeds if seeds is not None else 0,
                               on_turn=lambda active, finished: turns.append((active, finished)), schedule=schedule)
    return trajectories, backend.calls, turns


def transcript(t):
    return t.task_id, t.messages, t.tokens.input_ids, t.tokens.assistant_mask, t.tokens.turn_spans, t.outcome.stop_reason


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_continuous_batching_plays_the_same_episodes_as_static_chunks_in_fewer_calls(tiny, temperature):
    """Greedy or sampled, continuous batching gives every episode the transcript (messages, token ids, mask,
    spans, logprobs) that static chunks of the same size give, and that any other batch size gives; yet a
    slot freed by a short episode is refilled at the next turn, so it needs fewer backend calls."""
    continuous, calls, turns = play(tiny, "continuous", 3, temperature)
    static, static_calls, static_turns = play(tiny, "static", 3, temperature)
    alone, _, _ = play(tiny, "static", 1, temperature)
    together, _, _ = play(tiny, "continuous", 7, temperature)
    assert [len(t.turns) for t in continuous] == [2, 3, 4, 1, 2, 3, 4]  # varied lengths
    for runs in (static, alone, together):
        assert [transcript(t) for t in continuous] == [transcript(t) for t in runs]
        for a, b in zip(continuous, runs):
            assert a.tokens.logprobs == pytest.approx(b.tokens.logprobs, abs=1e-4)
    assert all(len(c) <= 3 for c in calls)
    assert len(calls) < len(static_calls)
    # a static chunk decays to one live episode; continuously, slots are refilled while episodes wait
    assert min(len(c) for c in static_calls[:4]) < 3 and all(len(c) == 3 for c in calls[:5])
    assert turns[-1] == (0, 7) and static_turns[-1] == (0, 7)
    assert [f for _, f in turns] == sorted(f for _, f in turns)


def test_sampled_episodes_depend_on_the_backend_seed_and_their_own_stream_only(tiny):
    """Each episode samples from its own stream (the backend's seed and the episode's ordinal), so the same
    seed reproduces every transcript under any batching, another seed changes them, and episodes of one
    task with one environment seed (a GRPO group) still sample differently."""
    group = [tasks(1)[0]] * 4
    model, tokenizer = tiny

    def run(seed, batch_size):
        backend = HFBackend(model, tokenizer, temperature=1.0, seed=seed)
        return [t.tokens.input_ids for t in RolloutEngine(backend, tokenizer, max_new_tokens=6,
                                                          batch_size=batch_size).run(lambda t: EchoEnv(2), group)]

    first = run(5, 4)
    assert run(5, 1) == run(5, 3) == first
    assert run(6, 4) != first
    assert len({tuple(ids) for ids in first}) == 4


def test_a_second_run_on_the_same_engine_continues_the_streams(tiny):
    """Episodes are numbered across runs of one engine, so a second run does not replay the first's draws,
    and two chunked runs equal one run over all the tasks."""
    model, tokenizer = tiny

    def engine_():
        return RolloutEngine(HFBackend(model, tokenizer, temperature=1.0, seed=2), tokenizer, max_new_tokens=6,
                             batch_size=2)

    whole = engine_().run(lambda t: EchoEnv(2), tasks(4))
    split = engine_()
    parts = split.run(lambda t: EchoEnv(2), tasks(4)[:2]) + split.run(lambda t: EchoEnv(2), tasks(4)[2:])
    assert [transcript(t) for t in parts] == [transcript(t) for t in whole]
    again = split.run(lambda t: EchoEnv(2), tasks(4)[:2])
    assert [t.tokens.input_ids for t in again] != [t.tokens.input_ids for t in parts[:2]]


def test_bad_schedule_batch_size_and_seeds_are_refused(tiny):
    with pytest.raises(ValueError, match="schedule='fifo' is not a rollout schedule; use one of continuous, static"):
        engine(tiny).run(lambda t: EchoEnv(1), tasks(1), schedule="fifo")
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        engine(tiny, batch_size=0)
    with pytest.raises(ValueError, match="got 2 seeds for 3 tasks"):
        engine(tiny).run(lambda t: EchoEnv(1), tasks(3), [0, 1])
