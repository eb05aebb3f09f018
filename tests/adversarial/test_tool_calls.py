"""Hostile assistant messages against the tool-call protocol (pipeline/chat.py, pipeline/envs/base.py).

The promise under test (ARCHITECTURE.md): nothing a model writes escapes an episode. Whatever the text,
``Environment.step`` returns, the answer is a tool error or a plain message with a reason, the tools see
only arguments that passed the schema, and the environment's answer stays small. Each test plays the
text through a real environment: the retail domain, or a toy domain whose tools misbehave on purpose.
"""

from __future__ import annotations

import json
import time

import pytest

from pipeline.chat import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, ToolError, parse_tool_calls, parse_tool_message
from pipeline.envs import Outcome, Task, load_tasks, make_env
from pipeline.envs.base import STOP_RESOLVED, Tool, ToolEnvironment, collect_tools, tool


def call(body: str) -> str:
    return f"{TOOL_CALL_OPEN}{body}{TOOL_CALL_CLOSE}"


def tool_bodies(step) -> list[dict]:
    bodies = [parse_tool_message(m) for m in step.messages]
    assert all(b is not None for b in bodies), step.messages
    return bodies


# -- a toy domain with tools that misbehave --------------------------------------------------------
class HostileTools:
    """Tools whose results or errors are hard to send back, and one with a limit a NaN could dodge."""

    def __init__(self) -> None:
        self.refunded: list[float] = []

    @tool(mutates=True)
    def refund(self, amount: float) -> dict:
        """Refund an amount up to 100.

        Args:
            amount: The amount.
        """
        if amount > 100:
            raise ToolError("over the refund limit of 100")
        self.refunded.append(amount)
        return {"refunded": amount}

    @tool()
    def echo(self, text: str) -> str:
        """Return the text.

        Args:
            text: Any text.
        """
        return text

    @tool()
    def lookup(self, order_id: str) -> dict:
        """Look an order up; the refusal quotes the id.

        Args:
            order_id: The order id.
        """
        raise ToolError(f"no order {order_id}")

    @tool()
    def tags(self) -> set:
        """Return a set (not JSON)."""
        return {"a", "b"}

    @tool()
    def itself(self) -> dict:
        """Return a dict that contains itself."""
        loop: dict = {}
        loop["self"] = loop
        return loop

    @tool()
    def mixed_keys(self) -> dict:
        """Return a dict whose keys cannot be sorted."""
        return {1: "one", "two": 2}

    @tool()
    def shout(self, text: str) -> None:
        """Raise an exception quoting the text many times.

        Args:
            text: Any text.
        """
        raise RuntimeError(text * 1000)


class HostileEnv(ToolEnvironment):
    def _setup(self, task: Task, seed: int) -> list[dict]:
        self.tools = HostileTools()
        self.heard: list[str] = []
        return [{"role": "user", "content": "Hello."}]

    def _system_prompt(self) -> str:
        return "Toy domain."

    def _tools(self) -> dict[str, Tool]:
        return collect_tools(self.tools)

    def _on_message(self, text: str) -> tuple[list[dict], str | None]:
        self.heard.append(text)
        return [{"role": "user", "content": "ok"}], (STOP_RESOLVED if text == "bye" else None)

    def _judge(self, stop_reason: str | None) -> Outcome:
        return Outcome(success=False, completed=stop_reason is not None, stop_reason=stop_reason)


TOY = Task(id="toy", domain="toy", split="test", intents=["x"], payload={})


@pytest.fixture
def toy() -> HostileEnv:
    env = HostileEnv(max_turns=50)
    env.reset(TOY)
    return env


@pytest.fixture(scope="module")
def retail_task() -> Task:
    return load_tasks("customer_service", "test")[0]


@pytest.fixture
def retail(retail_task):
    env = make_env(retail_task)
    env.reset(retail_task)
    return env


# -- issue 21, finding 6: exceptions escape Environment.step ---------------------------------------
def test_a_thousand_nested_brackets_in_a_call_are_a_tool_error(retail):
    """``<tool_call>`` around 1,000 nested ``[`` used to raise RecursionError out of step()."""
    step = retail.step(call("[" * 1000 + "]" * 1000))
    (body,) = tool_bodies(step)
    assert body["ok"] is False and body["error_type"] == "invalid_json"
    assert "nested more than" in body["error"]
    assert not step.done


def test_a_5000_digit_integer_in_a_call_is_a_tool_error(retail):
    """A 5,000-digit integer used to raise Python's integer-conversion ValueError out of step()."""
    step = retail.step(call('{"name": "get_order", "arguments": {"order_id": ' + "9" * 5000 + "}}"))
    (body,) = tool_bodies(step)
    assert body["error_type"] == "invalid_json" and "5000 digits" in body["error"]


# -- issue 21, finding 7: quadratic parsing, and the size cap -------------------------------------
def test_88_kb_of_unclosed_tags_parse_at_once():
    """88 KB of unclosed ``<tool_call>`` took 6.2 s; a linear scan takes milliseconds."""
    text = TOOL_CALL_OPEN * 8000
    started = time.perf_counter()
    results = parse_tool_calls(text)
    elapsed = time.perf_counter() - started
    assert [r.kind for r in results] == ["malformed_tag"]
    assert elapsed < 0.5, f"{elapsed:.2f} s for {len(text)} characters"


def test_a_message_over_the_size_cap_is_answered_without_being_read(toy):
    """A 220 KB message (the size that made `score` take 212 s) gets one short tool error; nobody reads it."""
    text = call('{"name": "echo", "arguments": {"text": "hi"}}') + "x" * 220_000
    step = toy.step(text)
    (body,) = tool_bodies(step)
    assert body["error_type"] == "message_too_long"
    assert f"{len(text):,} characters" in body["error"] and "at most" in body["error"]
    assert toy.heard == [] and step.info["tool_calls"] == [] and not step.done
    assert len(step.messages[0]["content"]) < 500


def test_a_message_at_the_size_cap_is_read(toy):
    from pipeline.chat import MAX_MESSAGE_CHARS

    text = "y" * MAX_MESSAGE_CHARS
    toy.step(text)
    assert toy.heard == [text]
    toy.step(text + "y")
    assert toy.heard == [text]


# -- more hostile calls ----------------------------------------------------------------------------
@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e999", "-1e400"])
def test_non_finite_numbers_never_reach_a_tool(toy, number):
    """A NaN amount passes every ``amount > limit`` check, so it must be refused before the tool runs."""
    step = toy.step(call('{"name": "refund", "arguments": {"amount": ' + number + "}}"))
    (body,) = tool_bodies(step)
    assert body["error_type"] == "invalid_json"
    assert toy.tools.refunded == []


def test_a_duplicate_key_is_refused(toy):
    """Two "name" keys: which one a reader takes is parser-specific, so neither runs."""
    step = toy.step(call('{"name": "echo", "name": "refund", "arguments": {"amount": 5}}'))
    (body,) = tool_bodies(step)
    assert body["error_type"] == "invalid_json" and "appears twice" in body["error"]
    assert toy.tools.refunded == []


@pytest.mark.parametrize("key", ["__proto__", "constructor", "__class__", "self", "__init__", ""])
def test_prototype_style_argument_keys_are_unexpected_arguments(toy, key):
    step = toy.step(call(json.dumps({"name": "refund", "arguments": {"amount": 5, key: {"polluted": True}}})))
    (body,) = tool_bodies(step)
    assert body["error_type"] == "invalid_arguments" and "Unexpected argument" in body["error"]
    assert toy.tools.refunded == []


def test_an_extremely_long_tool_name_gets_a_short_answer(toy):
    name = "get_order_" * 5000
    step = toy.step(call(json.dumps({"name": name, "arguments": {}})))
    (body,) = tool_bodies(step)
    assert body["error_type"] == "invalid_call" and "too long" in body["error"]
    assert len(step.messages[0]["content"]) < 1000


def test_an_unknown_tool_name_is_quoted_clipped(toy):
    name = "x" * 120  # under the name limit, so it is looked up and is unknown
    step = toy.step(call(json.dumps({"name": name, "arguments": {}})))
    (body,) = tool_bodies(step)
    assert body["error_type"] == "unknown_tool" and "(120 characters)" in body["error"]
    assert len(body["tool"]) <= 64


def test_many_long_unexpected_arguments_are_listed_clipped(toy):
    arguments = {f"k{i}" + "z" * 1000: i for i in range(50)}
    step = toy.step(call(json.dumps({"name": "echo", "arguments": {"text": "a", **arguments}})))
    (body,) = tool_bodies(step)
    assert body["error_type"] == "invalid_arguments" and "and 45 more" in body["error"]
    assert len(step.messages[0]["content"]) < 2000


@pytest.mark.parametrize("method", ["tags", "itself", "mixed_keys"])
def test_a_tool_result_that_cannot_be_json_becomes_a_tool_error(toy, method):
    """A set, a dict holding itself, unsortable keys: json.dumps raises; the agent gets a tool error."""
    step = toy.step(call(json.dumps({"name": method, "arguments": {}})))
    (body,) = tool_bodies(step)
    assert body["error_type"] == "tool_exception" and "cannot be sent as JSON" in body["error"]
    assert step.info["tool_calls"] == [] and step.info["tool_errors"][0]["name"] == method


def test_a_tool_exception_with_a_huge_message_is_clipped(toy):
    step = toy.step(call(json.dumps({"name": "shout", "arguments": {"text": "boom " * 20}})))
    (body,) = tool_bodies(step)
    assert body["error_type"] == "tool_exception" and "characters)" in body["error"]
    assert len(step.messages[0]["content"]) < 1000


def test_a_refusal_that_quotes_a_huge_argument_is_clipped(toy):
    """A tool's refusal may quote the argument ("no order X"); a 60,000-character id is not sent back whole."""
    step = toy.step(call(json.dumps({"name": "lookup", "arguments": {"order_id": "W" * 60_000}})))
    (body,) = tool_bodies(step)
    assert body["error_type"] == "rejected" and body["error"].startswith("no order WWW")
    assert len(step.messages[0]["content"]) < 1500


def test_nul_bytes_and_lone_surrogates_go_through_and_the_episode_still_saves(toy, tmp_path):
    """Odd code points are text like any other: they reach the tool, and the trajectory still saves."""
    from pipeline.trajectory import Trajectory, Turn, load_jsonl, save_jsonl

    texts = [call('{"name": "echo", "arguments": {"text": "a\\u0000b\\ud800c"}}'), "\x00\udfff", "bye"]
    turns = [Turn(i, text, (step := toy.step(text)).messages, step.info) for i, text in enumerate(texts)]
    assert step.done
    body = parse_tool_message(turns[0].env_messages[0])
    assert body == {"tool": "echo", "ok": True, "result": "a\x00b\ud800c"}
    assert toy.heard == ["\x00\udfff", "bye"]
    save_jsonl([Trajectory("toy", [], turns, toy.outcome())], tmp_path / "t.jsonl")
    assert load_jsonl(tmp_path / "t.jsonl")[0].turns[1].assistant == "\x00\udfff"


def test_a_call_nested_in_a_call_is_explained(toy):
    step = toy.step(TOOL_CALL_OPEN + call('{"name": "echo", "arguments": {"text": "a"}}'))
    (body,) = tool_bodies(step)
    assert body["error_type"] == "invalid_json" and "cannot hold another" in body["error"]


def test_a_tool_call_tag_inside_a_json_string_is_just_text(toy):
    """The first closing tag ends the block, as before; a tag inside the JSON string is only text."""
    step = toy.step(call(json.dumps({"name": "echo", "arguments": {"text": "write <tool_call> like this"}})))
    (body,) = tool_bodies(step)
    assert body == {"tool": "echo", "ok": True, "result": "write <tool_call> like this"}


def test_deep_double_encoded_arguments_are_not_decoded(toy):
    arguments = "[" * 5000 + "]" * 5000
    step = toy.step(call(json.dumps({"name": "echo", "arguments": arguments})))
    (body,) = tool_bodies(step)
    assert body["error_type"] == "invalid_call" and "must be a JSON object" in body["error"]


def test_a_policy_reply_that_is_not_text_does_not_end_the_rollout(toy):
    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("no")

    step = toy.step(Unprintable())
    assert step.messages == [{"role": "user", "content": "ok"}] and "Unprintable" in toy.heard[0]


def test_a_str_subclass_is_read_as_its_plain_text(toy):
    """A reply object cannot hide its markup behind overridden string methods."""

    class Sneaky(str):
        def __contains__(self, item):
            return False

        def find(self, *args):
            return -1

    step = toy.step(Sneaky(call('{"name": "refund", "arguments": {"amount": 5}}')))
    assert tool_bodies(step)[0]["ok"] is True and toy.tools.refunded == [5]


def test_a_tool_message_nested_too_deeply_to_decode_is_not_a_tool_message():
    """Logged tool messages are read back by rewards and reports; a hostile one must not raise."""
    assert parse_tool_message({"role": "tool", "content": "[" * 100_000}) is None
    assert parse_tool_message({"role": "tool", "content": "1" * 5000}) is None
    assert parse_tool_message({"role": "tool", "content": ["not", "text"]}) is None
