"""A customer played by an LLM, from the task's persona and goals, on any :mod:`pipeline.llm` backend.

The scripted customer (:mod:`pipeline.envs.customer_service.customer`) is exact and cheap, which is what training
needs; an LLM customer brings the variety of real people (phrasing, digressions, misunderstandings),
which is what an evaluation of robustness needs. Both implement
:class:`~pipeline.simulators.base.UserSimulator`, so an environment takes either::

    from pipeline.envs.customer_service.llm_customer import LLMCustomerFactory
    env = make_env("customer_service", customer=LLMCustomerFactory("bedrock:anthropic.claude-3-haiku-20240307-v1:0"))

The model plays the customer from a prompt built from the task: name, email, zip code and style; each
request in order, with the facts it may give when asked (order number, item, variant, new address) and
the actions it would agree to. It sees the agent's messages as the other side of the chat.

What stays rule-based, and why: the environment's policy needs to know *which* action the customer
agreed to before any change. A free-text "sure" must not authorise an action the task does not allow,
so consent is decided here, not by the model: the agent's message must propose an action
(:meth:`ScriptedCustomer.proposed`), that action must be one the current goals accept, and the reply
must start affirmatively.

When the conversation ends follows the scripted customer's rules, not the model's mood: the customer says
goodbye once every goal is met (done in the sandbox and told, the scripted customer's check), or leaves
once its patience is gone (``patience`` agent turns in a row that change nothing in the sandbox and get no
consent, so a broken agent cannot keep an LLM customer talking until the turn budget runs out). The model's
end markers (``[DONE]`` when satisfied, ``[LEAVE]`` when giving up) are stripped, and honoured only then.
Before that, a reply that ends the conversation anyway loses its goodbye: the known failure of LLM user
simulators is to agree to an action and say goodbye in one breath ("Yes, please cancel it. Thanks, bye!"),
which would end the episode before the agent can act; here the consent counts and the conversation goes on.
"""

from __future__ import annotations

import random
import re
from typing import TYPE_CHECKING, Any

from pipeline.simulators.base import SimulatorReply
from pipeline.envs.customer_service.customer import ScriptedCustomer, describe_options, format_address, goal_opening

if TYPE_CHECKING:
    from pipeline.llm import LLMBackend

DONE, LEAVE = "[DONE]", "[LEAVE]"
#: A sentence that ends the conversation (dropped while the customer may not leave yet).
_GOODBYE = re.compile(r"\b(good ?-?bye|bye|farewell|have a (nice|good|great|lovely) (day|one|evening)|that'?s all "
                      r"(i need(ed)?|for (now|today))|talk (to you )?later|see you|i'?m done|i'?ll take my business)\b",
                      re.IGNORECASE)
_SENTENCE = re.compile(r"[^.!?\n]+[.!?]*\s*|\n+")
GOODBYE = "Thanks, that's everything I needed. Goodbye!"
STILL_WAITING = "I'm still waiting. {goal}"
_AFFIRMATIVE = re.compile(r"^\W*(yes|yeah|yep|sure|ok|okay|please do|please go ahead|go ahead|that's fine|"
                          r"that works|sounds good|do it|correct|absolutely|alright)\b", re.IGNORECASE)
STYLES = {
    "polite": "You are polite and friendly.",
    "terse": "You are terse: short sentences, no small talk.",
    "impatient": "You are impatient and a little irritable, but not abusive.",
    "chatty": "You are chatty and add a little small talk.",
}


def persona_prompt(customer: dict[str, Any], goals: list[dict[str, Any]]) -> str:
    """The system prompt that makes a model play this customer (facts, requests, style, rules)."""
    lines = [
        f"You are {customer['name']}, a customer contacting an online store's support chat. Stay in character; "
        "you are the customer, never the agent.",
        STYLES.get(customer.get("persona", {}).get("style", ""), ""),
        f"Your account: email {customer['email']}, zip code {customer['zip_code']}.",
        "Your requests, in this order (start with the first; bring up the next only once the first is handled):",
    ]
    for i, goal in enumerate(goals, start=1):
        facts = [f"the order number is #{goal['order_id']}", f"the items are {' and '.join(goal['item_names'])}"]
        if goal.get("variant_options"):
            facts.append(f"you want the {describe_options(goal['variant_options'])} variant")
        if goal.get("new_address"):
            facts.append(f"the new address is {format_address(goal['new_address'])}")
        accept = ", ".join(goal["accept"]) if goal.get("accept") else "none (you only want information)"
        lines.append(f"{i}. {goal_opening(goal)} Facts you know: {'; '.join(facts)}. Actions you agree to: {accept}.")
    lines += [
        "Rules: give your email, zip code, order number or other facts only when the agent asks for them. "
        "When the agent proposes an action you agree to, start your reply with 'Yes'; refuse other actions. "
        "Never invent facts that are not listed above. Keep each message to one to three sentences.",
        f"When everything you asked for is done and you have been told what you needed, say goodbye and end "
        f"your message with {DONE}. If the agent keeps failing you, say so and end your message with {LEAVE}.",
    ]
    return "\n".join(line for line in lines if line)


class LLMCustomer:
    """A :class:`~pipeline.simulators.base.UserSimulator` whose words come from an LLM backend."""

    def __init__(self, backend: "LLMBackend", customer: dict[str, Any], goals: list[dict[str, Any]],
                 rng: random.Random | None = None, patience: int | None = None, max_tokens: int = 160,
                 temperature: float = 0.7) -> None:
        if not goals:
            raise ValueError("an LLM customer needs at least one goal.")
        self.backend, self.customer, self.goals = backend, customer, goals
        self.persona = customer.get("persona", {})
        # Twice the scripted customer's patience: "no progress" is judged more coarsely here (only
        # sandbox changes and consents count), so looking things up must not exhaust it.
        self.patience = patience if patience is not None else 2 * int(self.persona.get("patience", 4))
        if self.patience < 1:
            raise ValueError(f"patience must be at least 1 agent turn, got {self.patience}.")
        self.rng = rng or random.Random(0)  # the factory signature's; the backend does its own sampling
        self.max_tokens, self.temperature = max_tokens, temperature
        self.system = persona_prompt(customer, goals)
        self.history: list[dict] = []  # from the customer's side: the agent is "user", the customer "assistant"
        self._frustration = 0
        self._last_state: dict[str, Any] | None = None

    @property
    def frustration(self) -> int:
        return self._frustration

    def goal_met(self, state: dict[str, Any], index: int | None = None) -> bool:
        """Whether goal ``index`` (default: the current one) is done in ``state`` and its facts were told.

        The same test as the scripted customer's, so the environment's report reads the same; the
        model's own ``[DONE]`` only ends the conversation, it never decides success.
        """
        goal = self.goals[self.goal_index if index is None else index]
        told = " ".join(m["content"] for m in self.history if m["role"] == "user").lower()
        done = all(state.get(k) == v for k, v in goal["changes"].items())
        return done and all(any(a.lower() in told for a in alternatives) for alternatives in goal["facts"])

    @property
    def goal_index(self) -> int:
        """The first goal not yet met in the last state seen (the last goal when all are)."""
        state = self._last_state or {}
        return next((i for i in range(len(self.goals)) if not self.goal_met(state, i)), len(self.goals) - 1)

    def _say(self) -> str:
        messages = [{"role": "system", "content": self.system}, *self.history]
        if not self.history:
            messages.append({"role": "user", "content": "(The support chat opens. Write your first message.)"})
        text = self.backend.chat(messages, max_tokens=self.max_tokens, temperature=self.temperature).strip()
        self.history.append({"role": "assistant", "content": text})
        return text

    def start(self) -> str:
        text = self._say()
        cleaned, _ = _strip_markers(text)
        return cleaned or goal_opening(self.goals[0])

    def respond(self, agent_text: str, state: dict[str, Any]) -> SimulatorReply:
        changed = self._last_state is not None and state != self._last_state
        self._last_state = dict(state)
        self.history.append({"role": "user", "content": agent_text})
        text, _ = _strip_markers(self._say())
        confirmed = self.consent(agent_text, text)
        if changed or confirmed:
            self._frustration = 0
        else:
            self._frustration += 1
        if all(self.goal_met(state, i) for i in range(len(self.goals))):  # what it came for: done and told
            return SimulatorReply(text if _GOODBYE.search(text) else f"{text} {GOODBYE}".strip(), stop="resolved")
        if self._frustration >= self.patience:
            return SimulatorReply((text + " " if text else "") + "I've had enough, goodbye.", stop="user_left")
        # Not done, and still patient: a goodbye now would end the episode before the agent can act on what the
        # customer just agreed to, so it is dropped (the model's end markers are refused).
        staying = without_goodbye(text)
        return SimulatorReply(staying or STILL_WAITING.format(goal=goal_opening(self.goals[self.goal_index])),
                              confirmed_action=confirmed)

    def consent(self, agent_text: str, reply: str) -> str | None:
        """The action the customer agreed to in ``reply``, if the agent proposed one the goals allow."""
        if not _AFFIRMATIVE.search(reply):
            return None
        allowed = {a for goal in self.goals for a in goal.get("accept", [])}
        return next((a for a in ScriptedCustomer.proposed(agent_text) if a in allowed), None)


def without_goodbye(text: str) -> str:
    """``text`` without the sentences that end the conversation.

    >>> without_goodbye("Yes, please cancel it. Thanks, bye!")
    'Yes, please cancel it.'
    """
    return "".join(s for s in _SENTENCE.findall(text) if not _GOODBYE.search(s)).strip()


def _strip_markers(text: str) -> tuple[str, str | None]:
    stop = "user_left" if LEAVE in text else "resolved" if DONE in text else None
    return text.replace(DONE, "").replace(LEAVE, "").strip(), stop


class LLMCustomerFactory:
    """``factory(customer, goals, rng) -> LLMCustomer``: what an environment's ``customer=`` takes.

    Picklable: it holds the backend spec (or a backend, which drops its client when pickled).
    """

    def __init__(self, backend: "str | LLMBackend", patience: int | None = None, max_tokens: int = 160,
                 temperature: float = 0.7) -> None:
        from pipeline.llm import make_backend

        self.backend = make_backend(backend)
        self.patience, self.max_tokens, self.temperature = patience, max_tokens, temperature

    def __call__(self, customer: dict[str, Any], goals: list[dict[str, Any]], rng: random.Random) -> LLMCustomer:
        return LLMCustomer(self.backend, customer, goals, rng, patience=self.patience, max_tokens=self.max_tokens,
                           temperature=self.temperature)
