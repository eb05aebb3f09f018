"""Tests for pipeline/sft.py: oracle demonstrations, the assistant-only loss mask, the saved adapter.

Shrunk settings, each on purpose: the tiny 2-layer random Llama (logic, not quality) with a byte-level
tokenizer, 3-4 demonstrations, validation on 2 val tasks with 2 turns of at most 4 new tokens.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from trl import GRPOConfig, ModelConfig, SFTConfig

from pipeline.config import TaskArguments
from pipeline.envs import load_tasks, make_env
from pipeline.models import load_model
from pipeline.rollout import RolloutEngine
from pipeline.rollout.backends import Generation
from pipeline.sft import (SFTArguments, demonstration_dataset, demonstration_plan, oracle_demonstrations, run_sft,
                          tokenize_demonstration)
from pipeline.training import RolloutConfig, train
from pipeline.training.checkpoints import MARKER


def token_count_reward(trajectory) -> float:
    return sum(sum(turn.completion_ids) for turn in trajectory.turns) % 7 / 7.0


class ReplayBackend:
    """A generation backend that "samples" given texts, each followed by the end-of-turn token."""

    def __init__(self, tokenizer, texts):
        self.tokenizer, self.texts = tokenizer, list(texts)

    def generate(self, requests):
        out = []
        for _ in requests:
            ids = self.tokenizer(self.texts.pop(0), add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
            out.append(Generation(token_ids=ids, logprobs=[0.0] * len(ids), truncated=False))
        return out

    def release(self, key):
        pass


def test_demonstrations_are_successful_oracle_episodes_through_the_environment():
    tasks = load_tasks("customer_service", "train")[:3]
    demos = oracle_demonstrations(tasks, n=5, seed=7)
    assert len(demos) == 5 and all(d.outcome.success for d in demos)
    assert {d.task_id for d in demos} == {t.id for t in tasks}  # all 3 tasks, then 2 of them again
    assert [d.seed for d in demos] == [7, 7, 7, 8, 8]  # a second pass replays tasks with the next seed
    # demonstration_plan names those episodes without playing them: what an analysis leaves out
    assert [(t.id, s) for t, s in demonstration_plan(tasks, 5, seed=7)] == [(d.task_id, d.seed) for d in demos]
    with pytest.raises(ValueError, match="no tasks"):
        demonstration_plan([], 1)
    # exactly the environment's messages: its opening, then assistant turns each followed by its replies
    env = make_env(next(t for t in tasks if t.id == demos[0].task_id))
    opening = env.reset(next(t for t in tasks if t.id == demos[0].task_id), seed=7)
    assert demos[0].messages[: len(opening)] == opening
    for turn in demos[0].turns:
        assert env.step(turn.assistant).messages == turn.env_messages


def test_tokens_and_mask_are_what_a_rollout_of_the_same_texts_records(tiny_model_dir):
    """SFT trains on the very token sequence the rollout engine builds when the model samples the oracle's
    texts: same ids, and the assistant mask is the rollout's assistant mask."""
    _, tokenizer = load_model(str(tiny_model_dir))
    task = load_tasks("customer_service", "train")[0]
    demo = oracle_demonstrations([task], n=1)[0]
    sequence = tokenize_demonstration(demo.messages, tokenizer)

    engine = RolloutEngine(ReplayBackend(tokenizer, [t.assistant for t in demo.turns]), tokenizer,
                           max_new_tokens=10_000, max_total_tokens=100_000, batch_size=1)
    replayed = engine.run(lambda t: make_env(t), [task], [demo.seed])[0]
    assert replayed.outcome.success and replayed.messages == demo.messages
    assert sequence["input_ids"] == replayed.tokens.input_ids
    assert sequence["assistant_masks"] == replayed.tokens.assistant_mask


def test_non_assistant_tokens_get_label_minus_100(tiny_model_dir, tmp_path):
    """What SFTTrainer feeds the model: labels are -100 everywhere except assistant tokens, which are
    exactly the assistant texts, each followed by the end-of-turn token; so the loss is theirs alone."""
    from trl import SFTTrainer

    model, tokenizer = load_model(str(tiny_model_dir))
    demos = oracle_demonstrations(load_tasks("customer_service", "train")[:2], n=2)
    dataset = demonstration_dataset(demos, tokenizer)
    args = SFTConfig(output_dir=str(tmp_path), max_length=None, report_to=[], use_cpu=True, bf16=False, max_steps=1,
                     dataset_text_field="input_ids")
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    for row, demo in enumerate(demos):
        ids, labels = batch["input_ids"][row], batch["labels"][row]
        trained = labels != -100
        assert torch.equal(ids[trained], labels[trained])
        expected = "".join(t.assistant + tokenizer.eos_token for t in demo.turns)
        assert tokenizer.decode(ids[trained]) == expected
        assert 0 < trained.sum() < (batch["attention_mask"][row] == 1).sum()  # the prompts and replies are masked
    # the loss is the mean cross-entropy over the assistant tokens alone
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    shift_logits, shift_labels = logits[:, :-1], batch["labels"][:, 1:]
    keep = shift_labels != -100
    manual = torch.nn.functional.cross_entropy(shift_logits[keep], shift_labels[keep])
    with torch.no_grad():
        loss = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss
    torch.testing.assert_close(loss, manual)


def tiny_sft(tiny_model_dir, out, epochs=4, patience=1, resume=False, **overrides):
    sft_args = SFTArguments(num_demos=3, val_limit=2, val_max_turns=2, val_max_new_tokens=4, patience=patience,
                            resume=resume)
    overrides = {"save_strategy": "no", **overrides}
    config = SFTConfig(output_dir=str(out), num_train_epochs=epochs, per_device_train_batch_size=1,
                       learning_rate=1e-2,  # large, so a few steps visibly move the LoRA weights
                       max_length=None, logging_steps=1, report_to=[], use_cpu=True,
                       bf16=False,  # CPU bf16 without native support is ~40x slower than float32
                       gradient_checkpointing=False, **overrides)
    model_args = ModelConfig(model_name_or_path=str(tiny_model_dir), use_peft=True, lora_r=4, lora_alpha=8,
                             lora_target_modules=["q_proj", "v_proj"])
    return run_sft(sft_args, config, model_args)


def test_sft_tracks_val_success_per_epoch_stops_early_and_saves_an_adapter(tiny_model_dir, tmp_path):
    result = tiny_sft(tiny_model_dir, tmp_path / "sft", epochs=5, patience=1)
    curve = json.loads((tmp_path / "sft" / "val_curve.json").read_text())
    # epoch 0 is the starting model; the random model's val success stays 0, so epoch 1 sets the best and
    # epoch 2, no better, uses up the patience of 1: training stops after 2 of 5 epochs
    assert [r["epoch"] for r in curve["curve"]] == [0, 1, 2]
    assert curve["stopped_early"] and curve["best_epoch"] == 2 and curve["val_tasks"] == 2
    assert all(r["val/success"] == 0.0 and r["train/loss"] is not None for r in curve["curve"][1:])
    assert all(isinstance(r["val/reward/mean"], float) for r in curve["curve"])
    assert result["demos"] == 3 and result["epochs"] == [0, 1, 2]
    history = json.loads((tmp_path / "sft" / "log_history.json").read_text())
    assert any("loss" in h for h in history) and any("val/success" in h for h in history)
    assert len((tmp_path / "sft" / "demonstrations.jsonl").read_text().splitlines()) == 3
    adapter = tmp_path / "sft" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["base_model_name_or_path"] == str(tiny_model_dir)
    from safetensors.torch import load_file

    weights = load_file(str(adapter / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())  # trained (lora_B starts at 0)


def test_a_killed_sft_run_resumes_from_its_last_epoch_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    """Killed in its third epoch, SFT resumed with --resume continues from the epoch-2 checkpoint and ends
    where an unbroken run ends: the same curve, the same adapter."""
    from safetensors.torch import load_file

    from pipeline.training.sft_trainer import SharedPrefixSFTTrainer

    epochs = dict(save_strategy="epoch", save_total_limit=1)  # turnwise sft's defaults (SFT_DEFAULTS)
    whole = tiny_sft(tiny_model_dir, tmp_path / "whole", epochs=3, patience=0, **epochs)
    assert whole["resumed_from"] is None
    step = SharedPrefixSFTTrainer.training_step

    def killed_in_epoch_3(self, *args, **kwargs):
        if self.state.global_step == 6:  # 3 demonstrations, 1 per step: steps 7-9 are epoch 3
            raise RuntimeError("killed")
        return step(self, *args, **kwargs)

    monkeypatch.setattr(SharedPrefixSFTTrainer, "training_step", killed_in_epoch_3)
    with pytest.raises(RuntimeError, match="killed"):
        tiny_sft(tiny_model_dir, tmp_path / "broken", epochs=3, patience=0, **epochs)
    broken = tmp_path / "broken"
    assert not (broken / "sft_result.json").exists()
    assert [r["epoch"] for r in json.loads((broken / "val_curve.json").read_text())["curve"]] == [0, 1, 2]
    assert sorted(p.name for p in broken.glob("checkpoint-*")) == ["checkpoint-6"]  # the newest only
    monkeypatch.setattr(SharedPrefixSFTTrainer, "training_step", step)
    marker = broken / "checkpoint-6" / MARKER  # the killed part had run 1,000 s by its last checkpoint
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "wall_time_s": 1000.0}))

    resumed = tiny_sft(tiny_model_dir, broken, epochs=3, patience=0, resume=True, **epochs)
    assert resumed["resumed_from"].endswith("checkpoint-6") and resumed["epochs"] == [0, 1, 2, 3]
    assert whole["wall_time_total_s"] == pytest.approx(whole["wall_time_s"], abs=0.2)
    assert resumed["wall_time_total_s"] == pytest.approx(1000 + resumed["wall_time_s"], abs=0.2)
    curves = [json.loads((run / "val_curve.json").read_text()) for run in (tmp_path / "whole", broken)]
    drop_time = [[{k: v for k, v in r.items() if k != "eval_s"} for r in c["curve"]] for c in curves]
    assert drop_time[0] == drop_time[1] and curves[0]["best_epoch"] == curves[1]["best_epoch"] == 3
    weights = [load_file(str(run / "adapter" / "adapter_model.safetensors")) for run in (tmp_path / "whole", broken)]
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        torch.testing.assert_close(weights[1][name], weights[0][name])


def test_train_starts_from_the_sft_adapter(tiny_model_dir, tmp_path, caplog):
    """``turnwise train --adapter`` continues the SFT adapter: with a zero learning rate the GRPO run saves
    exactly the weights it started from. foothold_tasks=0 disables the foothold check."""
    from safetensors.torch import load_file

    tiny_sft(tiny_model_dir, tmp_path / "sft", epochs=1)
    adapter = tmp_path / "sft" / "adapter"
    task_args = TaskArguments(train_limit=2, val_limit=2, adapter=str(adapter), foothold_tasks=0)
    rollout_config = RolloutConfig(max_turns=2, max_new_tokens=4, max_total_tokens=20_000)
    grpo_args = GRPOConfig(output_dir=str(tmp_path / "grpo"), per_device_train_batch_size=2, num_generations=2,
                           max_steps=1, learning_rate=0.0, report_to=[], use_cpu=True, bf16=False, save_strategy="no",
                           beta=0.0)
    with caplog.at_level(logging.INFO, logger="pipeline"):
        result = train(task_args, rollout_config, grpo_args, ModelConfig(), reward_fn=token_count_reward)
    assert result["foothold"] is None and "foothold check" not in caplog.text
    before = load_file(str(adapter / "adapter_model.safetensors"))
    after = load_file(str(tmp_path / "grpo" / "adapter" / "adapter_model.safetensors"))
    assert before.keys() == after.keys()
    for name in before:
        torch.testing.assert_close(before[name], after[name])
    assert json.loads((tmp_path / "grpo" / "adapter" / "adapter_config.json").read_text())["r"] == 4


def test_foothold_check_warns_for_an_untrained_model(tiny_model_dir, tmp_path, caplog):
    task_args = TaskArguments(train_limit=2, val_limit=2, foothold_tasks=2)
    rollout_config = RolloutConfig(max_turns=2, max_new_tokens=4, max_total_tokens=20_000)
    grpo_args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, num_generations=2, max_steps=1,
                           report_to=[], use_cpu=True, bf16=False, save_strategy="no", beta=0.0)
    model_args = ModelConfig(model_name_or_path=str(tiny_model_dir), use_peft=True, lora_r=4, lora_alpha=8,
                             lora_target_modules=["q_proj", "v_proj"])
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        result = train(task_args, rollout_config, grpo_args, model_args, reward_fn=token_count_reward)
    assert result["foothold"]["success"] == 0.0 and result["foothold"]["n_tasks"] == 2
    warning = next(r.getMessage() for r in caplog.records if "foothold check" in r.getMessage())
    assert "solved 0 of 2 val tasks" in warning
    assert "turnwise sft" in warning and "simplify the tasks" in warning and "raise the budget" in warning


def test_bad_sft_options_fail_with_the_fix(tmp_path):
    from pipeline.sft import parse_sft_args

    with pytest.raises(ValueError, match="num_demos must be at least 1"):
        parse_sft_args(["--num_demos", "0"])
    with pytest.raises(ValueError, match="Unknown option.*num_demo"):
        parse_sft_args([], config={"num_demo": 3})
    with pytest.raises(ValueError, match="not a LoRA adapter directory"):
        TaskArguments(adapter=str(tmp_path))
    sft_args, config, model_args = parse_sft_args(["--num_demos", "5"], config={"num_train_epochs": 2})
    assert sft_args.num_demos == 5 and config.num_train_epochs == 2
    assert model_args.use_peft and model_args.model_name_or_path == "smollm2-135m" and config.max_length == 4096


def test_an_adapter_records_the_alias_without_asking_a_hub_about_it(tiny_model_dir, tmp_path, monkeypatch):
    """Saved under an alias (``smollm2-135m``), the adapter names the alias as its base, and saving never
    asks a hub whether the alias has a config.json (offline that lookup fails or hangs)."""
    import peft.utils.save_and_load as peft_save
    from peft import LoraConfig, get_peft_model

    from pipeline.models import adapter_base_model
    from pipeline.sft import save_adapter

    def no_hub(repo_id, filename, **kwargs):
        raise AssertionError(f"asked a hub about {repo_id}/{filename}")

    monkeypatch.setattr(peft_save, "check_file_exists_on_hf_hub", no_hub)
    model, tokenizer = load_model(str(tiny_model_dir))
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    adapter = save_adapter(model, tokenizer, tmp_path / "adapter", base_model_name="smollm2-135m")
    assert adapter_base_model(adapter) == "smollm2-135m"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["target_modules"]
    assert not list(adapter.glob("*.tmp"))


def test_the_val_reward_scores_episodes_with_grpos_default_reward(tmp_path):
    """The SFT curve's val reward is GRPO's default trajectory reward, averaged: solved episodes score above
    small talk, on the same scale as GRPO's val/reward/mean."""
    from pipeline.envs import oracle_policy
    from pipeline.evaluation import evaluate
    from pipeline.sft import ValSuccessCallback
    from pipeline.training.adapters import episode_total
    from pipeline.training.train import default_reward

    tasks = load_tasks("customer_service", "val")[:4]
    callback = ValSuccessCallback(None, None, tasks, SFTArguments(), tmp_path / "adapter", tmp_path / "curve.json")
    solved = evaluate(oracle_policy, tasks, max_turns=12).trajectories
    chatty = evaluate(lambda task: lambda messages: "Our store was founded in 1998.", tasks, max_turns=4).trajectories
    reward = default_reward(None, tasks)
    expected = sum(episode_total(reward(t)) for t in solved) / len(solved)
    assert callback.mean_reward(solved) == pytest.approx(expected)
    assert callback.mean_reward(solved) > callback.mean_reward(chatty) + 0.5
