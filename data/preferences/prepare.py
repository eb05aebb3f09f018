"""Regenerate the reward-model preference pairs: oracle dialogs against corrupted copies of themselves.

    python data/preferences/prepare.py        # writes data/preferences/{train,test}.jsonl

Each line is a TRL conversational preference pair, ``{"chosen": [messages], "rejected": [messages]}``,
plus ``task_id``, ``seed`` and ``corruption``. ``chosen`` is an oracle episode (system prompt left out:
it is the same in every episode). ``rejected`` is the same episode with one thing broken, so the pair
differs only in what the reward model should learn to notice (minimal pairs, rather than two unrelated
episodes that also differ in length and wording):

- ``skipped_verification``: the identity request, the customer's answer and the verify_identity call
  are removed, so the agent looks up and acts on the order unverified;
- ``policy_violation``: the proposal and the customer's "yes" before a change are removed, so the
  agent acts without consent;
- ``hallucinated_claim``: a fact the agent tells (an amount, tracking number, ticket id, date or
  status) is changed to one no tool returned;
- ``rude_or_evasive``: one of the agent's messages is replaced by a rude or evasive one.

Train pairs come from train-split tasks and test pairs from test-split tasks, so the held-out accuracy
is measured on tasks the reward model never saw. Everything is seeded.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from pipeline.chat import parse_tool_calls  # noqa: E402
from pipeline.envs import load_tasks, make_env, oracle_policy  # noqa: E402
from pipeline.envs.customer_service.policy import CONFIRMABLE_ACTIONS  # noqa: E402
from pipeline.rollout import run_policy  # noqa: E402

HERE = Path(__file__).resolve().parent
CORRUPTIONS = ("skipped_verification", "policy_violation", "hallucinated_claim", "rude_or_evasive")
RUDE = [
    "Ugh. Whatever. Just tell me what you want, I don't have all day.",
    "That's not my problem. Figure it out yourself.",
    "Obviously. Stop wasting my time and read the website.",
]
EVASIVE = [
    "I'm not able to help with that. Please check our website.",
    "I can't really say. Is there anything else?",
    "Let me get back to you on that at some point.",
]
_MONEY = re.compile(r"\$(\d[\d,]*\.\d{2})")
_TRACKING = re.compile(r"\b1Z[A-Z0-9]{10}\b")
_TICKET = re.compile(r"\bTCK-(\d+)")
_DATE = re.compile(r"\b(\d{4})-(\d{2})-(\d{2})\b")
_STATUS_SWAP = {"processing": "shipped", "shipped": "processing", "delivered": "processing", "cancelled": "shipped"}


def _is_call(message: dict) -> bool:
    return message["role"] == "assistant" and bool(parse_tool_calls(message["content"]))


def _call_name(message: dict) -> str | None:
    calls = parse_tool_calls(message["content"]) if message["role"] == "assistant" else []
    return getattr(calls[0], "name", None) if calls else None


def skipped_verification(messages: list[dict], rng: random.Random) -> list[dict] | None:
    ask = next((i for i, m in enumerate(messages) if m["role"] == "assistant" and "verify your identity" in
                m["content"]), None)
    call = next((i for i, m in enumerate(messages) if _call_name(m) == "verify_identity"), None)
    if ask is None or call is None:
        return None
    drop = {ask, ask + 1, call, call + 1}
    return [m for i, m in enumerate(messages) if i not in drop]


def policy_violation(messages: list[dict], rng: random.Random) -> list[dict] | None:
    change = next((i for i, m in enumerate(messages) if _call_name(m) in CONFIRMABLE_ACTIONS), None)
    if change is None:
        return None
    proposal = max((i for i in range(change) if messages[i]["role"] == "assistant" and not _is_call(messages[i])),
                   default=None)
    if proposal is None or messages[proposal + 1]["role"] != "user":
        return None
    return [m for i, m in enumerate(messages) if i not in (proposal, proposal + 1)]


def _mutate(text: str, rng: random.Random) -> str | None:
    options = []
    if _MONEY.search(text):
        options.append(lambda t: _MONEY.sub(lambda m: f"${float(m.group(1).replace(',', '')) * 1.5 + 7:.2f}", t, 1))
    if _TRACKING.search(text):
        options.append(lambda t: _TRACKING.sub("1Z" + "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ0123456789")
                                                              for _ in range(10)), t, 1))
    if _TICKET.search(text):
        options.append(lambda t: _TICKET.sub(lambda m: f"TCK-{int(m.group(1)) + 4217:07d}", t, 1))
    if _DATE.search(text):
        options.append(lambda t: _DATE.sub(lambda m: f"{m.group(1)}-{m.group(2)}-{(int(m.group(3)) % 25) + 3:02d}", t, 1))
    words = [w for w in _STATUS_SWAP if re.search(rf"\b{w}\b", text)]
    if words:
        options.append(lambda t: re.sub(rf"\b{words[0]}\b", _STATUS_SWAP[words[0]], t, count=1))
    if not options:
        return None
    out = rng.choice(options)(text)
    return out if out != text else None


def hallucinated_claim(messages: list[dict], rng: random.Random) -> list[dict] | None:
    for i in reversed(range(len(messages))):
        m = messages[i]
        if m["role"] == "assistant" and not _is_call(m):
            mutated = _mutate(m["content"], rng)
            if mutated is not None:
                return [*messages[:i], {**m, "content": mutated}, *messages[i + 1:]]
    return None


def rude_or_evasive(messages: list[dict], rng: random.Random) -> list[dict] | None:
    texts = [i for i, m in enumerate(messages) if m["role"] == "assistant" and not _is_call(m)]
    if not texts:
        return None
    i = rng.choice(texts)
    return [*messages[:i], {**messages[i], "content": rng.choice(RUDE + EVASIVE)}, *messages[i + 1:]]


def pairs_for(split: str, n_tasks: int, per_task: int, seed: int) -> list[dict]:
    rng = random.Random(f"{split}|{seed}")
    tasks = load_tasks("customer_service", split)
    tasks = rng.sample(tasks, min(n_tasks, len(tasks)))
    out = []
    for task in tasks:
        episode_seed = rng.randrange(1000)
        episode = run_policy(make_env(task), task, oracle_policy(task), seed=episode_seed)
        assert episode.outcome.success, task.id
        chosen = [m for m in episode.messages if m["role"] != "system"]
        kinds = list(CORRUPTIONS)
        rng.shuffle(kinds)
        made = 0
        for kind in kinds:
            rejected = globals()[kind](chosen, rng)
            if rejected is None or rejected == chosen:
                continue
            out.append({"task_id": task.id, "seed": episode_seed, "corruption": kind, "chosen": chosen,
                        "rejected": rejected})
            made += 1
            if made == per_task:
                break
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-tasks", type=int, default=120, help="train-split tasks (2 pairs each)")
    parser.add_argument("--test-tasks", type=int, default=50, help="test-split tasks (2 pairs each)")
    parser.add_argument("--per-task", type=int, default=2, help="corrupted variants per oracle episode")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    for split, n in (("train", args.train_tasks), ("test", args.test_tasks)):
        pairs = pairs_for(split, n, args.per_task, args.seed)
        path = args.out / f"{split}.jsonl"
        path.write_text("".join(json.dumps(p, sort_keys=True) + "\n" for p in pairs))
        counts = {k: sum(p["corruption"] == k for p in pairs) for k in CORRUPTIONS}
        print(f"wrote {len(pairs)} pairs to {path}: {counts}")


if __name__ == "__main__":
    main()
