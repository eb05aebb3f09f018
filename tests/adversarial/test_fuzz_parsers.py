"""Fuzzing the parsers that read what a model writes: tool calls and tagged blocks (pipeline/chat.py).

Two properties, on inputs a hostile or broken model could write:

1. **Nothing escapes.** 10,500 seeded random and mutated messages (truncations, duplicated and nested
   tags, deep nesting, huge numbers, NaN, odd unicode, NUL bytes, lone surrogates, spliced fragments)
   go through ``parse_tool_calls``, ``scan_tagged`` for both the tool-call and the final-output tags,
   ``first_json_object`` (what the SOP final-output parser decodes with) and an environment's
   ``step``. None may raise, every result must be well-formed, and the scanner must agree with the
   non-greedy regex it replaces (on inputs small enough for the regex to be quick).
2. **Time is linear.** For several adversarial shapes, doubling the input must about double the
   work. The scanner's work is counted exactly (characters searched), so that check is immune to a
   busy machine; the full parsers are timed in CPU time, and the ratio's median over repeats must stay
   under 3, which a quadratic parser (ratio about 4) exceeds.
"""

from __future__ import annotations

import json
import random
import re
import statistics
import time

import pytest

from pipeline.chat import (
    MAX_CALLS_PER_MESSAGE,
    MAX_JSON_DEPTH,
    MAX_TOOL_NAME_CHARS,
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    ToolCall,
    ToolCallError,
    first_json_object,
    json_depth,
    loads_untrusted,
    parse_tool_calls,
    scan_tagged,
)
from pipeline.envs import Outcome, Task
from pipeline.envs.base import Tool, ToolEnvironment, collect_tools, tool

FINAL_OPEN, FINAL_CLOSE = "<final_output>", "</final_output>"
TAGS = [(TOOL_CALL_OPEN, TOOL_CALL_CLOSE), (FINAL_OPEN, FINAL_CLOSE)]
KINDS = {"malformed_tag", "invalid_json", "invalid_call", "too_many_calls"}
N_INPUTS = 10_500
SEED = 20_240_621

ODD = ["\x00", "\ud800", "\udfff", "\ufeff", "\u202e", "\u2028", "\u0301", "\U0001f600", "\uffff", "\x1b[31m", "\\",
       "\\u0000", "\\ud800", '\\"', "\r\n", "\t"]
NUMBERS = ["NaN", "Infinity", "-Infinity", "1e999", "-0", "9" * 5000, "1" * 4301, "0." + "0" * 400 + "1", "1E-400",
           "12.50", "-" + "9" * 120, "0x10", "1_000", "+1"]
FRAGMENTS = [TOOL_CALL_OPEN, TOOL_CALL_CLOSE, FINAL_OPEN, FINAL_CLOSE, "<tool_call", "tool_call>", "</tool_", "{", "}",
             "[", "]", '"', ":", ",", '"name"', '"arguments"', "{}", "null", "true", "```json", "```"]


def valid_call(rng: random.Random) -> str:
    name = rng.choice(["get_order", "refund", "echo", "list_orders", "x" * rng.randint(1, 200), "", "ünïcode"])
    arguments = {rng.choice(["order_id", "amount", "text", "__proto__", "a" * 50]): rng.choice(
        ["W1000001", 12.5, -3, None, True, [1, [2, [3]]], {"k": {"k": {}}}, "\u202e", ""]) for _ in range(rng.randint(0, 4))}
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=rng.random() < 0.5)
    if rng.random() < 0.1:
        body = json.dumps({"name": name, "arguments": json.dumps(arguments)})  # double-encoded
    return TOOL_CALL_OPEN + body + TOOL_CALL_CLOSE


def mutate(text: str, rng: random.Random) -> str:
    kind = rng.randrange(13)
    i, j = sorted(rng.randint(0, len(text)) for _ in range(2))
    if kind == 0:  # truncate
        return text[:i]
    if kind == 1:  # duplicate a span
        return text[:j] + text[i:j] * rng.randint(1, 5) + text[j:]
    if kind == 2:  # delete a span
        return text[:i] + text[j:]
    if kind == 3:  # insert a tag or fragment
        return text[:i] + rng.choice(FRAGMENTS) + text[i:]
    if kind == 4:  # nest: wrap in more tags
        return TOOL_CALL_OPEN * rng.randint(1, 3) + text + TOOL_CALL_CLOSE * rng.randint(0, 3)
    if kind == 5:  # deep nesting inside the body
        depth = rng.choice([MAX_JSON_DEPTH, MAX_JSON_DEPTH + 1, 200, 1000, 5000])
        opener = rng.choice(["[", '{"a":', '{"arguments":'])
        closer = {"[": "]", '{"a":': "}", '{"arguments":': "}"}[opener]
        return text[:i] + opener * depth + "1" + closer * rng.choice([0, depth]) + text[i:]
    if kind == 6:  # a hostile number
        return text[:i] + rng.choice(NUMBERS) + text[i:]
    if kind == 7:  # odd code points
        return "".join(c + (rng.choice(ODD) if rng.random() < 0.05 else "") for c in text)
    if kind == 8:  # flip characters
        chars = list(text)
        for _ in range(rng.randint(1, 4)):
            if chars:
                chars[rng.randrange(len(chars))] = chr(rng.choice([0, 0x22, 0x5C, 0x7B, 0x7D, 0xD800, rng.randrange(0x110000)]))
        return "".join(chars)
    if kind == 9:  # many calls
        return text * rng.randint(2, MAX_CALLS_PER_MESSAGE + 3)
    if kind == 10:  # splice two texts
        return text[:i] + valid_call(rng)[j % 40:]
    if kind == 11:  # a duplicate key
        return text.replace('"name"', '"name": "get_order", "name"', 1)
    return rng.choice(["", " ", TOOL_CALL_CLOSE + text, text + TOOL_CALL_OPEN, "".join(rng.choice(FRAGMENTS) for _ in range(30))])


def random_text(rng: random.Random) -> str:
    """Pure noise: random code points (surrogates and NULs included) and fragments."""
    parts = []
    for _ in range(rng.randint(0, 40)):
        r = rng.random()
        if r < 0.3:
            parts.append(rng.choice(FRAGMENTS))
        elif r < 0.5:
            parts.append(rng.choice(ODD + NUMBERS))
        else:
            parts.append("".join(chr(rng.randrange(0x110000)) for _ in range(rng.randint(1, 8))))
    return "".join(parts)


def inputs(n: int, seed: int = SEED):
    rng = random.Random(seed)
    for k in range(n):
        if k % 4 == 0:
            yield random_text(rng)
        else:
            text = valid_call(rng)
            for _ in range(rng.randint(1, 3)):
                text = mutate(text, rng)
            yield text


def reference_scan(text: str, open_tag: str, close_tag: str) -> tuple[list[str], bool]:
    """The non-greedy regex the scanner replaces (quadratic on hostile input, exact on small input)."""
    pattern = re.compile(re.escape(open_tag) + r"(.*?)" + re.escape(close_tag), re.DOTALL)
    rest = pattern.sub("\uffff", text)  # a separator that cannot splice two tag fragments into a tag
    return pattern.findall(text), open_tag in rest or close_tag in rest


def check_results(text: str, results: list) -> None:
    assert isinstance(results, list) and len(results) <= MAX_CALLS_PER_MESSAGE + 1
    for r in results:
        if isinstance(r, ToolCall):
            assert isinstance(r.name, str) and 0 < len(r.name) <= MAX_TOOL_NAME_CHARS
            assert isinstance(r.arguments, dict)
            json.dumps(r.arguments, allow_nan=False)  # no NaN or Infinity reaches a tool
            assert json_depth(r.arguments) < MAX_JSON_DEPTH
        else:
            assert isinstance(r, ToolCallError) and r.kind in KINDS
            assert isinstance(r.message, str) and 0 < len(r.message) < 1000  # bounded echo


# -- 1. nothing escapes --------------------------------------------------------------------------
def test_fuzzed_messages_never_escape_the_parsers():
    started = time.perf_counter()
    count = 0
    for text in inputs(N_INPUTS):
        count += 1
        try:
            check_results(text, parse_tool_calls(text))
            for open_tag, close_tag in TAGS:
                blocks = scan_tagged(text, open_tag, close_tag)
                assert all(close_tag not in body for body in blocks.bodies)
                if len(text) <= 4000:
                    assert (blocks.bodies, blocks.unbalanced) == reference_scan(text, open_tag, close_tag)
            for body in scan_tagged(text, FINAL_OPEN, FINAL_CLOSE).bodies or [text]:
                value, why = first_json_object(body)
                assert (isinstance(value, dict) and why is None) or (value is None and isinstance(why, str))
            value, why = loads_untrusted(text[text.find("{"):] if "{" in text else text)
            assert why is None or value is None
        except AssertionError:
            raise AssertionError(f"input #{count} failed: {text[:300]!r}") from None
        except Exception as exc:  # noqa: BLE001 - the point of the test
            raise AssertionError(f"input #{count} raised {type(exc).__name__}: {exc}; input {text[:300]!r}") from exc
    elapsed = time.perf_counter() - started
    assert count == N_INPUTS >= 10_000
    assert elapsed < 60, f"{count} inputs took {elapsed:.1f} s"


class EchoTools:
    @tool()
    def get_order(self, order_id: str) -> dict:
        """Look an order up.

        Args:
            order_id: The order id.
        """
        return {"order_id": order_id}

    @tool()
    def refund(self, amount: float) -> float:
        """Refund.

        Args:
            amount: The amount.
        """
        return amount


class EchoEnv(ToolEnvironment):
    def _setup(self, task, seed):
        self.tools = EchoTools()
        return []

    def _system_prompt(self):
        return ""

    def _tools(self) -> dict[str, Tool]:
        return collect_tools(self.tools)

    def _on_message(self, text):
        return [{"role": "user", "content": "ok"}], None

    def _judge(self, stop_reason):
        return Outcome(False, False, stop_reason)


def test_fuzzed_messages_never_escape_an_environment_step():
    """The same inputs, through the dialog loop: step() always answers with JSON-safe, bounded messages."""
    env = EchoEnv(max_turns=10**9)
    env.reset(Task("fuzz", "toy", "test", [], {}))
    for count, text in enumerate(inputs(1_000, seed=SEED + 1), start=1):
        try:
            step = env.step(text)
            assert not step.done
            for message in step.messages:
                assert message["role"] in ("tool", "user") and len(message["content"]) < 70_000
            json.dumps(step.info)
        except Exception as exc:  # noqa: BLE001 - the point of the test
            raise AssertionError(f"input #{count} raised {type(exc).__name__}: {exc}; input {text[:300]!r}") from exc


# -- 2. linear time --------------------------------------------------------------------------------
class CountingText(str):
    """A string that counts the characters its ``find`` searches: the scanner's work, without a clock."""

    searched = 0

    def find(self, sub, start=0, end=None):  # type: ignore[override]
        end = len(self) if end is None else end
        found = str.find(self, sub, start, end)
        CountingText.searched += (found + len(sub) if found >= 0 else end) - start
        return found


def body(n: int, unit: str) -> str:
    return unit * (n // len(unit))


#: Adversarial shapes of about n characters each.
SHAPES = {
    "unclosed_open_tags": lambda n: body(n, TOOL_CALL_OPEN),
    "close_tags_only": lambda n: body(n, TOOL_CALL_CLOSE),
    "nested_open_open_close": lambda n: body(n, TOOL_CALL_OPEN + TOOL_CALL_OPEN + "x" + TOOL_CALL_CLOSE),
    "tag_prefixes": lambda n: body(n, "<tool_call"),
    "open_then_close_prefixes": lambda n: TOOL_CALL_OPEN + body(n, "</tool_call"),
    "unclosed_final_output": lambda n: body(n, FINAL_OPEN),
    "long_unterminated_json": lambda n: TOOL_CALL_OPEN + '{"name": "a", "arguments": {"x": [' + body(n, "1, ") + TOOL_CALL_CLOSE,
    "deep_brackets": lambda n: TOOL_CALL_OPEN + body(n, "[") + TOOL_CALL_CLOSE,
    "many_braces": lambda n: FINAL_OPEN + body(n, "{") + FINAL_CLOSE,
    "braces_and_quotes": lambda n: FINAL_OPEN + body(n, '{"{') + FINAL_CLOSE,
    "unclosed_objects": lambda n: FINAL_OPEN + body(n, '{"a": 1, ') + FINAL_CLOSE,
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_scanner_work_doubles_when_the_input_doubles(shape):
    """Exact work: characters searched at N and 2N. Linear gives 2; the old regex gave about 4."""
    work = []
    for n in (20_000, 40_000):
        text = CountingText(SHAPES[shape](n))
        for open_tag, close_tag in TAGS:
            CountingText.searched = 0
            scan_tagged(text, open_tag, close_tag)
            # Every character is searched at least once; less means the scanner no longer reads through
            # ``find`` and this count measures nothing (then count its work some other way).
            assert CountingText.searched >= 0.9 * len(text), f"{shape}: only {CountingText.searched} counted"
            work.append(CountingText.searched)
    for at_n, at_2n in ((work[0], work[2]), (work[1], work[3])):
        assert at_2n / at_n < 2.2, f"{shape}: work {at_n} at N, {at_2n} at 2N"


def cpu_seconds(fn, text: str) -> float:
    started = time.process_time()
    fn(text)
    return time.process_time() - started


def final_output(text: str):
    """What the SOP final-output parser does with the scanner: the first block's first JSON object."""
    bodies = scan_tagged(text, FINAL_OPEN, FINAL_CLOSE).bodies
    return first_json_object(bodies[0]) if bodies else None


def doubling_ratio(fn, make, n: int, repeats: int = 5) -> float:
    small, large = make(n), make(2 * n)
    fn(small), fn(large)  # warm up
    ratios = []
    for _ in range(repeats):
        # Repeat each measurement until it lasts long enough for the clock to resolve it.
        reps, t_small = 1, cpu_seconds(fn, small)
        while t_small < 0.002 and reps < 1024:
            reps *= 2
            t_small = sum(cpu_seconds(fn, small) for _ in range(reps))
        t_large = sum(cpu_seconds(fn, large) for _ in range(reps))
        ratios.append(t_large / max(t_small, 1e-9))
    return statistics.median(ratios)


@pytest.mark.parametrize("parser", ["parse_tool_calls", "final_output"])
def test_parsing_time_doubles_when_the_input_doubles(parser):
    """CPU time at 2N over N (40,000 and 80,000 characters), median of 5 repeats, for every shape: under 3 (a
    quadratic parser gives about 4)."""
    fn = {"parse_tool_calls": parse_tool_calls, "final_output": final_output}[parser]
    ratios = {shape: doubling_ratio(fn, make, 40_000) for shape, make in SHAPES.items()}
    slow = {shape: round(r, 2) for shape, r in ratios.items() if r >= 3.0}
    assert not slow, f"{parser}: doubling ratios {ratios}"
