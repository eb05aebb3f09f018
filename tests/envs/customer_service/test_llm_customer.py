"""Tests for pipeline/envs/customer_service/llm_customer.py: the LLM customer with fake backends (no model, no network)."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from pipeline.envs import load_tasks, make_env, oracle_policy
from pipeline.llm import ScriptedBackend
from pipeline.rollout import run_policy
from pipeline.simulators import UserSimulator
from pipeline.envs.customer_service.llm_customer import DONE, LEAVE, LLMCustomer, LLMCustomerFactory, persona_prompt


@pytest.fixture(scope="module")
def tasks():
    return load_tasks("customer_service", "test")


def task_with(tasks, intent):
    return next(t for t in tasks if t.intents == [intent])


class FakeCustomerModel:
    """Plays a customer from nothing but its prompt, the way an instruct model would (crudely).

    It reads its facts from the system prompt and answers the agent's last message: identity when
    asked, the order number when asked, yes to a proposal, goodbye + [DONE] once told the outcome.
    """

    name = "fake"

    def __init__(self) -> None:
        self.prompts: list[list[dict]] = []

    def chat(self, messages, max_tokens=256, temperature=0.0):
        self.prompts.append(list(messages))
        system = messages[0]["content"]
        email = re.search(r"email (\S+),", system).group(1)
        zipcode = re.search(r"zip code (\d{5})", system).group(1)
        order = re.search(r"order number is (#W\d+)", system).group(1)
        agent = messages[-1]["content"].lower() if messages[-1]["role"] == "user" else ""
        if not agent or agent.startswith("(the support chat opens"):
            return re.search(r"^1\. (.*?) Facts you know", system, re.M).group(1)
        if "email" in agent:
            return f"Sure, it's {email} and my zip is {zipcode}."
        if "order number" in agent:
            return f"It's order {order}."
        if "would you like" in agent or "shall i" in agent:
            return "Yes, please go ahead."
        return f"Great, thanks. Bye! {DONE}"


def test_llm_customer_is_a_user_simulator(tasks):
    t = tasks[0]
    customer = LLMCustomer(ScriptedBackend(["Hi"]), t.payload["customer"], t.payload["goals"])
    assert isinstance(customer, UserSimulator)


def test_persona_prompt_carries_persona_goals_facts_and_allowed_actions(tasks):
    t = task_with(tasks, "address_change")
    customer, goal = t.payload["customer"], t.payload["goals"][0]
    prompt = persona_prompt(customer, t.payload["goals"])
    assert customer["name"] in prompt and customer["email"] in prompt and customer["zip_code"] in prompt
    assert f"#{goal['order_id']}" in prompt and goal["new_address"]["street"] in prompt
    assert "Actions you agree to: address." in prompt
    assert DONE in prompt and LEAVE in prompt


def test_the_oracle_solves_a_task_against_an_llm_customer(tasks):
    task = task_with(tasks, "cancel")
    model = FakeCustomerModel()
    env = make_env(task, customer=LLMCustomerFactory(model))
    trajectory = run_policy(env, task, oracle_policy(task))
    outcome = trajectory.outcome
    assert outcome.success and outcome.stop_reason == "resolved", outcome
    assert outcome.details["goals_met"] == 1 and outcome.details["frustration"] == 0
    # The model spoke every customer line, and the [DONE] marker never reached the agent.
    users = [m["content"] for m in trajectory.messages if m["role"] == "user"]
    assert users[0].startswith("I need to cancel my order") and "Yes, please go ahead." in users
    assert not any(DONE in u for u in users)
    # The model sees the agent as the other side of the chat, and its own lines as the assistant's.
    last = model.prompts[-1]
    assert last[0]["role"] == "system" and last[-1]["role"] == "user" and "cancelled" in last[-1]["content"]
    assert [m["role"] for m in last[1:3]] == ["assistant", "user"]


def test_consent_only_for_a_proposed_action_the_goal_accepts(tasks):
    task = task_with(tasks, "cancel")  # accepts "cancel" only
    customer = LLMCustomer(ScriptedBackend(["Yes, go ahead."]), task.payload["customer"], task.payload["goals"])
    customer.start()
    state = {}
    assert customer.respond("Would you like me to cancel the order?", state).confirmed_action == "cancel"
    assert customer.respond("Shall I refund it instead?", state).confirmed_action is None  # not allowed
    assert customer.respond("It has shipped.", state).confirmed_action is None  # nothing proposed
    no = LLMCustomer(ScriptedBackend(["No, I'd rather keep it."]), task.payload["customer"], task.payload["goals"])
    assert no.respond("Would you like me to cancel the order?", state).confirmed_action is None


def test_markers_are_stripped_and_end_the_conversation_only_by_the_scripted_rules(tasks):
    """[DONE] ends the conversation once the goals are met (done and told), as the scripted customer's goodbye
    does; before that it is refused, and so is [LEAVE] while the customer still has patience."""
    t = task_with(tasks, "order_status")
    goal = t.payload["goals"][0]
    told = "Your order " + " and ".join(alternatives[0] for alternatives in goal["facts"]) + "."
    early = LLMCustomer(ScriptedBackend([f"Thanks, bye! {DONE}"]), t.payload["customer"], t.payload["goals"])
    reply = early.respond("Let me look into it.", {})
    assert reply.stop is None and DONE not in reply.text and "bye" not in reply.text.lower()
    assert reply.text.startswith("I'm still waiting.")  # nothing left but the goodbye: the customer restates its goal
    done = LLMCustomer(ScriptedBackend([f"Thanks, bye! {DONE}"]), t.payload["customer"], t.payload["goals"])
    reply = done.respond(told, {})
    assert (reply.text, reply.stop) == ("Thanks, bye!", "resolved")
    quiet = LLMCustomer(ScriptedBackend(["Okay."]), t.payload["customer"], t.payload["goals"])
    reply = quiet.respond(told, {})  # the goals are met: the scripted rule ends it even without a marker
    assert reply.stop == "resolved" and reply.text.startswith("Okay.") and "Goodbye" in reply.text
    left = LLMCustomer(ScriptedBackend([f"Useless. I'm done, goodbye. {LEAVE}"]), t.payload["customer"],
                       t.payload["goals"], patience=2)
    first = left.respond("Hmm.", {})
    assert (first.text, first.stop) == ("Useless.", None)
    assert left.respond("Hmm.", {}).stop == "user_left"  # patience gone: now it may leave


def test_agreeing_and_saying_goodbye_in_one_breath_does_not_end_the_episode(tasks):
    """The known failure of LLM user simulators: "Yes, please cancel it. Thanks, bye!" must not end the episode
    before the agent can act. The consent counts, the goodbye is dropped, and the oracle finishes the job."""

    class AgreeAndLeave(FakeCustomerModel):
        def chat(self, messages, max_tokens=256, temperature=0.0):
            reply = super().chat(messages, max_tokens, temperature)
            return f"{reply} Thanks so much, bye! {DONE}" if reply.startswith("Yes") else reply

    task = task_with(tasks, "cancel")
    customer = LLMCustomer(AgreeAndLeave(), task.payload["customer"], task.payload["goals"])
    customer.start()
    reply = customer.respond("Would you like me to cancel the order?", {})
    assert (reply.text, reply.stop, reply.confirmed_action) == ("Yes, please go ahead.", None, "cancel")

    trajectory = run_policy(make_env(task, customer=LLMCustomerFactory(AgreeAndLeave())), task, oracle_policy(task))
    assert trajectory.outcome.success and trajectory.outcome.stop_reason == "resolved", trajectory.outcome
    assert any(c["name"] == "cancel_order" for t in trajectory.turns for c in t.info.get("tool_calls", []))
    users = [m["content"] for m in trajectory.messages if m["role"] == "user"]
    assert "Yes, please go ahead." in users and not any("bye" in u.lower() for u in users[:-1])


def test_the_customer_leaves_after_patience_turns_without_progress(tasks):
    t = tasks[0]
    customer = LLMCustomer(ScriptedBackend(["Hello?"]), t.payload["customer"], t.payload["goals"], patience=3)
    stops = [customer.respond("Our store was founded in 1998.", {"x": 1}).stop for _ in range(3)]
    assert stops == [None, None, "user_left"] and customer.frustration == 3
    # A change in the sandbox is progress and resets it.
    customer = LLMCustomer(ScriptedBackend(["Ok."]), t.payload["customer"], t.payload["goals"], patience=2)
    customer.respond("a", {"x": 1})
    assert customer.respond("b", {"x": 2}).stop is None and customer.frustration == 0


def test_default_patience_is_twice_the_personas(tasks):
    t = tasks[0]
    customer = LLMCustomer(ScriptedBackend(["x"]), t.payload["customer"], t.payload["goals"], rng=random.Random(1))
    assert customer.patience == 2 * t.payload["customer"]["persona"]["patience"]
    with pytest.raises(ValueError, match="patience"):
        LLMCustomer(ScriptedBackend(["x"]), t.payload["customer"], t.payload["goals"], patience=0)
    with pytest.raises(ValueError, match="at least one goal"):
        LLMCustomer(ScriptedBackend(["x"]), t.payload["customer"], [])


def test_an_empty_opening_falls_back_to_the_goal(tasks):
    t = tasks[0]
    customer = LLMCustomer(ScriptedBackend([f"  {DONE} "]), t.payload["customer"], t.payload["goals"])
    assert customer.start().startswith("I'd like to know where my order is")


def test_a_failing_backend_does_not_crash_the_episode(tasks):
    class Broken:
        name = "broken"

        def chat(self, messages, max_tokens=256, temperature=0.0):
            if len(messages) > 2:
                raise RuntimeError("throttled")
            return "Where is my order?"

    task = tasks[0]
    env = make_env(task, customer=LLMCustomerFactory(Broken()))
    env.reset(task, seed=0)
    step = env.step("Could you give me your email address?")
    assert "simulator_error" in step.info and "throttled" in step.info["simulator_error"]


# -- the LLM customer by spec: the domain resolves it (framework code names no domain) ----------------
@pytest.fixture
def fake_backends(monkeypatch):
    """``hf:fake`` builds a FakeCustomerModel: the CLI path with a scripted backend, no model loaded."""
    import pipeline.llm as llm
    from pipeline.envs import registry

    real = llm.make_backend
    built = []

    def make_backend(spec):
        if spec == "hf:fake":
            built.append(FakeCustomerModel())
            return built[-1]
        return real(spec)

    monkeypatch.setattr(llm, "make_backend", make_backend)
    monkeypatch.setattr(registry, "_LLM_CUSTOMERS", {})
    return built


def test_a_customer_spec_resolves_through_the_domain(tasks, fake_backends):
    from pipeline.envs import customer_factory, get_domain

    task = task_with(tasks, "cancel")
    env = make_env(task, customer="llm:hf:fake")
    assert isinstance(env.customer_factory, LLMCustomerFactory)
    assert customer_factory(get_domain(task.domain), "llm:hf:fake") is env.customer_factory  # built once
    assert len(fake_backends) == 1
    assert run_policy(env, task, oracle_policy(task)).outcome.success
    assert make_env(task, customer="scripted").customer_factory is make_env(task).customer_factory
    with pytest.raises(ValueError, match="unknown customer 'gpt': use scripted or llm:BACKEND"):
        make_env(task, customer="gpt")
    with pytest.raises(ValueError, match="the 'sop' domain has no LLM customer"):
        make_env("sop:data/sop/warranty_claims", customer="llm:hf:fake")


def test_a_domain_builds_its_own_llm_customer(fake_backends):
    """A third-party domain's Domain.llm_customer is what --customer llm:BACKEND reaches."""
    from pipeline.envs import Domain, Task, customer_factory, register_domain, unregister_domain

    seen = []
    domain = register_domain(Domain(name="toy_llm_customer", make_env=lambda source=None, **kw: kw,
                                    llm_customer=lambda backend: seen.append(backend) or "factory"))
    try:
        assert customer_factory(domain, "llm:bedrock:some-model") == "factory" and seen == ["bedrock:some-model"]
        task = Task(id="t", domain="toy_llm_customer", split="test", intents=["x"], payload={})
        assert make_env(task, customer="llm:bedrock:some-model") == {"customer": "factory"}
        assert make_env(task, customer="scripted") == {}
    finally:
        unregister_domain("toy_llm_customer")


def test_turnwise_eval_takes_the_llm_customer(tasks, fake_backends, tmp_path, capsys):
    from pipeline.cli import main

    out = tmp_path / "report"
    assert main(["eval", "--customer", "llm:hf:fake", "--policy", "oracle", "--limit", "2", "--out", str(out)]) == 0
    assert fake_backends and fake_backends[0].prompts  # the fake model played the customer
    (policy,) = json.loads((out / "report.json").read_text())["policies"]
    assert policy["config"]["customer"] == "llm:hf:fake" and policy["metrics"]["n_episodes"] == 2
    assert main(["eval", "--customer", "llm:gpt", "--policy", "oracle", "--limit", "1"]) == 1
    assert "customer 'llm:gpt': unknown LLM backend spec 'gpt'" in capsys.readouterr().err


def test_the_embedded_model_plays_the_customer_end_to_end(embedded_model_dir, tasks):
    """Once for real: the local HF backend on the embedded SmolLM2-135M plays the customer for the oracle
    (greedy, short replies, a 3-turn budget: the wiring, not the quality). Its words reach the agent without end
    markers, and the episode ends by one of the rules."""
    task = task_with(tasks, "order_status")
    factory = LLMCustomerFactory("hf:smollm2-135m", max_tokens=24, temperature=0.0)
    trajectory = run_policy(make_env(task, max_turns=3, customer=factory), task, oracle_policy(task))
    users = [m["content"] for m in trajectory.messages if m["role"] == "user"]
    assert len(users) == 1 + sum(t.info["kind"] == "message" for t in trajectory.turns)
    assert all(u.strip() and DONE not in u and LEAVE not in u for u in users)
    assert trajectory.outcome.stop_reason in ("resolved", "user_left", "max_turns")
    assert trajectory.outcome.details["goals"] == 1


def test_recipes_and_training_flags_name_the_customer(tmp_path):
    """A pipeline recipe's customer: key reaches every stage; `turnwise train --customer` is RolloutConfig's."""
    from pipeline.config import parse_train_args
    from pipeline.demo import plan
    from pipeline.training import RolloutConfig

    recipe = {"customer": "llm:openai:qwen@http://localhost:8000/v1", "sft": {"num_demos": 1},
              "grpo": {"max_steps": 1, "use_cpu": True, "bf16": False}, "eval": {"limit": 1}}
    p = plan(recipe, output_dir=tmp_path)
    assert p.customer == recipe["customer"] and p.sft[0].customer == recipe["customer"]
    assert p.grpo_section["customer"] == recipe["customer"]
    assert plan(recipe, output_dir=tmp_path, customer="scripted").customer == "scripted"  # --customer overrides
    with pytest.raises(ValueError, match="unknown customer 'claude'"):
        plan({**recipe, "customer": "claude"}, output_dir=tmp_path)
    quick = Path(__file__).resolve().parents[3] / "configs" / "grpo_cpu_quick.yaml"
    _, rollout_config, _, _ = parse_train_args(["--config", str(quick), "--tool_calling", "text",
                                                "--customer", "llm:bedrock:anthropic.claude-3-haiku-20240307-v1:0"])
    assert rollout_config.customer.startswith("llm:bedrock:") and rollout_config.tool_calling == "text"
    with pytest.raises(ValueError, match="RolloutConfig.customer: customer 'llm:openai:m@ftp://x'"):
        RolloutConfig(customer="llm:openai:m@ftp://x")
    with pytest.raises(ValueError, match="RolloutConfig.tool_calling must be one of auto, native, text"):
        RolloutConfig(tool_calling="json")
