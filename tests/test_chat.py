"""Tests for pipeline/chat.py: the tool-call protocol, argument checking and tool messages."""

from __future__ import annotations

import json

import pytest

from pipeline.chat import (
    MAX_CALLS_PER_MESSAGE,
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    ToolCall,
    ToolCallError,
    format_tool_call,
    has_tool_call_markup,
    parse_tool_calls,
    parse_tool_message,
    tool_error_message,
    tool_result_message,
    tools_prompt,
    validate_arguments,
)


def call(body: str) -> str:
    return f"{TOOL_CALL_OPEN}{body}{TOOL_CALL_CLOSE}"


SCHEMA = {
    "type": "function",
    "function": {
        "name": "refund",
        "description": "Refund items.",
        "parameters": {
            "type": "object",
            "properties": {
                "order_id": {"type": "string"},
                "item_ids": {"type": "array", "items": {"type": "string"}},
                "reason": {"type": "string", "enum": ["damaged", "return"]},
                "count": {"type": "integer"},
                "amount": {"type": "number"},
                "note": {"type": "string", "nullable": True},
            },
            "required": ["order_id", "reason"],
        },
    },
}


# -- parse_tool_calls ----------------------------------------------------------------------------
def test_plain_text_has_no_calls():
    """A message without markup is a message to the customer, not a call."""
    assert parse_tool_calls("Hello, how can I help you today?") == []
    assert not has_tool_call_markup("Hello")


def test_one_call_with_surrounding_text():
    """A well-formed block parses into name and arguments, whatever text is around it."""
    text = 'Let me check. <tool_call>{"name": "get_order", "arguments": {"order_id": "W1"}}</tool_call> thanks'
    assert parse_tool_calls(text) == [ToolCall("get_order", {"order_id": "W1"})]


def test_several_calls_keep_their_order():
    """Several blocks come back in the order written, with a multi-line body allowed."""
    text = call('{"name": "a", "arguments": {}}') + "\n" + call('{\n "name": "b",\n "arguments": {"x": 1}\n}')
    assert parse_tool_calls(text) == [ToolCall("a", {}), ToolCall("b", {"x": 1})]


def test_missing_arguments_default_to_empty():
    assert parse_tool_calls(call('{"name": "list"}')) == [ToolCall("list", {})]


def test_double_encoded_arguments_are_decoded():
    """Some models write the arguments object as a JSON string; it is accepted."""
    text = call(json.dumps({"name": "get_order", "arguments": json.dumps({"order_id": "W1"})}))
    assert parse_tool_calls(text) == [ToolCall("get_order", {"order_id": "W1"})]


def test_format_tool_call_round_trips():
    """What format_tool_call writes is exactly what parse_tool_calls reads back."""
    args = {"order_id": "W1", "item_ids": ["I1", "I2"], "reason": "damaged"}
    assert parse_tool_calls(format_tool_call("refund_items", args)) == [ToolCall("refund_items", args)]


@pytest.mark.parametrize(
    "text, kind",
    [
        (TOOL_CALL_OPEN + '{"name": "get_order", "arguments": {}}', "malformed_tag"),
        ('{"name": "get_order", "arguments": {}}' + TOOL_CALL_CLOSE, "malformed_tag"),
        (call('{"name": "get_order", "arguments": {'), "invalid_json"),
        (call("not json at all"), "invalid_json"),
        (call('["get_order", {}]'), "invalid_call"),
        (call('"get_order"'), "invalid_call"),
        (call('{"arguments": {"order_id": "W1"}}'), "invalid_call"),
        (call('{"name": "", "arguments": {}}'), "invalid_call"),
        (call('{"name": 3, "arguments": {}}'), "invalid_call"),
        (call('{"name": "get_order", "arguments": ["W1"]}'), "invalid_call"),
        (call('{"name": "get_order", "arguments": "W1"}'), "invalid_call"),
    ],
)
def test_malformed_calls_become_errors(text, kind):
    """Each kind of malformed block is reported as a ToolCallError of the right kind, never raised."""
    (result,) = parse_tool_calls(text)
    assert isinstance(result, ToolCallError)
    assert result.kind == kind
    assert result.message


def test_unbalanced_tags_still_parse_the_complete_block():
    """A stray closing tag is reported, and the complete block beside it is still parsed."""
    text = call('{"name": "a", "arguments": {}}') + " oops " + TOOL_CALL_CLOSE
    results = parse_tool_calls(text)
    assert [type(r) for r in results] == [ToolCallError, ToolCall]
    assert results[0].kind == "malformed_tag"


def test_too_many_calls_is_one_error():
    """More than MAX_CALLS_PER_MESSAGE blocks are refused as a whole (none runs)."""
    text = call('{"name": "a", "arguments": {}}') * (MAX_CALLS_PER_MESSAGE + 1)
    results = parse_tool_calls(text)
    assert len(results) == 1 and results[0].kind == "too_many_calls"
    at_limit = parse_tool_calls(call('{"name": "a", "arguments": {}}') * MAX_CALLS_PER_MESSAGE)
    assert len(at_limit) == MAX_CALLS_PER_MESSAGE and all(isinstance(r, ToolCall) for r in at_limit)


# -- validate_arguments --------------------------------------------------------------------------
def test_valid_arguments_pass():
    args = {"order_id": "W1", "reason": "return", "item_ids": ["I1"], "count": 2, "amount": 1.5, "note": None}
    assert validate_arguments(args, SCHEMA) is None
    assert validate_arguments({"order_id": "W1", "reason": "damaged", "amount": 3}, SCHEMA) is None  # int is a number


@pytest.mark.parametrize(
    "args, words",
    [
        ({"order_id": "W1"}, ["Missing", "reason"]),
        ({"order_id": "W1", "reason": "return", "colour": "red"}, ["Unexpected", "colour"]),
        ({"order_id": 7, "reason": "return"}, ["order_id", "expected string", "int"]),
        ({"order_id": "W1", "reason": "lost"}, ["reason", "must be one of", "lost"]),
        ({"order_id": "W1", "reason": "return", "count": True}, ["count", "boolean"]),
        ({"order_id": "W1", "reason": "return", "count": 1.5}, ["count", "integer"]),
        ({"order_id": "W1", "reason": "return", "item_ids": "I1"}, ["item_ids", "array"]),
        ({"order_id": "W1", "reason": "return", "item_ids": ["I1", 2]}, ["item_ids", "item 1"]),
        ({"order_id": None, "reason": "return"}, ["order_id", "null"]),
    ],
)
def test_invalid_arguments_are_explained(args, words):
    """Each schema problem gives a message that names the argument and what is wrong."""
    problem = validate_arguments(args, SCHEMA)
    assert problem is not None
    for word in words:
        assert word in problem


# -- tool messages -------------------------------------------------------------------------------
def test_tool_result_message_round_trip():
    """A result message is a `tool` message whose JSON body carries the tool, ok=True and the result."""
    message = tool_result_message("get_order", {"order_id": "W1", "items": [1, 2]})
    assert message["role"] == "tool" and isinstance(message["content"], str)
    body = {"tool": "get_order", "ok": True, "result": {"order_id": "W1", "items": [1, 2]}}
    assert parse_tool_message(message) == body


def test_tool_error_message_round_trip():
    """An error message carries ok=False, the error kind and the explanation."""
    message = tool_error_message(ToolCallError("rejected", "not allowed", name="cancel_order"))
    assert message["role"] == "tool"
    assert parse_tool_message(message) == {
        "tool": "cancel_order", "ok": False, "error": "not allowed", "error_type": "rejected"
    }


@pytest.mark.parametrize(
    "message",
    [{"role": "user", "content": "{}"}, {"role": "tool", "content": "not json"}, {"role": "tool", "content": "[1]"},
     {"role": "tool", "content": None}],
)
def test_parse_tool_message_rejects_other_messages(message):
    assert parse_tool_message(message) is None


def test_tools_prompt_lists_every_tool_and_the_protocol():
    """The system-prompt section shows the call syntax and each tool's JSON schema."""
    other = {"type": "function", "function": {"name": "get_order", "description": "d", "parameters": {}}}
    prompt = tools_prompt([SCHEMA, other])
    assert TOOL_CALL_OPEN in prompt and TOOL_CALL_CLOSE in prompt
    schemas = [json.loads(line) for line in prompt.splitlines() if line.startswith("{")]
    assert [s["name"] for s in schemas] == ["refund", "get_order"]
    assert schemas[0]["parameters"] == SCHEMA["function"]["parameters"]


def test_doctests():
    """The examples in pipeline/chat.py (the tagged-block scanner, strict JSON) hold."""
    import doctest

    import pipeline.chat

    result = doctest.testmod(pipeline.chat, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
