"""Tests for rewards/judge.py: strict verdict parsing, the judge's prompt, and the judge inside a YAML reward."""

from __future__ import annotations

import pickle

import pytest

from pipeline.llm import ScriptedBackend
from rewards import build_reward
from rewards.judge import DEFAULT_RUBRIC, JudgeScorer, JudgeVerdictError, Verdict, parse_verdict

from .conftest import ORDER, assistant, call, chat, result, user

GOOD = '{"score": 5, "reason": "Verified the customer, refunded with consent, told the amount."}'


def refund_chat():
    return chat(user("My yoga mat arrived damaged, refund please."),
                assistant("Please give me your email and zip code to verify your identity."),
                user("omar@example.com, 92433"),
                assistant(call("get_order", order_id="W1000001")),
                result("get_order", ORDER),
                assistant("I can refund the yoga mat ($28.00) to your PayPal. Shall I go ahead?"))


@pytest.mark.parametrize("text, expected", [
    (GOOD, Verdict(5, "Verified the customer, refunded with consent, told the amount.")),
    ('\n  {"reason": "rude", "score": 1}\n', Verdict(1, "rude")),
])
def test_parse_accepts_exactly_the_format(text, expected):
    assert parse_verdict(text) == expected


@pytest.mark.parametrize("text, needle", [
    ("Score: 5", "not a JSON object"),
    ('```json\n{"score": 5, "reason": "x"}\n```', "not a JSON object"),  # fences are not the format
    ('The verdict: {"score": 5, "reason": "x"}', "not a JSON object"),  # no digging a number out of prose
    ('{"score": 5, "reason": "x"} Thanks!', "not a JSON object"),
    ('[5, "x"]', "must be a JSON object"),
    ('{"score": 5}', "exactly the keys"),
    ('{"score": 5, "reason": "x", "confidence": 0.9}', "exactly the keys"),
    ('{"score": "5", "reason": "x"}', "integer from 1 to 5"),
    ('{"score": 4.0, "reason": "x"}', "integer from 1 to 5"),
    ('{"score": true, "reason": "x"}', "integer from 1 to 5"),
    ('{"score": 6, "reason": "x"}', "integer from 1 to 5"),
    ('{"score": 0, "reason": "x"}', "integer from 1 to 5"),
    ('{"score": 3, "reason": "  "}', "non-empty string"),
])
def test_parse_rejects_everything_else(text, needle):
    with pytest.raises(JudgeVerdictError, match=needle):
        parse_verdict(text)


@pytest.mark.parametrize("score, value", [(1, -1.0), (2, -0.5), (3, 0.0), (4, 0.5), (5, 1.0)])
def test_scores_map_linearly_onto_minus_one_to_one(score, value):
    judge = JudgeScorer(ScriptedBackend([f'{{"score": {score}, "reason": "r"}}']))
    assert judge(refund_chat()).value == pytest.approx(value)


def test_custom_scale_and_rubric_file(tmp_path):
    rubric = tmp_path / "rubric.txt"
    rubric.write_text("Grade politeness only.")
    backend = ScriptedBackend(['{"score": 7, "reason": "polite"}'])
    judge = JudgeScorer(backend, rubric_file=str(rubric), min_score=0, max_score=10)
    assert judge(refund_chat()).value == pytest.approx(0.4)
    system = backend.prompts[0][0]["content"]
    assert system.startswith("Grade politeness only.") and "integer from 0 to 10" in system


def test_prompt_shows_the_conversation_without_system_prompt_and_with_compact_tools():
    backend = ScriptedBackend([GOOD])
    JudgeScorer(backend)(refund_chat())
    system, user_msg = backend.prompts[0]
    assert system["role"] == "system" and system["content"].startswith(DEFAULT_RUBRIC.splitlines()[0])
    text = user_msg["content"]
    assert "Refund limit $250" not in text  # the agent's system prompt is left out
    assert "CUSTOMER: My yoga mat arrived damaged" in text
    assert "TOOL RESULT: get_order ok: order_id=W1000001 status=delivered" in text
    assert text.rstrip().endswith("(JSON only):")


def test_bad_configuration_is_rejected():
    with pytest.raises(ValueError, match="either 'rubric' or 'rubric_file'"):
        JudgeScorer(ScriptedBackend([GOOD]), rubric="a", rubric_file="b")
    with pytest.raises(ValueError, match="rubric_file .* not found"):
        JudgeScorer(ScriptedBackend([GOOD]), rubric_file="/nonexistent/rubric.txt")
    with pytest.raises(ValueError, match="min_score < max_score"):
        JudgeScorer(ScriptedBackend([GOOD]), min_score=5, max_score=5)
    with pytest.raises(ValueError, match="unknown LLM backend spec"):
        JudgeScorer("claude")


def test_judge_in_a_yaml_reward_scores_and_an_unparseable_verdict_is_a_recorded_failure(monkeypatch):
    import pipeline.llm

    # The config names a Bedrock model; the test answers for it: a verdict, then free text.
    monkeypatch.setattr(pipeline.llm, "make_backend", lambda spec: ScriptedBackend([GOOD, "I'd say 5/5, great job!"]))
    reward = build_reward({"scorers": [
        {"scorer": "tool_format", "weight": 0.1},
        {"name": "judge", "scorer": "judge", "weight": 0.5, "params": {"backend": "bedrock:some-model"}},
    ]})
    ok = reward(refund_chat())
    assert ok.components["judge"] == 1.0 and ok.terminal == pytest.approx(0.5) and ok.ok
    assert ok.reasons["judge"] == ["judge 5/5: Verified the customer, refunded with consent, told the amount."]
    bad = reward(refund_chat())
    assert "judge" not in bad.components and bad.terminal == 0.0  # left out, not scored
    assert bad.failed["judge"].startswith("JudgeVerdictError: judge verdict is not a JSON object")
    assert reward.failures["judge"] == 1 and reward.metrics()["rewards/failures/judge"] == 1.0


def test_judge_pickles_as_its_backend_spec():
    judge = JudgeScorer("bedrock:anthropic.claude-3-haiku-20240307-v1:0", rubric="Be strict.")
    clone = pickle.loads(pickle.dumps(judge))
    assert clone.backend.model_id == "anthropic.claude-3-haiku-20240307-v1:0" and clone.rubric == "Be strict."
