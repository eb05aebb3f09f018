"""Tests for pipeline/native_tools.py and native tool calling in the rollout engine and SFT.

Two tiny models whose chat templates support tools (a Qwen2.5-style and a Llama-3.1-style template, shipped
as strings in tests/native_templates.py): the template's format is detected, the model's calls are parsed
in that format, the trained ids are the sampled ids, environment tokens are masked out, and a malformed
native call comes back as a tool error. Shrunk settings: byte-level tokenizers, two-layer random models,
one customer-service task; the "model" is mostly a scripted backend that samples given token ids.
"""

from __future__ import annotations

import json

import pytest

from pipeline.chat import ToolCall
from pipeline.envs import load_tasks, make_env
from pipeline.native_tools import (
    TEXT,
    Llama3JsonFormat,
    HermesFormat,
    detect_tool_format,
    resolve_tool_format,
    template_messages,
)
from pipeline.rollout import RolloutEngine
from pipeline.rollout.backends import Generation
from pipeline.sft import oracle_demonstrations, tokenize_demonstration
from pipeline.templates import ChatTemplate
from tests.native_templates import FAMILIES, build_model_dir, build_tokenizer

TEXT_PROTOCOL_LINE = "To call a tool, reply with only a tool call"


class IdsBackend:
    """A generation backend that "samples" the given token-id lists in order (each ends with a stop token)."""

    def __init__(self, samples):
        self.samples = [list(s) for s in samples]

    def generate(self, requests):
        out = []
        for _ in requests:
            ids = self.samples.pop(0)
            out.append(Generation(token_ids=ids, logprobs=[-0.5] * len(ids), truncated=False))
        return out

    def release(self, key):
        pass


def assistant_runs(ids, mask):
    """The contiguous runs of assistant tokens: what the model sampled, turn by turn."""
    runs, current = [], []
    for token, on in zip(ids, mask):
        if on:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


@pytest.fixture(scope="module")
def task():
    return load_tasks("customer_service", "train")[0]


@pytest.fixture(scope="module")
def native_demo(task):
    (demo,) = oracle_demonstrations([task], n=1, tool_protocol="native")
    return demo


# -- detection and parsing -------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_the_templates_native_format_is_detected(family):
    assert detect_tool_format(build_tokenizer(family)).name == FAMILIES[family]["parser"]


def test_a_template_without_tool_support_keeps_the_text_protocol(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)  # ChatML without tools, like SmolLM2's
    assert detect_tool_format(tokenizer) is None
    assert resolve_tool_format(tokenizer, "auto") is TEXT
    with pytest.raises(ValueError, match="tool_calling='native' needs a chat template with tool support"):
        resolve_tool_format(tokenizer, "native")
    assert resolve_tool_format(build_tokenizer("qwen2.5"), "text") is TEXT


@pytest.mark.parametrize("text, content, calls, attempted", [
    ('<tool_call>\n{"name": "get_order", "arguments": {"order_id": "W1"}}\n</tool_call>', "",
     [ToolCall("get_order", {"order_id": "W1"})], True),
    ('Let me look.\n<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "b", '
     '"arguments": {"x": 1}}\n</tool_call>', "Let me look.", [ToolCall("a", {}), ToolCall("b", {"x": 1})], True),
    ("Your order has shipped.", "Your order has shipped.", None, False),
    ('<tool_call>\n{"name": "get_order", "arguments": {"order_id": }\n</tool_call>', None, None, True),
    ('<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call> and then some text', None, None, True),
    ('<tool_call>{"name": "a"', None, None, True),
])
def test_hermes_parsing(text, content, calls, attempted):
    reply = HermesFormat().parse(text)
    assert (reply.calls, reply.attempted) == (calls, attempted)
    if content is not None:
        assert reply.content == content


@pytest.mark.parametrize("text, calls, attempted", [
    ('{"name": "get_order", "parameters": {"order_id": "W1"}}', [ToolCall("get_order", {"order_id": "W1"})], True),
    ('<|python_tag|>{"name": "a", "arguments": {}}', [ToolCall("a", {})], True),
    ('{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"x": 1}}', [ToolCall("a", {}), ToolCall("b", {"x": 1})],
     True),
    ("Your order has shipped.", None, False),
    ('{"name": "get_order", "parameters": {"order_id": ', None, True),
    ('{"name": "get_order"}', None, True),
    ('{"name": "a", "parameters": {}} trailing words', None, True),
    ('{"name": "a", "parameters": {"amount": NaN}}', None, True),
])
def test_llama3_json_parsing(text, calls, attempted):
    reply = Llama3JsonFormat().parse(text)
    assert (reply.calls, reply.attempted) == (calls, attempted)


def test_a_malformed_llama_call_reaches_the_environment_as_a_call_it_answers_with_an_error(task):
    fmt = Llama3JsonFormat()
    text = '{"name": "get_order", "parameters": {"order_id": '
    env = make_env(task)
    env.reset(task)
    step = env.step(fmt.environment_text(text, fmt.parse(text)))
    assert step.info["kind"] == "tool_calls" and step.info["tool_errors"][0]["kind"] == "invalid_json"
    assert [m["role"] for m in step.messages] == ["tool"]


def test_template_messages_turn_canonical_calls_into_tool_calls_answered_by_id():
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                {"role": "assistant", "content": 'Checking.\n<tool_call>{"name": "a", "arguments": {"x": 1}}</tool_call>'},
                {"role": "tool", "content": '{"ok": true, "result": 1, "tool": "a"}'},
                {"role": "assistant", "content": "<tool_call>{'name': 'a'}</tool_call>"},  # malformed: kept as text
                {"role": "tool", "content": '{"error": "bad", "error_type": "invalid_json", "ok": false, "tool": null}'},
                {"role": "assistant", "content": "Done."}]
    hermes = template_messages(messages, HermesFormat())
    assert hermes[2] == {"role": "assistant", "content": "Checking.", "tool_calls": [
        {"id": "call_0_0", "type": "function", "function": {"name": "a", "arguments": {"x": 1}}}]}
    assert hermes[3]["tool_call_id"] == "call_0_0" and hermes[3]["content"] == messages[3]["content"]
    assert hermes[4:] == messages[4:]
    # Llama's template writes no text beside a call: that message stays text.
    assert template_messages(messages, Llama3JsonFormat())[2] == messages[2]
    assert template_messages(messages, TEXT) == messages


# -- the rollout engine and SFT, natively ----------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_native_rollout_trains_the_sampled_ids_and_sft_builds_the_same_sequence(family, task, native_demo):
    """The oracle's episode, written by the model in the template's own format: SFT's sequence of it, and a
    rollout whose backend samples exactly SFT's assistant tokens. The rollout solves the task (the calls were
    parsed in the template's format), its trained ids are its sampled ids, the two sequences are equal, the
    tools are rendered by the template (not turnwise's prompt) and the calls as the template writes them."""
    tokenizer = build_tokenizer(family)
    template = ChatTemplate(tokenizer)
    assert template.native and TEXT_PROTOCOL_LINE not in native_demo.messages[0]["content"]
    sft = tokenize_demonstration(native_demo.messages, tokenizer, native_demo.metadata["tools"], template)
    samples = assistant_runs(sft["input_ids"], sft["assistant_masks"])
    assert len(samples) == len(native_demo.turns)

    engine = RolloutEngine(IdsBackend(samples), tokenizer, max_new_tokens=10_000, max_total_tokens=100_000)
    (rollout,) = engine.run(lambda t: make_env(t), [task], [native_demo.seed])
    assert rollout.outcome.success and rollout.messages == native_demo.messages
    data = rollout.tokens
    for turn, (start, end), sample in zip(rollout.turns, data.turn_spans, samples):
        assert data.input_ids[start:end] == turn.completion_ids == sample
        assert data.logprobs[start:end] == [-0.5] * len(sample)
    assert data.input_ids == sft["input_ids"] and data.assistant_mask == sft["assistant_masks"]

    text = tokenizer.decode(data.input_ids)
    call = {"hermes": '<tool_call>\n{"name": "verify_identity", "arguments": {"email": ',
            "llama3_json": '{"name": "verify_identity", "parameters": {"email": '}[FAMILIES[family]["parser"]]
    result = {"hermes": "<tool_response>\n{", "llama3_json": "<|start_header_id|>ipython<|end_header_id|>\n\n{"}
    assert call in text and result[FAMILIES[family]["parser"]] in text
    prompt = tokenizer.decode(data.input_ids[: data.turn_spans[0][0]])
    assert "Get an order's details" in prompt  # the tool specs, rendered by the template
    assert TEXT_PROTOCOL_LINE not in text and "<tool_call>{" not in text  # not turnwise's text protocol


@pytest.mark.parametrize("family, malformed", [
    ("qwen2.5", '<tool_call>\n{"name": "verify_identity", "arguments": {"email": }\n</tool_call>'),
    ("llama3.1", '{"name": "verify_identity", "parameters": {"email": '),
])
def test_a_malformed_native_call_becomes_a_tool_error(family, malformed, task):
    tokenizer = build_tokenizer(family)
    eos = tokenizer.eos_token_id
    bad = tokenizer(malformed, add_special_tokens=False)["input_ids"] + [eos]
    goodbye = tokenizer("Thank you, goodbye.", add_special_tokens=False)["input_ids"] + [eos]
    engine = RolloutEngine(IdsBackend([bad, goodbye]), tokenizer, max_new_tokens=10_000, max_total_tokens=100_000)
    (rollout,) = engine.run(lambda t: make_env(t, max_turns=2), [task], [0])
    first = rollout.turns[0]
    assert first.info["kind"] == "tool_calls" and [e["kind"] for e in first.info["tool_errors"]] == ["invalid_json"]
    assert [m["role"] for m in first.env_messages] == ["tool"]
    body = json.loads(first.env_messages[0]["content"])
    assert body["ok"] is False and body["error_type"] == "invalid_json"
    data = rollout.tokens
    (s0, e0), (s1, _) = data.turn_spans
    assert data.input_ids[s0:e0] == bad and data.assistant_mask[e0:s1] == [0] * (s1 - e0)
    between = tokenizer.decode(data.input_ids[e0:s1])
    assert body["error"] in json.loads(between[between.index("{"):between.rindex("}") + 1])["error"]
    assert ("<tool_response>" if family == "qwen2.5" else "ipython") in between


def test_native_rollout_with_a_sampling_model_keeps_the_sampled_ids(tmp_path, task):
    """A random model samples whatever it samples; natively too, each span holds exactly the sampled ids and the
    mask marks exactly those spans."""
    from pipeline.models import load_model
    from pipeline.rollout.backends.hf import HFBackend

    model, tokenizer = load_model(str(build_model_dir("qwen2.5", tmp_path / "qwen")))
    engine = RolloutEngine(HFBackend(model, tokenizer, temperature=1.0, seed=0), tokenizer, max_new_tokens=16,
                           max_total_tokens=100_000)
    assert engine.template.native
    (rollout,) = engine.run(lambda t: make_env(t, max_turns=3), [task], [0])
    data = rollout.tokens
    on = set()
    for turn, (start, end) in zip(rollout.turns, data.turn_spans):
        assert data.input_ids[start:end] == turn.completion_ids
        on.update(range(start, end))
    assert [i for i, m in enumerate(data.assistant_mask) if m] == sorted(on)


def test_a_template_that_trims_the_assistants_text_keeps_the_sampled_ids(task):
    """Llama 3.1's template strips whitespace around a message. A sampled reply that ends in a space still keeps
    its sampled ids (the engine no longer refuses the template), and SFT of the same conversation builds the
    same sequence."""
    tokenizer = build_tokenizer("llama3.1")
    eos = tokenizer.eos_token_id
    texts = ["  Could you share your email and zip code? ", "Thank you, goodbye. "]
    samples = [tokenizer(t, add_special_tokens=False)["input_ids"] + [eos] for t in texts]
    engine = RolloutEngine(IdsBackend(samples), tokenizer, max_new_tokens=10_000, max_total_tokens=100_000)
    (rollout,) = engine.run(lambda t: make_env(t, max_turns=2), [task], [0])
    data = rollout.tokens
    assert [data.input_ids[s:e] for s, e in data.turn_spans] == samples
    (s0, e0), (s1, _) = data.turn_spans
    assert tokenizer.decode(data.input_ids[e0:s1]).startswith("<|start_header_id|>user<|end_header_id|>\n\n")
    env = make_env(task)
    env.set_tool_protocol("native")
    env.reset(task)
    sft = tokenize_demonstration(rollout.messages, tokenizer, env.tool_schemas, ChatTemplate(tokenizer))
    assert sft["input_ids"] == data.input_ids[: len(sft["input_ids"])]
    assert assistant_runs(sft["input_ids"], sft["assistant_masks"]) == samples


def test_an_environment_that_speaks_only_the_text_protocol(tmp_path):
    """With tool_calling='auto', an environment without set_tool_protocol (any Environment-protocol object) plays
    in the text protocol, even on a template with tool support; 'native' says why it cannot."""
    from tests.rollout.envs_for_tests import EchoEnv, tasks

    tokenizer = build_tokenizer("qwen2.5")
    hello = tokenizer("hi", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    engine = RolloutEngine(IdsBackend([hello, hello]), tokenizer, max_new_tokens=100)
    (rollout,) = engine.run(lambda t: EchoEnv(2), tasks(1))
    assert rollout.turns[1].assistant == "hi" and "# Tools" not in tokenizer.decode(rollout.tokens.input_ids)
    strict = RolloutEngine(IdsBackend([hello]), tokenizer, max_new_tokens=100, tool_calling="native")
    with pytest.raises(TypeError, match="EchoEnv cannot leave its tool instructions to the chat template"):
        strict.run(lambda t: EchoEnv(1), tasks(1))
