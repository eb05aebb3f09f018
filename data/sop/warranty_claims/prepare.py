"""Generate the warranty-claims SOP domain from a seed, in the SOP-Bench folder format.

    python data/sop/warranty_claims/prepare.py             # rewrites this folder's generated files
    python data/sop/warranty_claims/prepare.py --seed 7 --out /tmp/warranty_claims

A claim names a device by serial number, an issue code and a claim date; the agent looks the device,
the issue, the model's recall, the model's warranty terms and the device's claim history up with five
tools, and decides the claim by ``sop.md`` (hand-written; the only file here that this script does not
write). Every tool is a declarative ``x-csv-lookup`` over one of the fixture CSVs, so the domain runs
without trusting any code.

Claims are drawn scenario by scenario (fixed counts in ``SCENARIOS``) so that every branch of the SOP
is well represented, including the traps: a recall that applies even out of warranty or over the claim
limit, a closed recall, a recall of another component, a battery worn by age rather than defective, an
accidental-damage claim out of warranty, and notes in which the customer argues for another outcome.
The expected outputs are then computed by :func:`decide`, the SOP written as code over the raw tables,
independently of the oracle (which reads the same facts from tool results).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import random
from datetime import date, timedelta
from pathlib import Path

HERE = Path(__file__).resolve().parent

# code, name, warranty months, accidental damage covered, claims allowed per device
MODELS = [
    ("AX1", "Aurora X1 phone", 12, "no", 2),
    ("AX2", "Aurora X2 phone", 24, "yes", 3),
    ("NB5", "Nimbus 5 laptop", 24, "no", 2),
    ("NB7", "Nimbus 7 laptop", 36, "yes", 3),
    ("TB3", "Tempo 3 tablet", 12, "yes", 2),
    ("EB1", "Echo buds", 12, "no", 2),
    ("WT2", "Wristwatch 2", 24, "no", 2),
    ("SP4", "Sonic 4 speaker", 24, "yes", 2),
]
# model -> (recall active, recall id, recalled component); models not listed never had a recall
RECALLS = {
    "AX1": ("yes", "RC-2301", "battery"),
    "NB5": ("yes", "RC-2317", "hinge"),
    "TB3": ("yes", "RC-2402", "charging_port"),
    "AX2": ("no", "RC-2109", "screen"),  # closed: no longer applies
    "WT2": ("no", "RC-2204", "battery"),  # closed
}
# code, category, component, description
ISSUES = [
    ("E-BAT-01", "defect", "battery", "Battery swells or will not hold a charge"),
    ("W-BAT-09", "wear", "battery", "Battery capacity reduced by normal ageing"),
    ("E-SCR-02", "defect", "screen", "Dead pixels or flicker without any impact"),
    ("A-SCR-07", "accidental", "screen", "Screen cracked after a drop"),
    ("E-HNG-03", "defect", "hinge", "Hinge loose or broken without any impact"),
    ("E-CHG-04", "defect", "charging_port", "Charging port does not charge"),
    ("A-LIQ-05", "accidental", "body", "Liquid damage"),
    ("E-SPK-06", "defect", "speaker", "Speaker crackles or is silent"),
    ("C-SCF-08", "cosmetic", "body", "Scratches or scuffs on the casing"),
    ("C-COL-10", "cosmetic", "body", "Discoloured casing"),
    ("W-BTN-11", "wear", "buttons", "Buttons worn from use"),
    ("A-DNT-12", "accidental", "body", "Casing dented after a drop"),
    ("E-BOOT-13", "defect", "software", "Device fails to start after an update"),
]
NOTES = {
    "defect": ["It just stopped working properly. {desc}.", "{desc}. I have always handled it carefully.",
               "{desc}, and it is barely a year old.", "Please help: {desc}."],
    "accidental": ["{desc}. It slipped out of my hand.", "{desc}; I think it is really a manufacturing defect.",
                   "My kid knocked it over. {desc}."],
    "cosmetic": ["{desc}. It looks terrible, I want a new one.", "{desc}. Please replace it under warranty."],
    "wear": ["{desc}. It should last longer than this.", "{desc}; it is surely a defect."],
}
# scenario -> number of claims; 240 in all
SCENARIOS = {
    "unknown_serial": 16, "recall": 30, "recall_trap": 16, "not_covered_kind": 26, "out_of_warranty": 32,
    "accidental_not_covered": 24, "claim_limit": 24, "repeat_defect": 24, "in_warranty": 28, "accidental_covered": 20,
}
FIRST_PURCHASE, LAST_PURCHASE = date(2022, 1, 1), date(2025, 3, 31)

INPUT_COLUMNS = ["claim_id", "serial_number", "claim_date", "issue_code", "customer_note"]
OUTPUT_COLUMNS = ["decision", "reason_code", "recall_id"]
NOT_APPLICABLE = "N/A"


def decide(registration: dict | None, issue: dict, recall: dict, model: dict, prior_claims: int,
           claim_date: str) -> tuple[str, str, str]:
    """The SOP (``sop.md``) as code over the raw rows: ``(decision, reason_code, recall_id)``."""
    if registration is None:
        return "deny", "UNKNOWN_SERIAL", NOT_APPLICABLE
    if recall["recall_active"] == "yes" and issue["category"] == "defect" \
            and issue["component"] == recall["recall_component"]:
        return "approve_replacement", "RECALL", recall["recall_id"]
    if issue["category"] in ("cosmetic", "wear"):
        return "deny", "NOT_COVERED", NOT_APPLICABLE
    if claim_date > registration["warranty_end"]:
        return "deny", "OUT_OF_WARRANTY", NOT_APPLICABLE
    if issue["category"] == "accidental" and model["accidental_damage_covered"] != "yes":
        return "deny", "NOT_COVERED", NOT_APPLICABLE
    if prior_claims >= int(model["max_claims"]):
        return "escalate", "CLAIM_LIMIT", NOT_APPLICABLE
    if issue["category"] == "defect":
        if prior_claims >= 1:
            return "approve_replacement", "REPEAT_DEFECT", NOT_APPLICABLE
        return "approve_repair", "IN_WARRANTY", NOT_APPLICABLE
    return "approve_repair", "ACCIDENTAL_COVERED", NOT_APPLICABLE


def add_months(day: date, months: int) -> date:
    month = day.month - 1 + months
    return date(day.year + month // 12, month % 12 + 1, min(day.day, 28))


class Builder:
    """Draws claims scenario by scenario; holds the counters that keep serial numbers unique."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.serials: set[str] = set()
        self.models = {m[0]: {"model_code": m[0], "model_name": m[1], "warranty_months": m[2],
                              "accidental_damage_covered": m[3], "max_claims": m[4]} for m in MODELS}
        self.recalls = {code: dict(zip(("recall_active", "recall_id", "recall_component"), RECALLS.get(code, ("no", "", ""))))
                        for code in self.models}
        self.issues = {i[0]: dict(zip(("issue_code", "category", "component", "description"), i)) for i in ISSUES}

    def serial(self, model: str) -> str:
        while True:
            serial = f"{model}-{self.rng.randint(100000, 999999)}"
            if serial not in self.serials:
                self.serials.add(serial)
                return serial

    def recall_applies(self, model: str, issue: str) -> bool:
        recall, kind = self.recalls[model], self.issues[issue]
        return recall["recall_active"] == "yes" and kind["category"] == "defect" \
            and kind["component"] == recall["recall_component"]

    def pick_issue(self, model: str, *categories: str) -> str:
        codes = [c for c, i in self.issues.items() if i["category"] in categories and not self.recall_applies(model, c)]
        return self.rng.choice(codes)

    def plan(self, scenario: str) -> dict:
        """The facts of one claim: model, issue, in or out of warranty, prior claims, registered or not."""
        rng = self.rng
        models = sorted(self.models)
        model = rng.choice(models)
        limit = self.models[model]["max_claims"]
        plan = {"registered": True, "in_warranty": True, "prior": 0}
        if scenario == "unknown_serial":
            plan.update(registered=False, issue=rng.choice(sorted(self.issues)))
        elif scenario == "recall":
            model = rng.choice([m for m in models if self.recalls[m]["recall_active"] == "yes"])
            component = self.recalls[model]["recall_component"]
            issue = next(c for c, i in self.issues.items() if i["category"] == "defect" and i["component"] == component)
            limit = self.models[model]["max_claims"]
            plan.update(issue=issue, in_warranty=rng.random() < 0.5, prior=rng.randint(0, limit + 1))
        elif scenario == "recall_trap":
            model = rng.choice([m for m in models if self.recalls[m]["recall_id"]])
            component = self.recalls[model]["recall_component"]
            same = [c for c, i in self.issues.items() if i["component"] == component and not self.recall_applies(model, c)]
            plan.update(issue=rng.choice(same or [self.pick_issue(model, "defect")]))
        elif scenario == "not_covered_kind":
            plan.update(issue=self.pick_issue(model, "cosmetic", "wear"), in_warranty=rng.random() < 0.7,
                        prior=rng.randint(0, limit))
        elif scenario == "out_of_warranty":
            plan.update(issue=self.pick_issue(model, "defect", "accidental"), in_warranty=False,
                        prior=rng.randint(0, limit + 1))
        elif scenario == "accidental_not_covered":
            model = rng.choice([m for m in models if self.models[m]["accidental_damage_covered"] == "no"])
            limit = self.models[model]["max_claims"]
            plan.update(issue=self.pick_issue(model, "accidental"), prior=rng.randint(0, limit + 1))
        elif scenario == "claim_limit":
            covered = self.models[model]["accidental_damage_covered"] == "yes"
            plan.update(issue=self.pick_issue(model, "defect", *(["accidental"] if covered else [])),
                        prior=rng.randint(limit, limit + 2))
        elif scenario == "repeat_defect":
            plan.update(issue=self.pick_issue(model, "defect"), prior=rng.randint(1, limit - 1))
        elif scenario == "in_warranty":
            plan.update(issue=self.pick_issue(model, "defect"))
        elif scenario == "accidental_covered":
            model = rng.choice([m for m in models if self.models[m]["accidental_damage_covered"] == "yes"])
            limit = self.models[model]["max_claims"]
            plan.update(issue=self.pick_issue(model, "accidental"), prior=rng.randint(0, limit - 1))
        else:
            raise ValueError(f"unknown scenario {scenario!r}")
        plan["model"] = model
        return plan

    def claim(self, claim_id: str, plan: dict) -> tuple[dict, dict | None, dict | None]:
        """One claim row (inputs and expected outputs), its registration row and its history row."""
        rng = self.rng
        model = self.models[plan["model"]]
        purchase = FIRST_PURCHASE + timedelta(days=rng.randint(0, (LAST_PURCHASE - FIRST_PURCHASE).days))
        warranty_end = add_months(purchase, model["warranty_months"])
        if plan["in_warranty"]:
            # The last day of the warranty still counts: about one claim in ten lands on it.
            claim_date = warranty_end if rng.random() < 0.1 else \
                purchase + timedelta(days=rng.randint(10, (warranty_end - purchase).days))
        else:
            claim_date = warranty_end + timedelta(days=1 if rng.random() < 0.1 else rng.randint(2, 400))
        serial = self.serial(model["model_code"])
        registration = {"serial_number": serial, "model_code": model["model_code"], "purchase_date": str(purchase),
                        "warranty_end": str(warranty_end)} if plan["registered"] else None
        history = None
        if plan["registered"]:
            last = "" if not plan["prior"] else str(purchase + timedelta(days=rng.randint(1, (claim_date - purchase).days - 1)))
            history = {"serial_number": serial, "prior_claims": str(plan["prior"]), "last_claim_date": last}
        issue = self.issues[plan["issue"]]
        note = rng.choice(NOTES[issue["category"]]).format(desc=issue["description"])
        decision, reason, recall_id = decide(registration, issue, self.recalls[model["model_code"]], model, plan["prior"],
                                             str(claim_date))
        row = {"claim_id": claim_id, "serial_number": serial, "claim_date": str(claim_date),
               "issue_code": issue["issue_code"], "customer_note": note,
               "decision": decision, "reason_code": reason, "recall_id": recall_id}
        return row, registration, history


def generate(seed: int = 0) -> dict[str, str]:
    """Every generated file of the folder, by name, as text."""
    builder = Builder(seed)
    scenarios = [s for s, count in SCENARIOS.items() for _ in range(count)]
    builder.rng.shuffle(scenarios)
    claims, registrations, histories = [], [], []
    for n, scenario in enumerate(scenarios):
        row, registration, history = builder.claim(f"WC-{10001 + n}", builder.plan(scenario))
        claims.append(row)
        registrations += [registration] if registration else []
        histories += [history] if history else []
    registrations.sort(key=lambda r: r["serial_number"])
    histories.sort(key=lambda r: r["serial_number"])
    models = [{**m, "warranty_months": str(m["warranty_months"]), "max_claims": str(m["max_claims"])}
              for m in builder.models.values()]
    recalls = [{"model_code": code, **recall} for code, recall in builder.recalls.items()]
    return {
        "metadata.json": _json(metadata()),
        "toolspecs.json": _json(toolspecs()),
        "test_set_with_outputs.csv": _csv(claims, INPUT_COLUMNS + OUTPUT_COLUMNS),
        "registrations.csv": _csv(registrations, ["serial_number", "model_code", "purchase_date", "warranty_end"]),
        "issue_codes.csv": _csv(list(builder.issues.values()), ["issue_code", "category", "component", "description"]),
        "recalls.csv": _csv(recalls, ["model_code", "recall_active", "recall_id", "recall_component"]),
        "product_models.csv": _csv(models, ["model_code", "model_name", "warranty_months", "accidental_damage_covered",
                                            "max_claims"]),
        "claim_history.csv": _csv(histories, ["serial_number", "prior_claims", "last_claim_date"]),
    }


def metadata() -> dict:
    return {"name": "warranty_claims", "input_columns": INPUT_COLUMNS, "output_columns": OUTPUT_COLUMNS,
            "id_column": "claim_id", "intent_column": "reason_code"}


def toolspecs() -> list[dict]:
    """The five tools, each a declarative CSV lookup (no tools.py, so no code to trust)."""

    def spec(name: str, description: str, argument: str, argument_help: str, file: str, returns: list[str]) -> dict:
        return {"toolSpec": {
            "name": name,
            "description": description,
            "inputSchema": {"json": {"type": "object",
                                     "properties": {argument: {"type": "string", "description": argument_help}},
                                     "required": [argument], "additionalProperties": False}},
            "x-csv-lookup": {"file": file, "match": {argument: argument}, "return": returns},
        }}

    serial_help = "The device's serial number, exactly as on the claim (e.g. AX1-123456)."
    model_help = "The product model code from the device's registration (e.g. AX1)."
    return [
        spec("lookup_registration", "Find the registration of a device: its model, purchase date and the last day "
             "of its warranty. Fails when no registration matches the serial number.", "serial_number", serial_help,
             "registrations.csv", ["model_code", "purchase_date", "warranty_end"]),
        spec("lookup_issue_code", "Classify an issue code: its category (defect, accidental, cosmetic or wear), "
             "the component concerned and a description.", "issue_code", "The issue code on the claim (e.g. E-BAT-01).",
             "issue_codes.csv", ["category", "component", "description"]),
        spec("check_recall", "The recall status of a product model: whether a recall is active, its id and the "
             "component it covers.", "model_code", model_help, "recalls.csv",
             ["recall_active", "recall_id", "recall_component"]),
        spec("get_model_terms", "The warranty terms of a product model: whether accidental damage is covered and how "
             "many claims one device may make.", "model_code", model_help, "product_models.csv",
             ["model_name", "accidental_damage_covered", "max_claims"]),
        spec("get_claim_history", "The warranty claims a device has made before this one.", "serial_number",
             serial_help, "claim_history.csv", ["prior_claims", "last_claim_date"]),
    ]


def _json(value) -> str:
    return json.dumps(value, indent=2) + "\n"


def _csv(rows: list[dict], columns: list[str]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE, help="folder to write (default: this one)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    files = generate(args.seed)
    for name, text in files.items():
        (args.out / name).write_text(text)
    if args.out.resolve() != HERE:  # the SOP is hand-written, not generated: copy it
        (args.out / "sop.md").write_text((HERE / "sop.md").read_text())
    print(f"wrote {len(files)} files to {args.out}")


if __name__ == "__main__":
    main()
