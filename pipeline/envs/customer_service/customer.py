"""A scripted customer: persona, goals, hidden facts, patience. Deterministic given task, seed and agent texts.

The customer holds facts the agent needs (email, zip code, order number, the variant or address it
wants) and gives each only when asked. It answers proposals: it agrees to the actions its goal allows
and turns down the rest. It checks the sandbox state and the agent's words, and moves to its next goal,
or says goodbye, only when what it came for has been done and told. Unhelpful or off-topic turns, and
questions it already answered, wear down its patience until it leaves.

Understanding the agent is deliberately keyword-based: the scripted customer must be cheap, exact and
reproducible for training, and the same rules are documented in the SOP the agent reads.
"""

from __future__ import annotations

import random
import re
from typing import Any

from pipeline.simulators.base import SimulatorReply

# Which sentences of the agent are requests, and what each asks for. The reward's redundant-request
# scorer reads the same patterns (see evidence.py), so the two never disagree on what counts as asking.
REQUEST_CUE = re.compile(
    r"\?|\b(please (provide|share|confirm|give|tell|send)|could you|can you|may i have|tell me|let me know|"
    r"what is|what's|provide)\b"
)
ASKS: dict[str, re.Pattern] = {
    "email": re.compile(r"e-?mail"),
    "zip": re.compile(r"\bzip\b|zip code|postal code|post code|zipcode"),
    "order_id": re.compile(r"order (id|number|no\b|#)|order's (id|number)|which order|order id"),
    "item": re.compile(r"(which|what) (item|product)"),
    "variant": re.compile(r"(which|what) (size|colou?r|variant|option|style)|prefer(red)? (size|colou?r|variant)"),
    "address": re.compile(r"(new|updated|correct|different) (shipping |delivery )?address|(what|which) address"),
    "name": re.compile(r"(your|full) name"),
}
_PROPOSAL_CUE = re.compile(
    r"\b(would you like|do you want|shall i|should i|may i|can i|could i|is (it|that) (ok|okay|alright)|"
    r"okay to|ok to|confirm|go ahead|proceed|want me to)\b"
)
_ACTIONS: dict[str, re.Pattern] = {
    "cancel": re.compile(r"\bcancel"),
    "refund": re.compile(r"\brefund"),
    "exchange": re.compile(r"\bexchange|\bswap\b"),
    "address": re.compile(r"\baddress\b"),
    "store_credit": re.compile(r"store credit"),
    "escalate": re.compile(r"escalat|\bhuman\b|specialist|supervisor"),
}

OPENINGS: dict[str, list[str]] = {
    "order_status": [
        "I'd like to know where my order is. I ordered {items}.",
        "Can you tell me the status of my order? It has {items} in it.",
        "I'm checking on my order with {items}. What's going on with it?",
    ],
    "cancel": [
        "I need to cancel my order with {items}.",
        "Please cancel my order for {items}, I changed my mind.",
        "I want to cancel an order I placed ({items}).",
    ],
    "damaged_refund": [
        "My {items} arrived damaged. I'd like a refund.",
        "The {items} I received is broken. Can I get my money back?",
        "The {items} came damaged in the box, I want a refund.",
    ],
    "return_refund": [
        "I'd like to return the {items} I bought and get a refund.",
        "I don't need the {items} anymore, can I return it for a refund?",
        "I want to send back the {items} for a refund.",
    ],
    "address_change": [
        "I need to change the shipping address on my order with {items}.",
        "I moved. Can you update the delivery address for my order ({items})?",
        "Please ship my order with {items} to a different address.",
    ],
    "exchange": [
        "I'd like to exchange the {items} I got for a different {dimension}.",
        "The {items} doesn't work for me, can I swap it for another {dimension}?",
        "Can I exchange my {items} for a different {dimension}?",
    ],
    "lost_package": [
        "My order with {items} says delivered but I never got it.",
        "Tracking shows my {items} was delivered, but nothing arrived.",
        "The {items} was marked as delivered but it's not here.",
    ],
}
STYLE_PREFIX = {
    "polite": ["Hi there! ", "Hello, ", "Good morning! "],
    "terse": ["", "", "Hi. "],
    "impatient": ["Look, ", "Finally. ", "Hey, "],
    "chatty": ["Hi! I hope you're having a good day. ", "Hello! I've been a customer for years. ", "Hey there! "],
}
ACCEPT = ["Yes, please go ahead.", "Yes, that's right, please do it.", "Okay, yes. Go ahead.", "Sure, please do that."]
REJECT = ["No, that's not what I want. {goal}", "No thanks. {goal}", "That's not what I asked for. {goal}"]
NUDGE = ["Can you help me with this? {goal}", "I'm still waiting. {goal}", "That doesn't help me. {goal}",
         "Hello? {goal}"]
ALREADY = ["I already told you: {fact}", "As I said, {fact}", "I gave you that already. {fact}"]
ACK = ["Okay, thanks.", "Alright.", "Got it, thank you.", "I see."]
NEXT_GOAL = ["Thanks. One more thing: {opening}", "Great. Also, {opening}", "Thank you. I have another request: {opening}"]
GOODBYE = ["Thank you, that's all I needed. Bye!", "Great, thanks for your help. Goodbye!", "Perfect, thank you. That's everything."]
LEAVE = ["This is going nowhere. I'm done. Goodbye.", "Forget it, I'll take my business elsewhere.",
         "I've lost my patience. Bye."]
FACT_TEXT = {
    "email": ["My email is {email}.", "It's {email}.", "Email: {email}"],
    "zip": ["My zip code is {zip}.", "Zip is {zip}.", "The zip code is {zip}."],
    "order_id": ["The order number is #{order_id}.", "It's order #{order_id}.", "Order #{order_id}."],
    "item": ["It's the {items}.", "The {items}.", "I mean the {items}."],
    "variant": ["I'd like the {options} one.", "{options}, please.", "The {options} variant."],
    "address": ["The new address is {address}.", "Please use {address}.", "Ship it to {address}."],
    "name": ["My name is {name}.", "I'm {name}.", "{name}."],
}


def describe_options(options: dict[str, str]) -> str:
    return " ".join(str(v) for v in options.values())


def format_address(a: dict[str, str]) -> str:
    return f"{a['street']}, {a['city']}, {a['state']} {a['zip_code']}"


def goal_opening(goal: dict[str, Any]) -> str:
    """The canonical (seed 0, first template) description of a goal, also used to restate it."""
    return _opening(goal, 0)


def _opening(goal: dict[str, Any], choice: int) -> str:
    templates = OPENINGS[goal["opening"]]
    text = templates[choice % len(templates)]
    return text.format(items=" and ".join(goal["item_names"]), dimension=goal.get("dimension") or "variant")


class ScriptedCustomer:
    """The deterministic customer of the retail domain (see module docstring)."""

    def __init__(self, customer: dict[str, Any], goals: list[dict[str, Any]], rng: random.Random) -> None:
        self.customer = customer
        self.persona = customer["persona"]
        self.goals = goals
        self.rng = rng
        self.goal_index = 0
        self.given: set[tuple[str, str]] = set()
        self.facts_seen: set[tuple[int, int]] = set()
        self._frustration = 0
        self._last_state: dict[str, Any] | None = None

    @property
    def frustration(self) -> int:
        return self._frustration

    @property
    def goal(self) -> dict[str, Any]:
        return self.goals[self.goal_index]

    def _pick(self, templates: list[str], **kw: str) -> str:
        return self.rng.choice(templates).format(**kw)

    def _fact(self, key: str) -> str | None:
        goal, c = self.goal, self.customer
        values = {
            "email": c["email"], "zip": c["zip_code"], "name": c["name"], "order_id": goal["order_id"],
            "items": " and ".join(goal["item_names"]),
            "options": describe_options(goal["variant_options"]) if goal.get("variant_options") else None,
            "address": format_address(goal["new_address"]) if goal.get("new_address") else None,
        }
        needed = {"item": "items", "variant": "options", "address": "address"}.get(key, key)
        if values.get(needed) is None:
            return None
        return self._pick(FACT_TEXT[key], **{k: v for k, v in values.items() if v is not None})

    def start(self) -> str:
        prefix = self.rng.choice(STYLE_PREFIX[self.persona["style"]])
        text = prefix + _opening(self.goal, self.rng.randrange(3))
        if self.persona.get("upfront_order_id"):
            text += f" The order number is #{self.goal['order_id']}."
            self.given.add(("order_id", self.goal["order_id"]))
        return text

    # -- understanding the agent ---------------------------------------------------------------
    @staticmethod
    def requested(text: str) -> list[str]:
        sentences = re.split(r"(?<=[.!?\n])\s+", text.lower())
        asked: list[str] = []
        for sentence in sentences:
            if not REQUEST_CUE.search(sentence):
                continue
            asked += [key for key, pattern in ASKS.items() if pattern.search(sentence) and key not in asked]
        return asked

    @staticmethod
    def proposed(text: str) -> list[str]:
        """The actions an agent message proposes, the last-mentioned first.

        "The refund is over the limit, shall I escalate it?" proposes the escalation: the question
        usually ends with the action being asked about.
        """
        lower = text.lower()
        if not _PROPOSAL_CUE.search(lower):
            return []
        last = {action: max(m.start() for m in pattern.finditer(lower))
                for action, pattern in _ACTIONS.items() if pattern.search(lower)}
        if "store_credit" in last:
            last.pop("refund", None)  # "instead of a refund, store credit" proposes store credit
        return sorted(last, key=lambda a: -last[a])

    def _new_facts(self, text: str) -> bool:
        lower, new = text.lower(), False
        for gi, goal in enumerate(self.goals[: self.goal_index + 1]):
            for fi, alternatives in enumerate(goal["facts"]):
                if (gi, fi) not in self.facts_seen and any(a.lower() in lower for a in alternatives):
                    self.facts_seen.add((gi, fi))
                    new = True
        return new

    def goal_met(self, state: dict[str, Any], index: int | None = None) -> bool:
        index = self.goal_index if index is None else index
        goal = self.goals[index]
        done = all(state.get(k) == v for k, v in goal["changes"].items())
        told = all((index, fi) in self.facts_seen for fi in range(len(goal["facts"])))
        return done and told

    # -- the reply -----------------------------------------------------------------------------
    def respond(self, agent_text: str, state: dict[str, Any]) -> SimulatorReply:
        progress = self._new_facts(agent_text)
        if self._last_state is not None and state != self._last_state:
            progress = True
        self._last_state = dict(state)
        parts: list[str] = []
        annoyed = False  # at most one frustration point per agent message
        for key in self.requested(agent_text):
            fact = self._fact(key)
            if fact is None:
                continue
            value = self.goal["order_id"] if key == "order_id" else key
            if (key, value) in self.given:
                annoyed = True
                parts.append(self._pick(ALREADY, fact=fact))
            else:
                self.given.add((key, value))
                parts.append(fact)
                progress = True
        confirmed = None
        proposals = self.proposed(agent_text)
        if proposals:
            accepted = [a for a in proposals if a in self.goal["accept"]]
            if accepted:
                confirmed = accepted[0]
                parts.append(self.rng.choice(ACCEPT))
                progress = True
            else:
                annoyed = True
                parts.append(self._pick(REJECT, goal=goal_opening(self.goal)))
        if self.goal_met(state):
            if self.goal_index + 1 < len(self.goals):
                self.goal_index += 1
                self._new_facts(agent_text)
                if self.persona.get("upfront_order_id"):
                    self.given.add(("order_id", self.goal["order_id"]))
                opening = _opening(self.goal, self.rng.randrange(3))
                if self.persona.get("upfront_order_id"):
                    opening += f" That's order #{self.goal['order_id']}."
                return SimulatorReply(self._pick(NEXT_GOAL, opening=opening[0].lower() + opening[1:]))
            return SimulatorReply(self.rng.choice(GOODBYE), stop="resolved")
        if annoyed or not progress:
            self._frustration += 1
        if self._frustration >= self.persona["patience"]:
            return SimulatorReply(self.rng.choice(LEAVE), stop="user_left")
        if not progress:
            parts.append(self._pick(NUDGE, goal=goal_opening(self.goal)))
        if not parts:
            parts.append(self.rng.choice(ACK))
        return SimulatorReply(" ".join(parts), confirmed_action=confirmed)
