"""Chat LLM backends: one small protocol, three implementations, for judges and simulated users.

The reward judge (:mod:`rewards.judge`) and a domain's LLM customer (the customer-service domain's ``llm_customer``) need a
model that answers a chat, not a policy being trained. :class:`LLMBackend` is that seam: ``chat(messages,
max_tokens, temperature) -> str``, with messages in the HF/OpenAI chat format. (The policy's own token-level
generation backends are another seam: :mod:`pipeline.rollout.backends`.) Implementations:

- :class:`HFChatBackend`: a local Hugging Face causal LM (an alias such as the embedded ``smollm2-135m``, a
  directory or a hub id), run with ``generate``;
- :class:`BedrockBackend`: Amazon Bedrock through boto3's ``bedrock-runtime`` Converse API;
- :class:`OpenAIBackend`: any OpenAI-compatible ``/chat/completions`` HTTP endpoint (vLLM, TGI,
  llama.cpp's server, hosted APIs), over the standard library's HTTP client;
- :class:`ScriptedBackend`: canned replies, for tests and examples (the same role scripted policies
  play for agents).

:func:`make_backend` builds one from a spec string, so a YAML reward config names its judge's model::

    hf:smollm2-135m
    bedrock:anthropic.claude-3-haiku-20240307-v1:0
    openai:Qwen/Qwen2.5-7B-Instruct@http://localhost:8000/v1

Backends load or connect lazily and drop their client or weights when pickled, so a reward that holds
one crosses process boundaries as its spec. Errors from the service come back as
:class:`LLMBackendError` naming the backend, the model and what to check.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.error
import urllib.request
from typing import Any, Iterable, Protocol, Sequence, runtime_checkable

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")


class LLMBackendError(RuntimeError):
    """A backend could not produce a reply (service error, bad response, missing model)."""


@runtime_checkable
class LLMBackend(Protocol):
    """A chat model: ``chat(messages, max_tokens=..., temperature=...) -> reply text``."""

    name: str

    def chat(self, messages: Sequence[dict], max_tokens: int = 256, temperature: float = 0.0) -> str: ...


def normalise_messages(messages: Sequence[dict]) -> tuple[str, list[dict]]:
    """``(system_text, turns)`` in the shape strict chat APIs accept.

    Converse and most OpenAI-compatible servers want the system prompt apart, turns that start with
    ``user`` and alternate, and no ``tool`` role without tool-call ids. So: system messages are joined,
    tool results become user text, and consecutive messages of one role are merged.

    >>> normalise_messages([{"role": "system", "content": "Be brief."}, {"role": "assistant", "content": "Hi"},
    ...                     {"role": "tool", "content": "{}"}, {"role": "user", "content": "Where is it?"}])
    ('Be brief.', [{'role': 'user', 'content': '(The conversation starts.)'}, {'role': 'assistant', 'content': 'Hi'}, {'role': 'user', 'content': '[tool result] {}\\n\\nWhere is it?'}])
    """
    system: list[str] = []
    turns: list[dict] = []
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if not isinstance(content, str):
            raise ValueError(f"message {i} has no text content ({content!r}); backends take chat messages with "
                             "string 'content'.")
        if role == "system":
            system.append(content)
            continue
        if role == "tool":
            role, content = "user", f"[tool result] {content}"
        if role not in ("user", "assistant"):
            raise ValueError(f"message {i} has role {role!r}; use system, user, assistant or tool.")
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] += "\n\n" + content
        else:
            turns.append({"role": role, "content": content})
    if not turns:
        raise ValueError("a chat needs at least one user or assistant message.")
    if turns[0]["role"] != "user":
        turns.insert(0, {"role": "user", "content": "(The conversation starts.)"})
    return "\n\n".join(system), turns


def _check_sampling(max_tokens: int, temperature: float) -> None:
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}.")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}.")


class ScriptedBackend:
    """Canned replies in order (cycling), recording every prompt: a backend for tests and examples.

    >>> backend = ScriptedBackend(['{"score": 5, "reason": "ok"}'])
    >>> backend.chat([{"role": "user", "content": "Rate this."}])
    '{"score": 5, "reason": "ok"}'
    >>> backend.prompts[0][-1]["content"]
    'Rate this.'
    """

    name = "scripted"

    def __init__(self, replies: Iterable[str]) -> None:
        self.replies = list(replies)
        if not self.replies:
            raise ValueError("ScriptedBackend needs at least one reply.")
        self.prompts: list[list[dict]] = []

    def chat(self, messages: Sequence[dict], max_tokens: int = 256, temperature: float = 0.0) -> str:
        _check_sampling(max_tokens, temperature)
        self.prompts.append([dict(m) for m in messages])
        return self.replies[(len(self.prompts) - 1) % len(self.replies)]


class HFChatBackend:
    """A local causal LM (alias, directory or hub id) answering with ``generate``; loads on first use."""

    name = "hf"

    def __init__(self, model: str = "smollm2-135m", model_obj: Any = None, tokenizer: Any = None) -> None:
        self.model = str(model)
        self._loaded = (model_obj, tokenizer) if model_obj is not None else None
        if model_obj is not None and tokenizer is None:
            raise ValueError("HFChatBackend: pass the tokenizer together with a loaded model.")

    def __getstate__(self) -> dict:
        return {"model": self.model}

    def __setstate__(self, state: dict) -> None:
        HFChatBackend.__init__(self, state["model"])

    def chat(self, messages: Sequence[dict], max_tokens: int = 256, temperature: float = 0.0) -> str:
        import torch

        _check_sampling(max_tokens, temperature)
        if self._loaded is None:
            from pipeline.models import load_model

            self._loaded = load_model(self.model)
        from pipeline.templates import ChatTemplate

        model, tokenizer = self._loaded
        system, turns = normalise_messages(messages)
        chat = ([{"role": "system", "content": system}] if system else []) + turns
        # Every message is data here (an agent's text can try to write the customer's turn): only the template
        # makes control tokens (pipeline.templates).
        template = ChatTemplate(tokenizer, tool_calling="text")
        input_ids = torch.tensor([template.encode(template.render(chat, True, mark_assistant=True))])
        ids = {"input_ids": input_ids.to(model.device), "attention_mask": torch.ones_like(input_ids).to(model.device)}
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=max_tokens, pad_token_id=tokenizer.pad_token_id, **sampling)
        return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


class BedrockBackend:
    """Amazon Bedrock's Converse API (``bedrock-runtime``), through boto3.

    ``client`` may be given (a stubbed one in tests); otherwise one is made on first use from the
    default credential chain, in ``region`` (else the session's default region).
    """

    name = "bedrock"

    def __init__(self, model_id: str, region: str | None = None, client: Any = None) -> None:
        if not model_id:
            raise ValueError("BedrockBackend needs a model id, e.g. anthropic.claude-3-haiku-20240307-v1:0.")
        self.model_id, self.region, self._client = model_id, region, client

    def __getstate__(self) -> dict:
        return {"model_id": self.model_id, "region": self.region}

    def __setstate__(self, state: dict) -> None:
        BedrockBackend.__init__(self, **state)

    @property
    def client(self) -> Any:
        if self._client is None:
            import boto3

            self._client = boto3.client("bedrock-runtime", region_name=self.region)
        return self._client

    def chat(self, messages: Sequence[dict], max_tokens: int = 256, temperature: float = 0.0) -> str:
        from botocore.exceptions import BotoCoreError, ClientError

        _check_sampling(max_tokens, temperature)
        system, turns = normalise_messages(messages)
        request: dict[str, Any] = {
            "modelId": self.model_id,
            "messages": [{"role": t["role"], "content": [{"text": t["content"]}]} for t in turns],
            "inferenceConfig": {"maxTokens": max_tokens, "temperature": temperature},
        }
        if system:
            request["system"] = [{"text": system}]
        try:
            response = self.client.converse(**request)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            raise LLMBackendError(f"Bedrock Converse on {self.model_id} failed: {error.get('Code')}: "
                                  f"{error.get('Message')}. Check the model id, that the model is enabled in this "
                                  "account and region, and the credentials' bedrock:InvokeModel permission.") from exc
        except BotoCoreError as exc:
            raise LLMBackendError(f"Bedrock Converse on {self.model_id} failed: {exc}.") from exc
        content = response.get("output", {}).get("message", {}).get("content", [])
        texts = [block["text"] for block in content if "text" in block]
        if not texts:
            raise LLMBackendError(f"Bedrock model {self.model_id} returned no text (stopReason "
                                  f"{response.get('stopReason')!r}).")
        return "".join(texts).strip()


class OpenAIBackend:
    """Any OpenAI-compatible ``POST {base_url}/chat/completions`` endpoint, over ``urllib``.

    The API key comes from ``api_key`` or the ``api_key_env`` environment variable (``OPENAI_API_KEY``);
    local servers usually need none.
    """

    name = "openai"

    def __init__(self, model: str, base_url: str = "http://localhost:8000/v1", api_key: str | None = None,
                 api_key_env: str = "OPENAI_API_KEY", timeout: float = 120.0) -> None:
        if not model:
            raise ValueError("OpenAIBackend needs the model name the server serves.")
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}.")
        self.model, self.base_url, self.timeout = model, base_url.rstrip("/"), timeout
        self.api_key, self.api_key_env = api_key, api_key_env

    def __getstate__(self) -> dict:
        # The key is not pickled: the receiving process reads it from its own environment.
        return {"model": self.model, "base_url": self.base_url, "api_key_env": self.api_key_env,
                "timeout": self.timeout}

    def __setstate__(self, state: dict) -> None:
        OpenAIBackend.__init__(self, **state)

    def chat(self, messages: Sequence[dict], max_tokens: int = 256, temperature: float = 0.0) -> str:
        _check_sampling(max_tokens, temperature)
        system, turns = normalise_messages(messages)
        body = {"model": self.model, "max_tokens": max_tokens, "temperature": temperature,
                "messages": ([{"role": "system", "content": system}] if system else []) + turns}
        headers = {"Content-Type": "application/json"}
        key = self.api_key or os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        url = f"{self.base_url}/chat/completions"
        request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload = json.loads(response.read().decode())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:500]
            raise LLMBackendError(f"{url} answered HTTP {exc.code} for model {self.model!r}: {detail}") from exc
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            raise LLMBackendError(f"cannot reach {url}: {exc}. Is the server running?") from exc
        except json.JSONDecodeError as exc:
            raise LLMBackendError(f"{url} did not answer JSON: {exc}.") from exc
        try:
            text = payload["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise LLMBackendError(f"{url} answered without choices[0].message.content: {str(payload)[:300]}") from None
        if not isinstance(text, str):
            raise LLMBackendError(f"{url} answered a non-text message content: {text!r}.")
        return text.strip()


def check_backend_spec(spec: str) -> str:
    """``spec`` if it is a backend spec :func:`make_backend` accepts, checked without building anything.

    >>> check_backend_spec("openai:qwen@ftp://host")
    Traceback (most recent call last):
    ...
    ValueError: openai:MODEL@BASE_URL needs an http:// or https:// URL, got 'ftp://host'.
    """
    kind, _, rest = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if kind not in ("hf", "bedrock", "openai") or not rest:
        raise ValueError(f"unknown LLM backend spec {spec!r}; use hf:MODEL, bedrock:MODEL_ID or openai:MODEL@BASE_URL.")
    if kind == "openai":
        model, sep, url = rest.partition("@")
        if not model:
            raise ValueError(f"openai:MODEL@BASE_URL needs the model name the server serves, got {spec!r}.")
        if sep and not url.startswith(("http://", "https://")):
            raise ValueError(f"openai:MODEL@BASE_URL needs an http:// or https:// URL, got {url!r}.")
    return spec


def make_backend(spec: "str | LLMBackend") -> LLMBackend:
    """A backend from a spec: ``hf:MODEL``, ``bedrock:MODEL_ID``, ``openai:MODEL@BASE_URL`` (or a backend).

    >>> make_backend("bedrock:anthropic.claude-3-haiku-20240307-v1:0").model_id
    'anthropic.claude-3-haiku-20240307-v1:0'
    >>> b = make_backend("openai:qwen2.5-7b@http://localhost:8000/v1")
    >>> b.model, b.base_url
    ('qwen2.5-7b', 'http://localhost:8000/v1')
    >>> make_backend("gpt")
    Traceback (most recent call last):
    ...
    ValueError: unknown LLM backend spec 'gpt'; use hf:MODEL, bedrock:MODEL_ID or openai:MODEL@BASE_URL.
    """
    if not isinstance(spec, str):
        if not callable(getattr(spec, "chat", None)):
            raise TypeError(f"an LLM backend needs a chat(messages, max_tokens, temperature) method; got "
                            f"{type(spec).__name__}.")
        return spec
    check_backend_spec(spec)
    kind, _, rest = spec.partition(":")
    if kind == "hf" and rest:
        return HFChatBackend(rest)
    if kind == "bedrock" and rest:
        return BedrockBackend(rest)
    if kind == "openai" and rest:
        model, sep, url = rest.partition("@")
        return OpenAIBackend(model, url) if sep else OpenAIBackend(model)
    raise ValueError(f"unknown LLM backend spec {spec!r}; use hf:MODEL, bedrock:MODEL_ID or openai:MODEL@BASE_URL.")
