"""Tests for rewards/model.py: the reward-model scorers and training, on a tiny config-built checkpoint.

The tiny model (tests/conftest.py: two layers, hidden size 16, byte-level tokenizer) stands in for the
embedded SmolLM2 backbone: these tests check wiring, shapes, what trains and what is frozen, not
accuracy (the real run's accuracy is in benchmarks/results/reward_model.json).
"""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import pytest
import torch

from pipeline.cli import main
from rewards import build_reward
from rewards.model import (
    RewardModelScorer,
    RMTrainConfig,
    TurnRewardModelScorer,
    encode,
    load_reward_model,
    reward_logits,
    rm_messages,
    truncate_backbone,
)

from .conftest import ORDER, assistant, call, chat, result, user

PAIRS = Path(__file__).resolve().parents[2] / "data" / "preferences"


def refund_chat():
    return chat(user("My yoga mat arrived damaged."),
                assistant("To verify your identity, could you please give me your email address and zip code?"),
                user("omar@example.com, 92433"),
                assistant(call("get_order", order_id="W1000001")),
                result("get_order", ORDER),
                assistant("I can refund the yoga mat ($28.00). Shall I go ahead?"),
                user("Yes."))


@pytest.fixture(scope="module")
def rm_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny causal LM saved as a (randomly initialised) sequence classifier."""
    torch.manual_seed(0)
    model, tokenizer = load_reward_model(tiny_model_dir)
    path = tmp_path_factory.mktemp("tiny-rm")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_the_view_drops_the_system_prompt_and_compacts_tools():
    view = rm_messages(refund_chat().messages)
    assert [m["role"] for m in view][:2] == ["user", "assistant"]
    tool = next(m for m in view if m["role"] == "tool")
    assert tool["content"].startswith("get_order ok: order_id=W1000001 status=delivered")


def test_encode_keeps_the_opening_and_the_end(rm_dir: Path):
    _, tokenizer = load_reward_model(rm_dir)
    messages = refund_chat().messages
    full = encode(tokenizer, messages, 10_000)
    cut = encode(tokenizer, messages, 100, head_frac=0.3)
    assert len(cut) == 100 and cut[:30] == full[:30] and cut[30:] == full[-70:]


def test_episode_scorer_is_tanh_of_the_logit_over_scale(rm_dir: Path):
    scorer = RewardModelScorer(str(rm_dir), max_length=256, scale=2.0)
    trajectory = refund_chat()
    score = scorer(trajectory)
    model, tokenizer = load_reward_model(rm_dir)
    (logit,) = reward_logits(model, tokenizer, [encode(tokenizer, trajectory.messages, 256)])
    assert score.value == pytest.approx(math.tanh(logit / 2.0), abs=1e-5)
    assert -1.0 < score.value < 1.0 and scorer(trajectory) == score  # deterministic


def test_turn_scores_telescope_to_the_episode_change(rm_dir: Path):
    trajectory = refund_chat()
    turn, episode = TurnRewardModelScorer(str(rm_dir)), RewardModelScorer(str(rm_dir))
    per_turn = [turn(trajectory, i).value for i in range(trajectory.num_turns)]
    opening = episode._value(trajectory.messages[:2])  # system prompt + the customer's first message
    assert sum(per_turn) == pytest.approx(episode(trajectory).value - opening, abs=1e-5)


def test_scorers_pickle_as_a_path_and_reject_bad_params(rm_dir: Path):
    scorer = RewardModelScorer(str(rm_dir), max_length=64)
    scorer(refund_chat())
    assert scorer._loaded is not None
    clone = pickle.loads(pickle.dumps(scorer))
    assert clone._loaded is None and (clone.model, clone.max_length) == (str(rm_dir), 64)
    with pytest.raises(ValueError, match="max_length"):
        RewardModelScorer(str(rm_dir), max_length=2)
    with pytest.raises(ValueError, match="scale"):
        TurnRewardModelScorer(str(rm_dir), scale=0)


def test_reward_model_in_a_yaml_reward(rm_dir: Path):
    reward = build_reward({"scorers": [
        {"scorer": "reward_model", "weight": 0.5, "params": {"model": str(rm_dir), "max_length": 128}},
        {"scorer": "rewards.model:TurnRewardModelScorer", "weight": 0.5, "params": {"model": str(rm_dir)}},
    ]})
    b = reward(refund_chat())
    assert b.ok and set(b.components) == {"reward_model", "turn_reward_model"}
    assert len(b.components["turn_reward_model"]) == 3


def test_a_missing_model_directory_is_a_recorded_failure(tmp_path: Path):
    reward = build_reward({"scorers": [{"scorer": "reward_model", "params": {"model": str(tmp_path / "none")}}]})
    b = reward(refund_chat())
    assert not b.ok and "reward_model" in b.failed and b.total == 0.0


def test_a_truncated_backbone_saves_and_scores_at_its_new_depth(rm_dir: Path, tmp_path: Path):
    model, tokenizer = load_reward_model(rm_dir)
    assert truncate_backbone(model, -1) == 2 and truncate_backbone(model, 5) == 2  # nothing to cut
    assert truncate_backbone(model, 1) == 1
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reloaded, _ = load_reward_model(tmp_path)
    assert reloaded.config.num_hidden_layers == 1 and len(reloaded.model.layers) == 1
    assert -1.0 < RewardModelScorer(str(tmp_path))(refund_chat()).value < 1.0


def test_config_errors_say_how_to_fix(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="prepare.py"):
        RMTrainConfig(train_pairs=tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="max_length"):
        RMTrainConfig(max_length=4)
    with pytest.raises(ValueError, match="train_layers"):
        RMTrainConfig(train_layers=-2)
    with pytest.raises(ValueError, match="backbone_layers"):
        RMTrainConfig(backbone_layers=0)
    assert RMTrainConfig(eval_pairs="none").eval_pairs is None


def test_rm_train_trains_the_top_layer_and_head_only_and_reports_accuracy(
        tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "rm"
    status = main(["rm", "train", "--model", str(tiny_model_dir), "--output-dir", str(out),
                   "--limit", "8",  # shrunk from 240 pairs: checks the wiring, not the accuracy
                   "--eval-limit", "4", "--batch-size", "4", "--max-length", "96",  # byte tokens: short texts
                   "--train-layers", "1", "--learning-rate", "1e-3", "--epochs", "2",
                   "--out", str(tmp_path / "metrics.json")])
    assert status == 0
    printed = capsys.readouterr().out
    assert "held-out pairwise accuracy:" in printed and "on 4 pairs" in printed
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert (metrics["steps"], metrics["train_pairs"], metrics["eval_pairs"]) == (4, 8, 4)  # 8 pairs / 4 x 2 epochs
    assert len(metrics["loss_log"]) == 4 and all(math.isfinite(x) for x in metrics["loss_log"])
    assert math.isfinite(metrics["train_loss"]) and 0.0 <= metrics["held_out"]["accuracy"] <= 1.0
    assert set(metrics["held_out"]["by_corruption"]) <= {"skipped_verification", "policy_violation",
                                                          "hallucinated_claim", "rude_or_evasive"}

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).model
    trained = AutoModelForSequenceClassification.from_pretrained(out / "final").model
    assert torch.equal(base.layers[0].mlp.up_proj.weight, trained.layers[0].mlp.up_proj.weight)  # frozen
    assert torch.equal(base.embed_tokens.weight, trained.embed_tokens.weight)  # frozen
    assert not torch.equal(base.layers[1].mlp.up_proj.weight, trained.layers[1].mlp.up_proj.weight)  # trained
    # The saved model is what the scorer loads.
    assert -1.0 < RewardModelScorer(str(out / "final"), max_length=96)(refund_chat()).value < 1.0
