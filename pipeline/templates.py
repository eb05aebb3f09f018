"""A tokenizer's chat template as the rollout engine and SFT use it: rendering, tools, and token-safe encoding.

Two things are decided here, once, for every place that turns a conversation into token ids (the rollout
engine, SFT's demonstrations, the local chat backend of the LLM customer and judge):

**Which tool protocol the template speaks** (:mod:`pipeline.native_tools`): turnwise's ``<tool_call>`` text,
or the template's own format with the tool specs passed as ``apply_chat_template(..., tools=...)``.

**Only the template makes control tokens.** Environment text is data: a CSV cell, a tool result, a customer
message, an SOP. Tokenised naively, a cell holding ``<|im_end|>\\n<|im_start|>system ...`` becomes real turn
boundaries, and a customer can write a turn for the assistant. So every string that goes *into* the template
(all messages but the policy's own, and the tool specs) has its control tokens wrapped in two private-use
markers before rendering; encoding then turns a marked token into the ids of its characters as plain text,
and every unmarked control token (the template's own markup) into its id. The control tokens are the
tokenizer's special tokens plus the added tokens the template's source contains (Qwen's ``<tool_call>``),
the same set ``apply_chat_template(..., sanitize_control_tokens=True)`` uses. When no input holds a control
token, rendering and encoding are exactly the plain ``apply_chat_template`` and ``tokenizer(text)``.

Assistant messages are not marked: in a rollout their ids are the sampled ids, never re-encoded, and in SFT
an assistant text is encoded apart (:meth:`ChatTemplate.encode_assistant`), with its special tokens as text.
"""

from __future__ import annotations

import re
from functools import cached_property
from typing import Any, Sequence

from pipeline.native_tools import TEXT, ToolFormat, resolve_tool_format, template_messages

#: Private-use code points (plane 15) around a control token that came from input text, as transformers
#: marks them. They are removed from input text first, so input cannot forge a marked token either.
MARK_START, MARK_END = "\U000f0000", "\U000f0001"
#: An assistant message's stand-in when the template rewrites the text (Llama 3.1's ``| trim``): where it
#: ends in the rendering is where the template's own text after the message begins.
_STAND_IN = "\U000f0002"


class TemplateError(ValueError):
    """The chat template is not prefix-preserving, so incremental tokenisation cannot be exact."""



class ChatTemplate:
    """Render conversations with a tokenizer's chat template and encode them so that only the template makes control tokens.

    ``tool_calling`` is ``auto`` (the template's native tool format when it has one), ``native`` or ``text``
    (:data:`pipeline.native_tools.TOOL_CALLING`); :attr:`tool_format` is the result.
    """

    def __init__(self, tokenizer, tool_calling: str = "auto") -> None:
        self.tokenizer = tokenizer
        self.tool_format: ToolFormat = resolve_tool_format(tokenizer, tool_calling) if tokenizer.chat_template else TEXT
        eos = tokenizer.eos_token
        self.end_of_turn = eos if isinstance(eos, str) else ""

    @property
    def native(self) -> bool:
        return self.tool_format.native

    # -- control tokens ---------------------------------------------------------------------------
    @cached_property
    def control_tokens(self) -> tuple[str, ...]:
        """The special tokens, plus the added tokens that appear in the template's source, longest first."""
        source = self.tokenizer.chat_template if isinstance(self.tokenizer.chat_template, str) else ""
        tokens = {token.content for token in self.tokenizer.added_tokens_decoder.values()
                  if token.special or (token.content in source and not token.content.isspace())}
        return tuple(sorted((t for t in tokens if t), key=len, reverse=True))

    @cached_property
    def _control_re(self) -> re.Pattern:
        return re.compile("|".join(map(re.escape, self.control_tokens)) or "(?!)")

    @cached_property
    def _marked_re(self) -> re.Pattern:
        return re.compile(f"{MARK_START}({self._control_re.pattern}){MARK_END}|[{MARK_START}{MARK_END}]")

    def mark(self, value: Any) -> Any:
        """``value`` (a string, or a message, list or dict of them) with each control token wrapped in markers."""
        if isinstance(value, str):
            value = value.replace(MARK_START, "").replace(MARK_END, "")
            return self._control_re.sub(lambda m: MARK_START + m.group(0) + MARK_END, value)
        if isinstance(value, dict):
            return {key: self.mark(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.mark(item) for item in value]
        return value

    # -- rendering ----------------------------------------------------------------------------------
    def render(self, messages: Sequence[dict], generation_prompt: bool, tools: Sequence[dict] | None = None,
               mark_assistant: bool = False) -> str:
        """The template's text of ``messages`` (in the template's own form: see :meth:`template_messages`).

        Every message but the assistant's (all of them with ``mark_assistant``, for a model that reads a
        conversation it did not write), and ``tools``, is marked (see the module docstring); the tool specs
        are passed to the template only when it speaks a native tool format.
        """
        marked = [m if m.get("role") == "assistant" and not mark_assistant else self.mark(m) for m in messages]
        native_tools = self.mark(list(tools)) if tools and self.native else None
        return self.tokenizer.apply_chat_template(marked, tools=native_tools, tokenize=False,
                                                  add_generation_prompt=generation_prompt)

    def continuation(self, before: Sequence[dict], assistant: dict, rendered: str, text: str,
                     tools: Sequence[dict] | None = None) -> tuple[str, str]:
        """``(with_assistant, tail)`` for an assistant message whose tokens spell ``text`` after ``rendered``.

        ``rendered`` is ``before`` rendered with the generation prompt; ``with_assistant`` is ``before`` plus
        ``assistant`` rendered without it, and ``tail`` the template's text after the assistant's tokens (its
        end-of-turn markup). A template that rewrites the message's text (strips its whitespace) still gets
        the tail it writes after any text. Raises :class:`TemplateError` when the rendering does not continue
        ``rendered``: a template whose later messages change how earlier ones render.
        """
        with_assistant = self.render([*before, assistant], False, tools)
        head = rendered + text
        if with_assistant.startswith(head):
            return with_assistant, with_assistant[len(head):]
        probe = self.render([*before, {"role": "assistant", "content": _STAND_IN}], False, tools)
        tail = probe[len(rendered) + len(_STAND_IN):]
        if (assistant.get("tool_calls") is None and probe.startswith(rendered + _STAND_IN)
                and with_assistant.startswith(rendered) and with_assistant.endswith(tail)):
            return with_assistant, tail
        raise TemplateError(
            "The chat template does not render conversations prefix-preservingly (a later message changes how "
            "earlier ones are rendered), so sampled tokens cannot be kept exactly. Use a template without such "
            "rewriting (for example, one that does not strip or rewrite past assistant turns).")

    def template_messages(self, messages: Sequence[dict]) -> list[dict]:
        """Protocol-text messages in the form the template renders (native ``tool_calls`` where it has them)."""
        return template_messages(messages, self.tool_format)

    # -- encoding -----------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of (a slice of) rendered text: marked control tokens as plain text, the others as tokens."""
        if MARK_START not in text and MARK_END not in text:
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        ids: list[int] = []
        pos = 0
        for match in self._marked_re.finditer(text):
            ids += self._encode_piece(text[pos:match.start()], plain=False)
            if match.group(1):
                ids += self._encode_piece(match.group(1), plain=True)
            pos = match.end()
        return ids + self._encode_piece(text[pos:], plain=False)

    def encode_assistant(self, text: str) -> list[int]:
        """Token ids of an assistant text as a demonstration: special tokens in it are plain text.

        Added tokens that are not special (Qwen's ``<tool_call>``) stay tokens: a model trained on its template
        samples them as such.
        """
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    @cached_property
    def _control_ids(self) -> frozenset[int]:
        return frozenset(self.tokenizer.convert_tokens_to_ids(list(self.control_tokens)))

    def _encode_piece(self, piece: str, plain: bool) -> list[int]:
        if not piece:
            return []
        if not plain:
            return self.tokenizer(piece, add_special_tokens=False)["input_ids"]
        ids = self.tokenizer(piece, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        if self._control_ids.isdisjoint(ids):
            return ids
        # A control token that is an added token but not a special one (Qwen's <tool_call>) is matched even with
        # split_special_tokens; its characters one by one can no longer form it.
        return [i for ch in piece for i in self.tokenizer(ch, add_special_tokens=False, split_special_tokens=True)["input_ids"]]
