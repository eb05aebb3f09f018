"""Tests for the backend registry in pipeline/rollout/backends/__init__.py: build_backend by name,
register_backend, and RolloutConfig.backend choosing what training generates with."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import pipeline.rollout.backends as backends
from pipeline.envs import load_tasks
from pipeline.rollout.backends import GenerationRequest, backend_names, build_backend, register_backend
from pipeline.rollout.backends.hf import HFBackend
from pipeline.training import EpisodeRollout, RolloutConfig, task_dataset


@pytest.fixture
def registry(monkeypatch):
    """A copy of the registry for one test, so registrations made in it do not leak."""
    monkeypatch.setattr(backends, "_BACKENDS", dict(backends._BACKENDS))


def test_hf_and_vllm_are_registered():
    assert backend_names() == ("hf", "vllm")


def test_build_backend_hf_passes_the_sampling_settings(tiny):
    """The hf factory builds an HFBackend with the given settings: it samples what one built directly does."""
    model, tokenizer = tiny
    built = build_backend("hf", model, tokenizer, temperature=0.7, top_p=0.9, seed=5)
    direct = HFBackend(model, tokenizer, temperature=0.7, top_p=0.9, seed=5)
    assert isinstance(built, HFBackend) and (built.temperature, built.top_p) == (0.7, 0.9)
    requests = [GenerationRequest(i, [40 + i, 41, 42, 43], 6) for i in range(3)]
    a, b = built.generate(requests), direct.generate(requests)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.logprobs for g in a] == [g.logprobs for g in b]


def test_an_unknown_backend_name_lists_the_registered_ones(tiny):
    with pytest.raises(ValueError, match=r"backend='hf_fast' is not a generation backend; use one of hf, vllm"):
        build_backend("hf_fast", *tiny)


def test_vllm_refuses_a_loaded_model_and_says_to_use_hf(tiny):
    with pytest.raises(TypeError, match=r"got a LlamaForCausalLM.*'hf' backend"):
        build_backend("vllm", *tiny)


def test_register_backend_adds_a_name_and_refuses_a_taken_one(registry, tiny):
    @register_backend("greedy_hf")
    def greedy_hf(model, tokenizer, **sampling):
        return HFBackend(model, tokenizer, **{**sampling, "temperature": 0.0})

    assert backend_names() == ("hf", "vllm", "greedy_hf")
    assert build_backend("greedy_hf", *tiny, temperature=1.0).temperature == 0.0
    with pytest.raises(ValueError, match=r"'hf' is already registered"):
        register_backend("hf")(greedy_hf)


def test_rollout_config_refuses_an_unknown_backend():
    assert RolloutConfig().backend == "hf"
    with pytest.raises(ValueError, match=r"RolloutConfig.backend='vlm' is not a generation backend; use one of hf, vllm"):
        RolloutConfig(backend="vlm")


def test_episode_rollout_generates_with_the_configured_backend(registry, tiny):
    """EpisodeRollout builds the backend RolloutConfig.backend names, with the trainer's sampling settings;
    a registered backend that delegates to HFBackend gives exactly the default's episodes."""
    model, tokenizer = tiny
    built = []

    @register_backend("recording")
    def recording(model, tokenizer, **sampling):
        built.append(sampling)
        return HFBackend(model, tokenizer, **sampling)

    tasks = load_tasks("customer_service", "train")[:2]
    accelerator = SimpleNamespace(unwrap_model=lambda m: m,
                                  state=SimpleNamespace(deepspeed_plugin=None, fsdp_plugin=None))  # one process
    trainer = SimpleNamespace(state=SimpleNamespace(global_step=0), processing_class=tokenizer,
                              accelerator=accelerator, model=model, model_wrapped=model,
                              args=SimpleNamespace(temperature=0.8, top_p=0.95, use_vllm=False,
                                                   gradient_checkpointing_kwargs=None))
    prompts = [row["prompt"] for row in task_dataset(tasks)]

    def play(name):
        config = RolloutConfig(max_turns=2, max_new_tokens=4, max_total_tokens=20_000, backend=name)
        return EpisodeRollout(tasks, config)(prompts, trainer)

    recorded, default = play("recording"), play("hf")
    assert len(built) == 1 and (built[0]["temperature"], built[0]["top_p"]) == (0.8, 0.95) and "seed" in built[0]
    assert recorded["completion_ids"] == default["completion_ids"]
    assert recorded["logprobs"] == default["logprobs"]
