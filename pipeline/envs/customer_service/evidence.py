"""What the reward's rule scorers need to know about the retail domain (:class:`~pipeline.envs.EvidenceRules`).

The claims an agent makes to a customer ("your order has been cancelled", "the tracking number is ...",
"it was delivered") are checked against what the tools showed; these rules say which tools support
which claim, which statuses exist, and which identifiers must come from a tool. The patterns for what
the agent asks the customer for are the scripted customer's own (:mod:`.customer`), so the redundant-
request scorer and the customer always agree on what counts as asking.
"""

from __future__ import annotations

from pipeline.envs.customer_service.customer import ASKS, REQUEST_CUE
from pipeline.envs.customer_service.tools import RetailTools
from pipeline.envs.registry import EvidenceRules

_I_HAVE = r"\b(?:i(?:'ve| have)|we(?:'ve| have))\s+(?:\w+ly\s+|already\s+|just\s+)?"
_CHANGES = ("cancel_order", "refund_items", "exchange_item", "update_shipping_address", "issue_store_credit",
            "escalate_to_human")

#: (claim kind, pattern, tools whose successful result supports it)
ACTION_CLAIMS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("cancellation", r"\b(?:has|have) been cancel+ed|" + _I_HAVE + r"cancel+ed|\bis now cancel+ed",
     ("cancel_order",)),
    ("refund", r"\b(?:has|have) been refunded|" + _I_HAVE + r"(?:refunded|issued (?:a|the|your) refund|processed "
     r"(?:a|the|your) refund)|\brefund (?:has been|was) (?:issued|processed|completed)", ("refund_items", "cancel_order")),
    ("exchange", r"\b(?:has|have) been exchanged|" + _I_HAVE + r"(?:exchanged|swapped)|\bexchange (?:has been|is|was) "
     r"(?:placed|processed|requested|completed|done)", ("exchange_item",)),
    ("address change", r"\baddress (?:has been|was|is now) (?:updated|changed)|\bwill now ship to|" + _I_HAVE +
     r"(?:updated|changed) (?:the|your) (?:shipping |delivery )?address", ("update_shipping_address",)),
    ("store credit", r"\bstore credit (?:has been|was) (?:added|issued)|(?:has|have) been (?:added|issued) (?:as|in) "
     r"store credit|in store credit has been added|" + _I_HAVE + r"(?:added|issued) [^.]{0,40}store credit",
     ("issue_store_credit",)),
    ("escalation", r"\b(?:has|have) been escalated|" + _I_HAVE + r"escalated|\bticket (?:id|number) is",
     ("escalate_to_human",)),
    ("resolution", r"\b(?:issue|problem|request|case|everything|matter) (?:has been|is|was) (?:now )?(?:fully )?"
     r"(?:resolved|fixed|taken care of|handled|sorted out|processed|completed)|" + _I_HAVE +
     r"(?:resolved|fixed|taken care of|handled|processed|completed) (?:it|this|that|your)|\byou(?:'re| are) all set\b",
     _CHANGES),
)

EVIDENCE = EvidenceRules(
    tool_names=tuple(name for name, fn in vars(RetailTools).items() if hasattr(fn, "__turnwise_tool__")),
    action_claims=ACTION_CLAIMS,
    status_pattern=(r"\b(?:is|was|are)\s+(?:still\s+|now\s+|already\s+)?(processing|shipped|delivered|cancel+ed)\b|"
                    r"\bhas\s+(?:already\s+)?(shipped)\b"),
    # A status claim is supported by any of these observed statuses (a delivered order has shipped).
    status_support={"processing": frozenset({"processing"}), "shipped": frozenset({"shipped", "delivered"}),
                    "delivered": frozenset({"delivered"}), "cancelled": frozenset({"cancelled"})},
    identifier_patterns=(("tracking number", r"tracking (?:number|no\.?|#|id)\s*(?:is|:)?\s*([A-Z0-9]{6,})"),
                         ("ticket id", r"\bTCK-[A-Z0-9-]+")),
    request_cue=REQUEST_CUE.pattern,
    request_keys={key: ASKS[key].pattern for key in ("email", "zip", "order_id", "address")},
    request_values={
        "email": r"[\w.+-]+@[\w-]+\.[\w.]+",
        "zip": r"\b\d{5}\b",
        "order_id": r"\b[A-Z]\d{6,}\b",
        "address": r"\b\d+ [A-Za-z][A-Za-z ]* (St|Ave|Rd|Blvd|Ln|Dr|Way|Ct|Pl|Street|Avenue|Road)\b",
    },
)
