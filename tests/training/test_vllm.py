"""Tests for pipeline/training/vllm.py: vLLM rollouts through TRL's own engine (use_vllm), on CPU with fakes.

vLLM cannot run here, so ``FakeLLM`` plays the part of the ``vllm.LLM`` TRL builds in colocate mode: it
loads the checkpoint TRL names, receives the weights TRL's ``sync_weights`` pushes into its model runner
(``load_weights``), and samples each turn's tokens from *those* weights, returning each token's logprob as
vLLM's ``processed_logprobs`` does. Everything between TRL's trainer and the fake (the sync, the rollout
function, the engine calls, the importance-sampling correction) is the real code. The checks compare with
what the trainer itself holds or computes, never with numbers the test makes up:

- the weights the engine receives before a rollout are the trainer's current LoRA weights merged in;
- the token prompts the engine receives are exactly those the HF backend receives for the same episodes;
- the engine's logprobs reach TRL as its sampling logprobs, and because the engine samples from the synced
  weights, TRL's recomputed logprobs match them (importance ratio 1), which they would not with stale weights.

Shrunk settings are tests/training/conftest.py's (2-layer random Llama, 2 tasks x 2 generations, 2 turns of at
most 6 tokens).
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
import types
from types import SimpleNamespace

import pytest
import torch

from pipeline.rollout.backends.base import GenerationRequest


class FakeEngineModel:
    """vLLM's model runner as TRL's colocate sync reaches it: ``load_weights([(name, tensor)])``."""

    def __init__(self, model) -> None:
        self.model = model
        self.received: dict[str, torch.Tensor] = {}

    def load_weights(self, weights) -> None:
        state = self.model.state_dict()
        for name, tensor in weights:
            self.received[name] = tensor.detach().clone()
            state[name].copy_(tensor)


class FakeLLM:
    """The ``vllm.LLM`` of TRL's colocate mode, on CPU: generates from the weights it was given.

    ``replay`` (a list of calls, each a list of ``(token_ids, logprobs, stopped)``) makes it return those
    tokens instead of sampling, to drive the same episodes as another backend did.
    """

    instances: list["FakeLLM"] = []
    replay: list | None = None

    def __init__(self, model: str, **kwargs) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.path, self.kwargs = model, kwargs
        self.runner = FakeEngineModel(AutoModelForCausalLM.from_pretrained(model).eval())
        self.llm_engine = SimpleNamespace(model_executor=SimpleNamespace(
            driver_worker=SimpleNamespace(model_runner=SimpleNamespace(model=self.runner))))
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.calls: list[list[list[int]]] = []  # per generate call, the token prompts
        self.params: list[list] = []
        self.weights_at_reset: list[dict[str, torch.Tensor]] = []  # what the engine held after each sync
        FakeLLM.instances.append(self)

    def get_tokenizer(self):
        return self.tokenizer

    def reset_prefix_cache(self) -> None:  # TRL's sync ends with it
        self.weights_at_reset.append(dict(self.runner.received))

    @torch.no_grad()
    def sample(self, prompt: list[int], params) -> tuple[list[int], list[float], bool]:
        model, generator = self.runner.model, torch.Generator().manual_seed(params.seed)
        out = model(torch.tensor([prompt]), use_cache=True)
        tokens, logprobs = [], []
        for _ in range(params.max_tokens):
            processed = torch.log_softmax(out.logits[0, -1].float() / params.temperature, dim=-1)
            token = int(torch.multinomial(processed.exp(), 1, generator=generator))
            tokens.append(token)
            logprobs.append(float(processed[token]))
            if token in params.stop_token_ids:
                return tokens, logprobs, True
            out = model(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
        return tokens, logprobs, False

    def generate(self, prompts, sampling_params, use_tqdm=False):
        call = len(self.calls)
        self.calls.append([list(p["prompt_token_ids"]) for p in prompts])
        self.params.append(list(sampling_params))
        outputs = []
        for row, (prompt, params) in enumerate(zip(self.calls[-1], sampling_params)):
            tokens, logprobs, stopped = (self.replay[call][row] if self.replay is not None
                                         else self.sample(prompt, params))
            outputs.append(SimpleNamespace(prompt_token_ids=prompt, outputs=[SimpleNamespace(
                token_ids=tokens, logprobs=[{t: SimpleNamespace(logprob=lp, rank=1)} for t, lp in zip(tokens, logprobs)],
                finish_reason="stop" if stopped else "length")]))
        return outputs


@pytest.fixture
def fake_vllm(monkeypatch):
    """A stand-in ``vllm`` package and a visible GPU, as far as TRL and turnwise can tell."""
    import trl.generation.vllm_generation as vllm_generation

    import pipeline.training.vllm as turnwise_vllm

    module = types.ModuleType("vllm")
    module.SamplingParams = lambda **kw: SimpleNamespace(**kw)
    module.LLM = FakeLLM
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setattr(vllm_generation, "is_vllm_available", lambda *a, **k: True)
    monkeypatch.setattr(vllm_generation, "LLM", FakeLLM, raising=False)
    monkeypatch.setattr(turnwise_vllm, "gpu_available", lambda: True)
    monkeypatch.setattr(FakeLLM, "instances", [])
    monkeypatch.setattr(FakeLLM, "replay", None)
    names = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")  # TRL's colocate init sets them
    saved = {name: os.environ.get(name) for name in names}
    yield module
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


VLLM_SETTINGS = dict(use_vllm=True, vllm_mode="colocate", vllm_importance_sampling_mode="token_truncate",
                     vllm_gpu_memory_utilization=0.1)


@pytest.fixture
def make_vllm_trainer(make_trainer, fake_vllm):
    """``make_trainer`` with TRL's vLLM engine (the fake) and turnwise's vllm backend."""

    def make(**overrides):
        trainer = make_trainer(**{**VLLM_SETTINGS, **overrides}, backend="vllm")  # reward= passes through
        return trainer, FakeLLM.instances[-1]

    return make


def lora_merged(trainer) -> dict[str, torch.Tensor]:
    """The trainer's current weights as vLLM names them, LoRA merged in by hand: W + scaling * B @ A."""
    merged = {}
    for name, module in trainer.accelerator.unwrap_model(trainer.model).named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            delta = module.scaling["default"] * module.lora_B["default"].weight @ module.lora_A["default"].weight
            merged[name.removeprefix("base_model.model.") + ".weight"] = (module.base_layer.weight + delta).detach().clone()
    return merged


def spread_reward(trajectory) -> float:
    """Like token_count_reward, over more values: the first step's two groups must not tie, or it moves nothing."""
    return sum(sum(turn.completion_ids) for turn in trajectory.turns) % 1009 / 1009.0


def test_each_rollout_gets_this_steps_weights_before_its_first_turn(make_vllm_trainer, tiny_model_dir):
    """Before every rollout the engine holds the trainer's current LoRA weights merged into the base
    weights (the second rollout's differ from the first's: the optimiser stepped in between), and its prefix
    cache was reset after the weights arrived."""
    from safetensors.torch import load_file

    trainer, llm = make_vllm_trainer(reward=spread_reward)
    assert llm.path == str(tiny_model_dir) and llm.kwargs["logprobs_mode"] == "processed_logprobs"
    seen = []
    rollout = trainer.rollout_func

    def spy(prompts, trainer_):
        seen.append((lora_merged(trainer_), dict(llm.runner.received), len(llm.weights_at_reset), len(llm.calls)))
        return rollout(prompts, trainer_)

    trainer.rollout_func = spy
    trainer.train()
    assert len(seen) == 2
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    for step, (expected, received, resets, calls_before) in enumerate(seen):
        assert resets == step + 1  # one sync (and prefix-cache reset) per rollout, before it
        assert expected.keys() <= received.keys() and len(expected) == 4  # q_proj and v_proj of 2 layers
        for name, weight in expected.items():
            torch.testing.assert_close(received[name], weight, rtol=0, atol=1e-6)
        untouched = set(received) - set(expected)
        assert untouched and all(torch.equal(received[n], base[n]) for n in untouched if n in base)
    first, second = seen[0][1], seen[1][1]
    assert any(not torch.equal(first[n], second[n]) for n in seen[0][0])  # step 1 moved the LoRA weights
    assert llm.calls  # and the episodes were generated by the engine


def test_the_engine_gets_the_same_token_prompts_as_the_hf_backend(make_trainer, make_vllm_trainer, rows,
                                                                  monkeypatch):
    """The same episodes (same tasks and seeds, the engine replaying the HF backend's sampled tokens) send
    the engine exactly the token prompts the HF backend receives, turn by turn and row by row, and end as
    the same token sequences, masks and logprobs."""
    import pipeline.training.adapters as adapters
    from pipeline.rollout.backends import build_backend

    recorded = []  # per HF generate call: [(prompt, generation)]

    class Recording:
        def __init__(self, backend):
            self.backend = backend

        def generate(self, requests):
            generations = self.backend.generate(requests)
            recorded.append([(list(r.prompt_ids), g) for r, g in zip(requests, generations)])
            return generations

        def release(self, key):
            self.backend.release(key)

    monkeypatch.setattr(adapters, "build_backend", lambda *a, **k: Recording(build_backend(*a, **k)))
    hf_trainer = make_trainer()
    prompts = [r["prompt"] for r in rows(hf_trainer, [0, 0, 1, 1])]
    hf_out = hf_trainer.rollout_func(prompts, hf_trainer)
    assert len(recorded) >= 2  # a multi-turn rollout

    trainer, llm = make_vllm_trainer()
    FakeLLM.replay = [[(g.token_ids, g.logprobs, not g.truncated) for _, g in call] for call in recorded]
    out = trainer.rollout_func(prompts, trainer)
    assert llm.calls == [[prompt for prompt, _ in call] for call in recorded]
    for key in ("prompt_ids", "completion_ids", "env_mask", "logprobs"):
        assert out[key] == hf_out[key], key
    for call in llm.params:  # every request sampled on its own seed, with the HF backend's stop rule
        assert len({p.seed for p in call}) == len(call)
        assert all(p.stop_token_ids == [trainer.processing_class.eos_token_id] and p.ignore_eos for p in call)


def test_engine_logprobs_feed_trls_importance_sampling_correction(make_vllm_trainer, rows):
    """The engine's logprobs reach TRL as sampling_per_token_logps on the model's tokens; TRL recomputes the
    trainer's own (old_per_token_logps) and weights the loss by their ratio. The engine samples from the
    synced weights, so the ratio is 1 on sampled tokens, and exactly 1 on environment tokens, at both steps;
    against the base model's weights (no sync) it would not be."""
    trainer, llm = make_vllm_trainer(reward=spread_reward)
    trainer.model.train()
    outputs = []
    generate = trainer._generate_and_score_completions
    trainer._generate_and_score_completions = lambda inputs: outputs.append(generate(inputs)) or outputs[-1]
    trainer.train()
    assert len(outputs) == 2
    for output in outputs:
        model_tokens = (output["tool_mask"] * output["completion_mask"]).bool()
        env_tokens = output["completion_mask"].bool() & ~model_tokens
        assert model_tokens.any() and env_tokens.any()
    last = trainer.rollout.last
    engine = torch.tensor([lp for t in last for lp, m in zip(t.tokens.logprobs[t.tokens.turn_spans[0][0]:],
                                                             t.tokens.assistant_mask[t.tokens.turn_spans[0][0]:]) if m])
    output = outputs[-1]
    model_tokens = (output["tool_mask"] * output["completion_mask"]).bool()
    assert torch.equal(output["sampling_per_token_logps"][model_tokens].cpu(), engine.to(torch.float32))
    torch.testing.assert_close(output["old_per_token_logps"][model_tokens],
                               output["sampling_per_token_logps"][model_tokens], rtol=0, atol=1e-4)
    ratio = output["importance_sampling_ratio"]
    assert torch.allclose(ratio[model_tokens], torch.ones(()), atol=1e-4)
    env_tokens = output["completion_mask"].bool() & ~model_tokens
    assert torch.equal(ratio[env_tokens], torch.ones_like(ratio[env_tokens]))
    # the control: the base model (what an engine never synced would hold) scores these tokens differently
    base_logps = base_model_logps(trainer, output)
    assert (base_logps[model_tokens] - output["sampling_per_token_logps"][model_tokens]).abs().max() > 1e-3


def base_model_logps(trainer, output) -> torch.Tensor:
    model = trainer.accelerator.unwrap_model(trainer.model)
    ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
    mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
    with torch.no_grad(), model.disable_adapter():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, output["prompt_ids"].shape[1] - 1: -1]
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, output["completion_ids"].unsqueeze(-1)).squeeze(-1)


# -- configuration: fail before the model loads ---------------------------------------------------------


def grpo_args(**overrides):
    from trl import GRPOConfig

    return GRPOConfig(**{**dict(output_dir="unused", per_device_train_batch_size=2, num_generations=2, report_to=[],
                                use_cpu=True, bf16=False), **overrides})


def test_missing_vllm_or_gpu_fails_before_the_model_loads_with_the_fix(monkeypatch, tmp_path):
    """A recipe with backend: vllm parses anywhere (the laptop that submits it has neither vLLM nor a GPU);
    train() refuses it before it loads anything, naming the fix."""
    import pipeline.models as models
    from trl import ModelConfig

    from pipeline.config import parse_train_args
    from pipeline.training import train

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    task_args, rollout_config, args, _ = parse_train_args(["--backend", "vllm", "--use_vllm", "true", "--output_dir",
                                                           str(tmp_path), "--foothold_tasks", "0"])
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    with pytest.raises(ImportError, match=r"use_vllm=True needs the vllm package.*pip install 'vllm>=0\.22,<0\.32'"):
        train(task_args, rollout_config, args, ModelConfig())
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    with pytest.raises(RuntimeError, match=r"use_vllm=True needs a CUDA GPU, and none is visible here"):
        train(task_args, rollout_config, args, ModelConfig())


@pytest.mark.parametrize("backend, use_vllm, message", [
    ("vllm", False, r"backend='vllm' generates with TRL's vLLM engine.*set use_vllm: true"),
    ("hf", True, r"use_vllm=True starts TRL's vLLM engine, but backend='hf'.*set backend: vllm"),
])
def test_backend_and_use_vllm_must_agree(fake_vllm, backend, use_vllm, message):
    from pipeline.training import RolloutConfig
    from pipeline.training.vllm import check_vllm_config

    with pytest.raises(ValueError, match=message):
        check_vllm_config(grpo_args(use_vllm=use_vllm), RolloutConfig(backend=backend))


def test_settings_that_multi_turn_vllm_rollouts_cannot_honour_are_refused(fake_vllm):
    from pipeline.training import RolloutConfig
    from pipeline.training.vllm import check_vllm_config

    config = RolloutConfig(backend="vllm", max_total_tokens=4096)
    with pytest.raises(ValueError, match=r"vllm_tensor_parallel_size=2 in colocate mode.*Use vllm_mode: server"):
        check_vllm_config(grpo_args(use_vllm=True, vllm_tensor_parallel_size=2), config)
    with pytest.raises(ValueError, match=r"vllm_max_model_length=2048 is below max_total_tokens=4096"):
        check_vllm_config(grpo_args(use_vllm=True, vllm_max_model_length=2048), config)
    check_vllm_config(grpo_args(use_vllm=True, vllm_mode="server", vllm_tensor_parallel_size=2), config)


def test_a_top_p_cut_and_sequence_level_correction_are_warned_about(fake_vllm, caplog):
    from pipeline.training import RolloutConfig
    from pipeline.training.vllm import check_vllm_config

    with caplog.at_level(logging.WARNING, logger="pipeline.training.vllm"):
        check_vllm_config(grpo_args(use_vllm=True, vllm_importance_sampling_mode="token_truncate"),
                          RolloutConfig(backend="vllm"))
        assert caplog.text == ""
        check_vllm_config(grpo_args(use_vllm=True, top_p=0.9), RolloutConfig(backend="vllm"))
    assert "use_vllm with top_p=0.9" in caplog.text and "sequence_mask" in caplog.text


# -- server mode and sleep mode: the seams TRL's engine exposes -----------------------------------------


class FakeClient:
    """TRL's VLLMClient.generate as the server answers it."""

    def __init__(self, eos: int, stop_after: int = 3) -> None:
        self.eos, self.stop_after, self.requests = eos, stop_after, []

    def generate(self, prompts, n, max_tokens, logprobs, generation_kwargs, **sampling):
        self.requests.append(dict(prompts=prompts, n=n, max_tokens=max_tokens, logprobs=logprobs,
                                  generation_kwargs=generation_kwargs, **sampling))
        count = min(self.stop_after, max_tokens)
        tokens = [65 + k for k in range(count)]
        if count == self.stop_after:
            tokens[-1] = self.eos
        return {"completion_ids": [tokens], "logprobs": [[[-0.5 * (k + 1)] for k in range(count)]]}


def test_server_mode_sends_each_live_episode_its_own_request_and_seed(tiny_model_dir):
    from transformers import AutoTokenizer

    from pipeline.rollout import RolloutEngine
    from pipeline.rollout.backends.vllm import VLLMServerBackend
    from tests.rollout.envs_for_tests import EchoEnv, tasks

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    client = FakeClient(tokenizer.eos_token_id)
    backend = VLLMServerBackend(client, stop_token_ids=[tokenizer.eos_token_id], temperature=0.7, seed=5)
    trajectories = RolloutEngine(backend, tokenizer, max_new_tokens=8).run(lambda t: EchoEnv(2), tasks(3))
    assert len(client.requests) == 3 * 2  # 3 episodes x 2 turns, one request each
    assert len({r["generation_kwargs"]["seed"] for r in client.requests}) == 6
    assert all(r["n"] == 1 and r["logprobs"] == 0 and r["temperature"] == 0.7 for r in client.requests)
    assert all(r["generation_kwargs"]["stop_token_ids"] == [tokenizer.eos_token_id] for r in client.requests)
    prompts = [r["prompts"][0] for r in client.requests]
    for trajectory in trajectories:  # every request carried a whole episode prefix, and the engine kept the logprobs
        data = trajectory.tokens
        for turn, (start, end) in zip(trajectory.turns, data.turn_spans):
            assert data.input_ids[:start] in prompts
            assert data.logprobs[start:end] == [-0.5, -1.0, -1.5] and turn.completion_ids[-1] == tokenizer.eos_token_id


def test_server_mode_waits_for_the_weight_push_and_other_processes_get_their_own_client(monkeypatch):
    import trl.generation.vllm_client as vllm_client

    from pipeline.training.vllm import rollout_phase, server_client

    barriers = []
    made = []
    monkeypatch.setattr(vllm_client, "VLLMClient", lambda **kw: made.append(kw) or SimpleNamespace(**kw))
    generation = SimpleNamespace(mode="server", vllm_client=None, server_base_url=None, server_host="10.0.0.5",
                                 server_port=8123, server_timeout=30.0)
    trainer = SimpleNamespace(vllm_generation=generation,
                              accelerator=SimpleNamespace(wait_for_everyone=lambda: barriers.append(1)))
    with rollout_phase(trainer):
        assert barriers == [1]  # no process generates before the main process pushed the weights
    client = server_client(trainer)
    assert made == [{"base_url": "http://10.0.0.5:8123", "connection_timeout": 30.0}]
    assert server_client(trainer) is client and len(made) == 1  # made once per trainer
    generation.vllm_client = main = object()
    assert server_client(SimpleNamespace(vllm_generation=generation)) is main


def test_sleep_mode_pushes_weights_back_and_sleeps_after_the_rollout():
    from trl.generation.vllm_generation import VLLMGeneration

    from pipeline.training.vllm import rollout_phase

    # rollout_phase reads TRL's private flag the way TRL's own generate() does: pinned here
    assert "_llm_weights_sleeping" in inspect.getsource(VLLMGeneration.generate)
    events = []
    llm = SimpleNamespace(wake_up=lambda tags: events.append(("wake", tuple(tags))),
                          sleep=lambda level: events.append(("sleep", level)))
    generation = SimpleNamespace(mode="colocate", enable_sleep_mode=True, _llm_weights_sleeping=True, llm=llm,
                                 sync_weights=lambda: events.append(("sync",)))
    with rollout_phase(SimpleNamespace(vllm_generation=generation)):
        events.append(("turns",))
    assert events == [("sync",), ("wake", ("kv_cache",)), ("turns",), ("sleep", 2)]
    assert generation._llm_weights_sleeping


def test_vllm_backend_samples_each_request_with_trls_settings(fake_vllm, tiny_model_dir):
    from pipeline.rollout.backends.vllm import VLLMBackend

    llm = FakeLLM(str(tiny_model_dir))
    FakeLLM.replay = [[([65, 66], [-0.1, -0.2], False), ([67], [-0.3], False)]]
    backend = VLLMBackend(llm, temperature=0.8, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.1, seed=3,
                          stop_token_ids=[2], sampling_kwargs={"presence_penalty": 0.5})
    generations = backend.generate([GenerationRequest("a", [1, 2, 3], 2), GenerationRequest("b", [4], 1)])
    assert [g.token_ids for g in generations] == [[65, 66], [67]] and all(g.truncated for g in generations)
    params = llm.params[0]
    assert [p.max_tokens for p in params] == [2, 1] and params[0].seed != params[1].seed
    assert all(p.repetition_penalty == 1.1 and p.presence_penalty == 0.5 and p.logprobs == 0 for p in params)
