"""Scripted experts for SOP domains.

An SOP folder is data, but an expert that follows its procedure is code, so oracles are written per
domain and registered in :data:`ORACLES` by the folder's ``metadata.json`` name. Each one solves its
task through the same text interface a model uses: it calls the tools with ``<tool_call>`` blocks,
reads their JSON results from the conversation, and writes ``<final_output>``. It never reads the
expected outputs, so its success rate checks that the data, the tools and the SOP agree.

Oracles are stateless: each call re-reads the whole conversation.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from pipeline.chat import format_tool_call, parse_tool_message
from pipeline.envs.base import Task
from pipeline.envs.sop.env import FINAL_CLOSE, FINAL_OPEN

Policy = Callable[[list[dict]], str]


def tool_results(messages: list[dict]) -> dict[str, dict]:
    """The latest tool-message body per tool name (``{"ok": ..., "result"|"error": ...}``)."""
    seen = {}
    for message in messages:
        body = parse_tool_message(message)
        if body is not None and body.get("tool"):
            seen[body["tool"]] = body
    return seen


def final_output(**fields: Any) -> str:
    return FINAL_OPEN + json.dumps(fields) + FINAL_CLOSE


class _Call(Exception):
    """Control flow: the next step is this tool call (its result is not in the conversation yet)."""

    def __init__(self, text: str) -> None:
        self.text = text


class SopOracle:
    """Base for a domain's oracle: write :meth:`decide` as the SOP, calling :meth:`ask` for each tool result."""

    def __init__(self, task: Task) -> None:
        self.task = task
        self.inputs = task.payload["inputs"]

    def __call__(self, messages: list[dict]) -> str:
        self._seen = tool_results(messages)
        try:
            return self.decide()
        except _Call as call:
            return call.text

    def ask(self, tool: str, **arguments: Any) -> dict:
        """The tool's result body if the conversation has it; otherwise this turn calls the tool."""
        body = self._seen.get(tool)
        if body is None:
            raise _Call(format_tool_call(tool, arguments))
        return body

    def result(self, tool: str, **arguments: Any) -> dict:
        body = self.ask(tool, **arguments)
        if not body.get("ok"):
            raise RuntimeError(f"{tool} failed on task {self.task.id}: {body.get('error')}")
        return body["result"]

    def decide(self) -> str:
        raise NotImplementedError


class WarrantyClaimsOracle(SopOracle):
    """data/sop/warranty_claims/sop.md, step by step."""

    def decide(self) -> str:
        serial, claim_date = self.inputs["serial_number"], self.inputs["claim_date"]
        registration = self.ask("lookup_registration", serial_number=serial)
        if not registration["ok"]:
            return final_output(decision="deny", reason_code="UNKNOWN_SERIAL", recall_id="N/A")
        model = registration["result"]["model_code"]
        issue = self.result("lookup_issue_code", issue_code=self.inputs["issue_code"])
        recall = self.result("check_recall", model_code=model)
        if recall["recall_active"] == "yes" and issue["category"] == "defect" \
                and issue["component"] == recall["recall_component"]:
            return final_output(decision="approve_replacement", reason_code="RECALL", recall_id=recall["recall_id"])
        if issue["category"] in ("cosmetic", "wear"):
            return final_output(decision="deny", reason_code="NOT_COVERED", recall_id="N/A")
        if claim_date > registration["result"]["warranty_end"]:
            return final_output(decision="deny", reason_code="OUT_OF_WARRANTY", recall_id="N/A")
        terms = self.result("get_model_terms", model_code=model)
        if issue["category"] == "accidental" and terms["accidental_damage_covered"] != "yes":
            return final_output(decision="deny", reason_code="NOT_COVERED", recall_id="N/A")
        prior = int(self.result("get_claim_history", serial_number=serial)["prior_claims"])
        if prior >= int(terms["max_claims"]):
            return final_output(decision="escalate", reason_code="CLAIM_LIMIT", recall_id="N/A")
        if issue["category"] == "defect":
            if prior >= 1:
                return final_output(decision="approve_replacement", reason_code="REPEAT_DEFECT", recall_id="N/A")
            return final_output(decision="approve_repair", reason_code="IN_WARRANTY", recall_id="N/A")
        return final_output(decision="approve_repair", reason_code="ACCIDENTAL_COVERED", recall_id="N/A")


#: Oracles by SOP domain name (``metadata.json`` ``name``).
ORACLES: dict[str, type[SopOracle]] = {"warranty_claims": WarrantyClaimsOracle}


def oracle_policy(task: Task) -> Policy:
    name = task.payload.get("name")
    if name not in ORACLES:
        raise ValueError(f"No oracle for the SOP domain {name!r} ({task.payload.get('folder')}); oracles exist for "
                         f"{', '.join(sorted(ORACLES))}. Write a SopOracle subclass that follows its SOP and add it "
                         "to ORACLES in pipeline/envs/sop/oracle.py.")
    return ORACLES[name](task)
