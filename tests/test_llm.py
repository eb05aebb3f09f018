"""LLM backends: Bedrock against botocore's own service model (Stubber), OpenAI-compatible against a local
HTTP server, the HF backend on the tiny checkpoint. No network, no credentials."""

from __future__ import annotations

import json
import pickle
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from pipeline.llm import (
    BedrockBackend,
    HFChatBackend,
    LLMBackend,
    LLMBackendError,
    OpenAIBackend,
    ScriptedBackend,
    make_backend,
    normalise_messages,
)

CHAT = [{"role": "system", "content": "You grade support chats."},
        {"role": "user", "content": "Where is my order?"},
        {"role": "assistant", "content": '<tool_call>{"name": "get_order", "arguments": {}}</tool_call>'},
        {"role": "tool", "content": '{"ok": true}'},
        {"role": "user", "content": "Hello?"}]


def test_normalise_merges_roles_and_moves_the_system_prompt() -> None:
    system, turns = normalise_messages(CHAT)
    assert system == "You grade support chats."
    assert [t["role"] for t in turns] == ["user", "assistant", "user"]
    assert turns[-1]["content"] == '[tool result] {"ok": true}\n\nHello?'


@pytest.mark.parametrize("bad, needle", [([], "at least one"), ([{"role": "bot", "content": "x"}], "role 'bot'"),
                                         ([{"role": "user", "content": None}], "message 0")])
def test_normalise_rejects_bad_chats_with_the_reason(bad, needle) -> None:
    with pytest.raises(ValueError, match=needle):
        normalise_messages(bad)


# ------------------------------------------------------------------------------------------ Bedrock


@pytest.fixture
def bedrock():
    import botocore.session
    from botocore.stub import Stubber

    # A real bedrock-runtime client from botocore's shipped service model; Stubber checks every request
    # against that model's input shapes and every canned response against its output shapes.
    client = botocore.session.get_session().create_client(
        "bedrock-runtime", region_name="us-east-1", aws_access_key_id="test", aws_secret_access_key="test")
    with Stubber(client) as stubber:
        yield client, stubber
        stubber.assert_no_pending_responses()


def _converse_response(*texts: str) -> dict:
    return {"output": {"message": {"role": "assistant", "content": [{"text": t} for t in texts]}},
            "stopReason": "end_turn", "usage": {"inputTokens": 12, "outputTokens": 3, "totalTokens": 15},
            "metrics": {"latencyMs": 10}}


def test_bedrock_sends_a_valid_converse_request_and_reads_the_text(bedrock) -> None:
    client, stubber = bedrock
    model = "anthropic.claude-3-haiku-20240307-v1:0"
    stubber.add_response("converse", _converse_response("It shipped ", "yesterday."), expected_params={
        "modelId": model,
        "system": [{"text": "You grade support chats."}],
        "messages": [{"role": "user", "content": [{"text": "Where is my order?"}]},
                     {"role": "assistant", "content": [{"text": CHAT[2]["content"]}]},
                     {"role": "user", "content": [{"text": '[tool result] {"ok": true}\n\nHello?'}]}],
        "inferenceConfig": {"maxTokens": 64, "temperature": 0.0},
    })
    backend = BedrockBackend(model, client=client)
    assert isinstance(backend, LLMBackend)
    assert backend.chat(CHAT, max_tokens=64) == "It shipped yesterday."


def test_bedrock_service_errors_say_what_to_check(bedrock) -> None:
    client, stubber = bedrock
    stubber.add_client_error("converse", service_error_code="AccessDeniedException",
                             service_message="You don't have access to the model.", http_status_code=403)
    with pytest.raises(LLMBackendError, match="AccessDeniedException.*enabled in this account and region"):
        BedrockBackend("anthropic.claude-3-haiku-20240307-v1:0", client=client).chat(CHAT)


def test_bedrock_reply_without_text_is_an_error(bedrock) -> None:
    client, stubber = bedrock
    response = _converse_response()
    response["stopReason"] = "content_filtered"
    stubber.add_response("converse", response)
    with pytest.raises(LLMBackendError, match="no text.*content_filtered"):
        BedrockBackend("m", client=client).chat(CHAT)


def test_bedrock_backend_pickles_without_its_client(bedrock) -> None:
    client, _ = bedrock
    clone = pickle.loads(pickle.dumps(BedrockBackend("m", region="eu-west-1", client=client)))
    assert (clone.model_id, clone.region, clone._client) == ("m", "eu-west-1", None)


# ------------------------------------------------------------------------------------------ OpenAI


class _Handler(BaseHTTPRequestHandler):
    requests: list = []
    reply: tuple[int, object] = (200, {})

    def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
        status, payload = type(self).reply
        data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    _Handler.requests = []
    httpd = HTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", _Handler
    httpd.shutdown()
    httpd.server_close()


def test_openai_posts_chat_completions_and_reads_the_first_choice(server, monkeypatch) -> None:
    url, handler = server
    handler.reply = (200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": " 4 of 5 \n"}}]})
    monkeypatch.setenv("TEST_KEY", "sk-test")
    backend = OpenAIBackend("qwen", base_url=url + "/", api_key_env="TEST_KEY")
    assert backend.chat(CHAT, max_tokens=32, temperature=0.5) == "4 of 5"
    (request,) = handler.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["auth"] == "Bearer sk-test"
    body = request["body"]
    assert (body["model"], body["max_tokens"], body["temperature"]) == ("qwen", 32, 0.5)
    assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant", "user"]


def test_openai_without_a_key_sends_no_authorization(server, monkeypatch) -> None:
    url, handler = server
    handler.reply = (200, {"choices": [{"message": {"content": "ok"}}]})
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert make_backend(f"openai:local@{url}").chat(CHAT) == "ok"
    assert handler.requests[0]["auth"] is None


@pytest.mark.parametrize("reply, needle", [
    ((500, {"error": "model not loaded"}), "HTTP 500.*model not loaded"),
    ((200, "not json"), "did not answer JSON"),
    ((200, {"object": "error"}), "without choices"),
])
def test_openai_bad_answers_are_errors(server, reply, needle) -> None:
    url, handler = server
    handler.reply = reply
    with pytest.raises(LLMBackendError, match=needle):
        OpenAIBackend("m", base_url=url).chat(CHAT)


def test_openai_unreachable_server_says_so() -> None:
    with pytest.raises(LLMBackendError, match="cannot reach.*Is the server running"):
        OpenAIBackend("m", base_url="http://127.0.0.1:9/v1", timeout=5).chat(CHAT)


def test_openai_key_is_not_pickled() -> None:
    clone = pickle.loads(pickle.dumps(OpenAIBackend("m", api_key="secret")))
    assert clone.api_key is None and clone.model == "m"


# ------------------------------------------------------------------------------------------ HF, scripted, specs


def test_hf_backend_generates_greedily_from_a_local_checkpoint(tiny_model_dir: Path) -> None:
    backend = make_backend(f"hf:{tiny_model_dir}")
    first = backend.chat(CHAT, max_tokens=8)
    assert isinstance(first, str)
    assert backend.chat(CHAT, max_tokens=8) == first  # temperature 0 is greedy: the same reply
    assert pickle.loads(pickle.dumps(backend))._loaded is None  # weights do not travel


def test_scripted_backend_cycles_and_records() -> None:
    backend = ScriptedBackend(["a", "b"])
    assert [backend.chat([{"role": "user", "content": str(i)}]) for i in range(3)] == ["a", "b", "a"]
    assert len(backend.prompts) == 3
    with pytest.raises(ValueError, match="max_tokens"):
        backend.chat(CHAT, max_tokens=0)


def test_make_backend_specs() -> None:
    assert isinstance(make_backend("hf:smollm2-135m"), HFChatBackend)
    assert make_backend("openai:m").base_url == "http://localhost:8000/v1"
    backend = ScriptedBackend(["x"])
    assert make_backend(backend) is backend
    with pytest.raises(ValueError, match="unknown LLM backend spec 'bedrock:'"):
        make_backend("bedrock:")
    with pytest.raises(TypeError, match="chat"):
        make_backend(object())  # type: ignore[arg-type]
