"""Tests for pipeline/envs/base.py: the shared dialog loop, with a toy domain.

The toy domain is a counter behind a few tools and an echoing user, so every branch of the loop
(tool calls, each kind of tool error, the user, the stop conditions) is exercised without the
retail domain's rules in the way. tests/envs/test_customer_service.py repeats the tool-error cases
against the real environment.
"""

from __future__ import annotations

import pytest

from pipeline.chat import MAX_CALLS_PER_MESSAGE, ToolCall, ToolError, format_tool_call, parse_tool_message
from pipeline.envs import Environment, Outcome, Step, Task, make_env
from pipeline.envs.base import (
    STOP_MAX_TOKENS,
    STOP_MAX_TURNS,
    STOP_RESOLVED,
    STOP_USER_LEFT,
    Tool,
    ToolEnvironment,
    collect_tools,
    episode_rng,
    tool,
)


class CounterTools:
    """A counter; the agent's goal is to bring it to the task's target."""

    def __init__(self) -> None:
        self.value = 0

    @tool()
    def read(self) -> int:
        """Read the counter."""
        return self.value

    @tool(mutates=True)
    def add(self, amount: int, note: str = "") -> int:
        """Add to the counter.

        Args:
            amount: How much to add.
            note: Why.
        """
        self.value += amount
        return self.value

    @tool()
    def explode(self) -> None:
        """A tool with a bug."""
        raise RuntimeError("boom")

    @tool()
    def refuse(self) -> None:
        """A tool that always refuses."""
        raise ToolError("not allowed")


class CounterEnv(ToolEnvironment):
    """The toy domain: the user says goodbye to "bye", crashes on "crash", and echoes anything else."""

    def _setup(self, task: Task, seed: int) -> list[dict]:
        self.counter = CounterTools()
        return [{"role": "user", "content": f"Please bring the counter to {task.payload['target']}."}]

    def _system_prompt(self) -> str:
        return "You run a counter."

    def _tools(self) -> dict[str, Tool]:
        return collect_tools(self.counter)

    def _on_message(self, text: str) -> tuple[list[dict], str | None]:
        if text == "crash":
            raise RuntimeError("simulator bug")
        if text == "bye":
            return [{"role": "user", "content": "Bye!"}], STOP_RESOLVED
        return [{"role": "user", "content": f"You said: {text}"}], None

    def _before_tool(self, call: ToolCall, spec: Tool, turn: int) -> None:
        if call.arguments.get("note") == "forbidden":
            raise ToolError("that note is against policy")

    def _judge(self, stop_reason: str | None) -> Outcome:
        return Outcome(
            success=self.counter.value == self.task.payload["target"],
            completed=stop_reason not in (None, STOP_MAX_TURNS, STOP_MAX_TOKENS),
            stop_reason=stop_reason,
        )


TASK = Task(id="toy-1", domain="toy", split="test", intents=["count"], payload={"target": 3})


@pytest.fixture
def env() -> CounterEnv:
    env = CounterEnv(max_turns=5)
    env.reset(TASK)
    return env


def only_tool_body(step: Step) -> dict:
    (message,) = step.messages
    assert message["role"] == "tool"
    return parse_tool_message(message)


# -- protocol and reset --------------------------------------------------------------------------
def test_environments_satisfy_the_protocol():
    """Both the toy env and the shipped customer-service env are `Environment`s; other objects are not."""
    assert isinstance(CounterEnv(), Environment)
    assert isinstance(make_env("customer_service"), Environment)
    assert not isinstance(object(), Environment)


def test_reset_gives_system_prompt_then_opening():
    env = CounterEnv()
    messages = env.reset(TASK)
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[0]["content"] == "You run a counter."
    assert "3" in messages[1]["content"]


def test_step_and_outcome_before_reset_do_not_crash_the_caller():
    """step() before reset() answers done with an explanation; outcome() says to call reset first."""
    env = CounterEnv()
    step = env.step("hello")
    assert step.done and step.messages == [] and "reset" in step.info["error"]
    with pytest.raises(RuntimeError, match="reset"):
        env.outcome()


def test_max_turns_must_be_positive():
    with pytest.raises(ValueError, match="max_turns"):
        CounterEnv(max_turns=0)


# -- the loop ------------------------------------------------------------------------------------
def test_plain_message_goes_to_the_user(env):
    step = env.step("hello")
    assert step.messages == [{"role": "user", "content": "You said: hello"}]
    assert not step.done
    assert step.info == {"turn": 0, "kind": "message", "stop_reason": None}


def test_tool_call_runs_the_tool_and_returns_a_tool_message(env):
    step = env.step(format_tool_call("add", {"amount": 3}))
    assert only_tool_body(step) == {"tool": "add", "ok": True, "result": 3}
    assert step.info["kind"] == "tool_calls"
    assert step.info["tool_calls"] == [{"name": "add", "arguments": {"amount": 3}}]
    assert step.info["tool_errors"] == []
    assert not step.done


def test_several_calls_in_one_message_each_get_a_tool_message(env):
    text = "".join(format_tool_call(name, args) for name, args in
                   [("add", {"amount": 1}), ("add", {"amount": 2}), ("read", {})])
    step = env.step(text)
    assert [parse_tool_message(m)["result"] for m in step.messages] == [1, 3, 3]


def test_a_full_episode_resolves_and_is_judged(env):
    env.step(format_tool_call("add", {"amount": 3}))
    step = env.step("bye")
    assert step.done and step.info["stop_reason"] == STOP_RESOLVED
    outcome = env.outcome()
    assert (outcome.success, outcome.completed, outcome.stop_reason) == (True, True, STOP_RESOLVED)


@pytest.mark.parametrize(
    "text, kind",
    [
        ('<tool_call>{"name": "read", "arguments": {}}', "malformed_tag"),
        ('<tool_call>{"name": "read", "arguments": {</tool_call>', "invalid_json"),
        ("<tool_call>[1, 2]</tool_call>", "invalid_call"),
        ('<tool_call>{"arguments": {}}</tool_call>', "invalid_call"),
        ('<tool_call>{"name": "read", "arguments": 5}</tool_call>', "invalid_call"),
        ('<tool_call>{"name": "read", "arguments": {}}</tool_call>' * (MAX_CALLS_PER_MESSAGE + 1), "too_many_calls"),
        ('<tool_call>{"name": "launch", "arguments": {}}</tool_call>', "unknown_tool"),
        ('<tool_call>{"name": "add", "arguments": {}}</tool_call>', "invalid_arguments"),
        ('<tool_call>{"name": "add", "arguments": {"amount": 1, "why": "x"}}</tool_call>', "invalid_arguments"),
        ('<tool_call>{"name": "add", "arguments": {"amount": "1"}}</tool_call>', "invalid_arguments"),
        ('<tool_call>{"name": "add", "arguments": {"amount": true}}</tool_call>', "invalid_arguments"),
        ('<tool_call>{"name": "add", "arguments": {"amount": 1.5}}</tool_call>', "invalid_arguments"),
        ('<tool_call>{"name": "explode", "arguments": {}}</tool_call>', "tool_exception"),
        ('<tool_call>{"name": "refuse", "arguments": {}}</tool_call>', "rejected"),
        ('<tool_call>{"name": "add", "arguments": {"amount": 1, "note": "forbidden"}}</tool_call>', "rejected"),
    ],
)
def test_bad_tool_calls_cost_a_turn_but_not_the_episode(env, text, kind):
    """Every kind of bad call becomes an ok=false tool message and an info record; the episode goes on."""
    step = env.step(text)
    body = only_tool_body(step)
    assert body["ok"] is False and body["error_type"] == kind and body["error"]
    assert [e["kind"] for e in step.info["tool_errors"]] == [kind]
    assert step.info["tool_calls"] == []
    assert not step.done
    assert env.counter.value == 0  # nothing ran
    assert env.step("still here").messages == [{"role": "user", "content": "You said: still here"}]


def test_a_broken_simulator_ends_the_episode_instead_of_raising(env):
    step = env.step("crash")
    assert step.done and step.info["stop_reason"] == STOP_USER_LEFT
    assert "RuntimeError" in step.info["simulator_error"]


def test_non_string_text_does_not_raise(env):
    """A policy that returns None (or a number) gets an answer, not an exception."""
    assert env.step(None).messages == [{"role": "user", "content": "You said: "}]
    assert env.step(42).messages == [{"role": "user", "content": "You said: 42"}]


# -- stop conditions -----------------------------------------------------------------------------
def test_turn_budget_ends_the_episode_as_incomplete():
    env = CounterEnv(max_turns=2)
    env.reset(TASK)
    assert not env.step("one").done
    step = env.step("two")
    assert step.done and step.info["stop_reason"] == STOP_MAX_TURNS
    outcome = env.outcome()
    assert (outcome.completed, outcome.stop_reason) == (False, STOP_MAX_TURNS)


def test_stepping_after_done_is_answered_not_raised():
    env = CounterEnv(max_turns=1)
    env.reset(TASK)
    env.step(format_tool_call("add", {"amount": 3}))
    step = env.step(format_tool_call("add", {"amount": 3}))
    assert step.done and step.messages == [] and "ended" in step.info["error"]
    assert env.counter.value == 3  # the late call did not run
    assert env.outcome().stop_reason == STOP_MAX_TURNS


def test_mark_truncated_stops_with_max_tokens_only_when_running(env):
    env.mark_truncated()
    assert env.done and env.outcome().stop_reason == STOP_MAX_TOKENS and not env.outcome().completed
    finished = CounterEnv()
    finished.reset(TASK)
    finished.step("bye")
    finished.mark_truncated()
    assert finished.outcome().stop_reason == STOP_RESOLVED


def test_reset_starts_a_fresh_episode(env):
    env.step(format_tool_call("add", {"amount": 2}))
    env.step("bye")
    env.reset(TASK)
    assert not env.done and env.turn == 0 and env.counter.value == 0
    assert not env.step("hi").done


# -- helpers -------------------------------------------------------------------------------------
def test_collect_tools_keeps_definition_order_and_flags():
    tools = collect_tools(CounterTools())
    assert list(tools) == ["read", "add", "explode", "refuse"]
    assert [t.mutates for t in tools.values()] == [False, True, False, False]
    params = tools["add"].schema["function"]["parameters"]
    assert params["properties"]["amount"]["type"] == "integer" and params["required"] == ["amount"]


def test_episode_rng_depends_only_on_task_seed_and_stream():
    draw = lambda *key: [episode_rng(*key).random() for _ in range(3)]  # noqa: E731
    assert draw("t", 0, "customer") == draw("t", 0, "customer")
    assert draw("t", 0, "customer") != draw("t", 1, "customer")
    assert draw("t", 0, "customer") != draw("u", 0, "customer")
    assert draw("t", 0, "customer") != draw("t", 0, "other")


def test_task_and_outcome_dict_round_trip():
    assert Task.from_dict(TASK.to_dict()) == TASK
    outcome = Outcome(True, True, "resolved", ["refund_limit@2"], {"x": 1}, {"state_diff": {}})
    assert Outcome.from_dict(outcome.to_dict()) == outcome
