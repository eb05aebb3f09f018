"""Regenerate the sample of logged conversations that `turnwise score` is demonstrated and tested on.

    python data/logged/prepare.py            # writes data/logged/sample_conversations.jsonl

Each line is one chat-format conversation: ``{"messages": [...], "task_id": ..., "seed": ..., "policy":
...}``, as a production log would hold it (no environment info, no outcome). They are played by the
oracle and by every scripted hacking policy of `rewards.hacks` on test tasks, so the sample shows what
the reward says about good and bad agents. Two lines carry no task id: their outcome is unknown, and
only the rule scorers apply. Everything is deterministic: the same code gives the same file.
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
from rewards.hacks import HACKS, policy_factory  # noqa: E402

OUT = Path(__file__).resolve().parent / "sample_conversations.jsonl"


def build(seed: int = 0) -> list[dict]:
    tasks = load_tasks("customer_service", "test")
    rows = []
    plan = [("oracle", tasks[i]) for i in range(8)]
    plan += [(name, tasks[8 + 2 * j + i]) for j, name in enumerate(HACKS) for i in range(2)]
    for policy, task in plan:
        trajectory = run_policy(make_env(task), task, policy_factory(policy)(task, seed), seed=seed)
        rows.append({"task_id": task.id, "seed": seed, "policy": policy, "messages": trajectory.messages})
    for policy, task in (("oracle", tasks[30]), ("claim_no_tool", tasks[31])):  # logged without a task id
        trajectory = run_policy(make_env(task), task, policy_factory(policy)(task, seed), seed=seed)
        rows.append({"policy": policy, "messages": trajectory.messages})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    rows = build(args.seed)
    args.out.write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))
    print(f"wrote {len(rows)} conversations to {args.out}")


if __name__ == "__main__":
    main()
