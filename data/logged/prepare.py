"""Regenerate the sample of logged conversations that `turnwise score` is demonstrated and tested on.

    python data/logged/prepare.py            # writes data/logged/sample_conversations.jsonl and
                                             # data/logged/sop_warranty_claims.jsonl

Each line is one chat-format conversation: ``{"messages": [...], "task_id": ..., "seed": ..., "policy":
...}``, as a production log would hold it (no environment info, no outcome). They are played by the
oracle and by every scripted hacking policy of `rewards.hacks` on test tasks, so the sample shows what
the reward says about good and bad agents. Two lines carry no task id: their outcome is unknown, and
only the rule scorers apply. Everything is deterministic: the same code gives the same file.

``sop_warranty_claims.jsonl`` does the same for the SOP folder ``sop:data/sop/warranty_claims``
(``turnwise score data/logged/sop_warranty_claims.jsonl --env sop:data/sop/warranty_claims``): the
oracle, and agents that answer one field wrong, wrap the JSON in prose, break it, never answer, or
call a tool with a wrong argument.

``formats/`` holds the same three customer-service conversations in each format turnwise reads
(``turnwise.jsonl``, ``openai.jsonl``, ``bedrock.jsonl``; :mod:`pipeline.conversations`): the oracle, an
agent that skips identity verification, and one whose tool calls use single quotes (malformed: each comes
back as a tool error). ``turnwise score`` gives each file the same breakdowns.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from pipeline.envs import load_tasks, make_env  # noqa: E402
from pipeline.rollout import run_policy  # noqa: E402
from rewards.hacks import policy_factory  # noqa: E402

OUT = Path(__file__).resolve().parent / "sample_conversations.jsonl"
SOP_ENV = "sop:data/sop/warranty_claims"
SOP_OUT = Path(__file__).resolve().parent / "sop_warranty_claims.jsonl"
FORMATS_DIR = Path(__file__).resolve().parent / "formats"
#: The hacking policies whose conversations the sample log holds, two each, in this order.
HACK_ORDER = ("tool_spam", "resolve_no_action", "claim_no_tool", "politeness_spam", "ask_everything",
              "skip_verification", "empty_reply", "echo_customer")


def build(seed: int = 0) -> list[dict]:
    tasks = load_tasks("customer_service", "test")
    rows = []
    plan = [("oracle", tasks[i]) for i in range(8)]
    plan += [(name, tasks[8 + 2 * j + i]) for j, name in enumerate(HACK_ORDER) for i in range(2)]
    for policy, task in plan:
        trajectory = run_policy(make_env(task), task, policy_factory(policy)(task, seed), seed=seed)
        rows.append({"task_id": task.id, "seed": seed, "policy": policy, "messages": trajectory.messages})
    for policy, task in (("oracle", tasks[30]), ("claim_no_tool", tasks[31])):  # logged without a task id
        trajectory = run_policy(make_env(task), task, policy_factory(policy)(task, seed), seed=seed)
        rows.append({"policy": policy, "messages": trajectory.messages})
    return rows


class _SopAgent:
    """The SOP oracle with one scripted flaw (``kind``), for the SOP sample."""

    def __init__(self, task, kind: str) -> None:
        from pipeline.envs import oracle_policy

        self.oracle, self.kind = oracle_policy(task), kind

    def __call__(self, messages: list[dict]) -> str:
        if self.kind == "never_answers":
            return "I have reviewed the claim and everything looks in order."
        reply = self.oracle(messages)
        if not reply.startswith("<final_output>"):
            if self.kind == "wrong_argument" and sum(m["role"] == "assistant" for m in messages) == 0:
                return reply.replace('"serial_number": "', '"serial_number": "X')
            return reply
        body = reply[len("<final_output>"): -len("</final_output>")]
        if self.kind == "wrong_decision":
            fields = json.loads(body)
            fields["decision"] = "escalate" if fields["decision"] != "escalate" else "deny"
            return "<final_output>" + json.dumps(fields) + "</final_output>"
        if self.kind == "json_in_prose":
            return f"All SOP steps are done.\n<final_output>My decision: {body}. Thank you.</final_output>"
        if self.kind == "malformed_json":
            return "<final_output>" + body.replace('", "', '" "', 1) + "</final_output>"
        return reply


SOP_KINDS = ("oracle", "wrong_decision", "json_in_prose", "malformed_json", "never_answers", "wrong_argument")


def build_sop(seed: int = 0) -> list[dict]:
    """Two conversations per kind of agent on the SOP test split, and one without a task id."""
    tasks = load_tasks(SOP_ENV, "test")
    rows = []
    for j, kind in enumerate(SOP_KINDS):
        for task in tasks[2 * j: 2 * j + 2]:
            trajectory = run_policy(make_env(task, max_turns=8), task, _SopAgent(task, kind), seed=seed)
            rows.append({"task_id": task.id, "seed": seed, "policy": kind, "messages": trajectory.messages})
    task = tasks[len(SOP_KINDS) * 2]
    trajectory = run_policy(make_env(task, max_turns=8), task, _SopAgent(task, "oracle"), seed=seed)
    rows.append({"policy": "oracle", "messages": trajectory.messages})
    return rows


def build_formats(seed: int = 0) -> list[dict]:
    """Three conversations for the format files: an oracle, a skipped verification, malformed calls."""
    from rewards.audit import FormatProbe

    tasks = load_tasks("customer_service", "test")
    rows = []
    for policy, task in (("oracle", tasks[0]), ("skip_verification", tasks[1]), ("single_quotes", tasks[2])):
        agent = FormatProbe(task, policy) if policy == "single_quotes" else policy_factory(policy)(task, seed)
        trajectory = run_policy(make_env(task), task, agent, seed=seed)
        rows.append({"task_id": task.id, "seed": seed, "policy": policy, "messages": trajectory.messages})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    for rows, out in ((build(args.seed), args.out), (build_sop(args.seed), SOP_OUT)):
        out.write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))
        print(f"wrote {len(rows)} conversations to {out}")
    from pipeline.conversations import FORMATS, write_conversations

    rows = build_formats(args.seed)
    FORMATS_DIR.mkdir(exist_ok=True)
    for fmt in FORMATS:
        path = write_conversations(rows, FORMATS_DIR / f"{fmt}.jsonl", fmt)
        print(f"wrote {len(rows)} conversations to {path} ({fmt} format)")


if __name__ == "__main__":
    main()
