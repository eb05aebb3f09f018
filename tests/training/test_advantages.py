"""Tests for pipeline/training/advantages.py: the registry, and every estimator on hand-computed values.

Every expected number is derived by hand in the test, with the arithmetic in a comment; none is computed
by calling the estimator under test.
"""

from __future__ import annotations

import doctest
import io
import math
import re
from pathlib import Path

import pytest
import torch

from pipeline.training import advantages as adv
from pipeline.training.advantages import ESTIMATORS, AdvantageInput, register_estimator
from pipeline.training.config import RolloutConfig

EPS = 1e-4  # what TRL's GRPO adds to a standard deviation before dividing


def per_turn(values):
    """Flatten [[a, a], [b]] -> [a, a, b] for approx comparisons."""
    return [v for row in values for v in row]


def test_doctests():
    assert doctest.testmod(adv).failed == 0


# -- the registry ------------------------------------------------------------------------------------


def test_every_estimator_is_registered_under_its_name():
    assert set(ESTIMATORS) == {"group_based", "rloo", "grpo_passk", "reinforce_pp", "opo", "gpg",
                               "group_based_per_turn", "monte_carlo", "gae"}
    # only group_based lets TRL's own advantages stand in training
    assert [name for name, r in ESTIMATORS.items() if r.trl_advantages] == ["group_based"]
    # the critic is a class with state; the others are plain functions
    assert adv.has_state(adv.build_estimator("gae")) and not adv.has_state(adv.build_estimator("rloo"))
    assert adv.build_estimator("gae") is not adv.build_estimator("gae")  # a fresh critic per trainer


def test_an_unknown_estimator_is_refused_with_the_registered_names():
    with pytest.raises(ValueError) as error:
        RolloutConfig(advantage="ppo_critic")
    message = str(error.value)
    assert message.startswith("RolloutConfig.advantage='ppo_critic' is not an estimator; use one of group_based, rloo")
    assert all(name in message for name in ESTIMATORS) and "@register_estimator" in message


def test_rollout_config_help_lists_the_registered_estimators():
    from dataclasses import fields

    help_text = next(f for f in fields(RolloutConfig) if f.name == "advantage").metadata["help"]
    assert all(name in help_text for name in ESTIMATORS)


def test_adding_an_estimator_is_one_decorated_function():
    @register_estimator("test_best_of_group")
    def best_of_group(batch: AdvantageInput) -> list[list[float]]:
        best = {g: max(batch.totals[i] for i in idx) for g, idx in batch.groups().items()}
        return batch.spread([1.0 if r == best[g] else 0.0 for r, g in zip(batch.totals, batch.group_ids)])

    try:
        assert RolloutConfig(advantage="test_best_of_group").advantage == "test_best_of_group"
        out = adv.build_estimator("test_best_of_group")(AdvantageInput([[0.2, 0.3], [0.1]], ["a", "a"]))
        assert out == [[1.0, 1.0], [0.0]]  # totals 0.5 and 0.1: the first is its group's best
        register_estimator("test_best_of_group")(best_of_group)  # the same function again: a no-op
        with pytest.raises(ValueError, match="'test_best_of_group' is already registered"):
            register_estimator("test_best_of_group")(lambda batch: [])
    finally:
        ESTIMATORS.pop("test_best_of_group")


def test_no_estimator_is_named_in_the_trainer_the_callbacks_or_train():
    """The framework code reads estimators from the registry only: no if-chain on a name."""
    root = Path(adv.__file__).parent
    for module in ("grpo_trainer.py", "callbacks.py", "train.py"):
        source = (root / module).read_text()
        named = [name for name in ESTIMATORS if re.search(rf"\b{name}\b", source)]
        assert named == [], (module, named)


def test_input_validation_names_the_field_and_the_fix():
    with pytest.raises(ValueError, match=r"AdvantageInput.group_ids has 1 entries for 2 episodes"):
        AdvantageInput([[1.0], [0.0]], [0])
    with pytest.raises(ValueError, match=r"episode 0: 2 turn rewards for 1 turn spans"):
        AdvantageInput([[1.0, 0.0]], [0], turn_spans=[[(0, 3)]])
    with pytest.raises(ValueError, match=r"scale_rewards='std'.*'group', 'batch' or 'none'"):
        AdvantageInput([[1.0]], [0], scale_rewards="std")
    with pytest.raises(ValueError, match=r"opo estimator weighs turns by their tokens: AdvantageInput.turn_spans"):
        adv.opo(AdvantageInput([[1.0]], [0]))
    with pytest.raises(ValueError, match=r"grpo_passk estimator reads each episode's success"):
        adv.grpo_passk(AdvantageInput([[1.0]], [0], passk=1))
    with pytest.raises(ValueError, match=r"gae estimator reads the policy's hidden states"):
        adv.build_estimator("gae")(AdvantageInput([[1.0]], [0]))
    # totals default to the sum of the turn rewards (terminal included on the last turn)
    assert AdvantageInput([[0.25, 0.5], [1.0]], [0, 0]).totals == [0.75, 1.0]


# -- episode-level -----------------------------------------------------------------------------------


def test_group_based_is_trls_grpo_formula():
    # group a: totals 1, 0, 0, 1 -> mean 0.5; sample std sqrt((4 * 0.25) / 3) = sqrt(1/3)
    # group b: 0.2, 0.8 -> mean 0.5; sample std sqrt((0.09 + 0.09) / 1) = sqrt(0.18)
    batch = AdvantageInput([[1.0], [0.0], [0.2], [0.0], [1.0], [0.8]], ["a", "a", "b", "a", "a", "b"])
    sa, sb = math.sqrt(1 / 3), math.sqrt(0.18)
    expected = [0.5 / (sa + EPS), -0.5 / (sa + EPS), -0.3 / (sb + EPS), -0.5 / (sa + EPS), 0.5 / (sa + EPS),
                0.3 / (sb + EPS)]
    assert per_turn(adv.group_based(batch)) == pytest.approx(expected, rel=1e-6)
    # A group with identical rewards has zero advantage (no learning signal).
    assert adv.group_based(AdvantageInput([[0.3], [0.3]], [0, 0])) == [[0.0], [0.0]]
    # Dr. GRPO (scale_rewards="none"): no std scaling. 1, 0, 0, 0 -> mean 0.25
    unscaled = AdvantageInput([[1.0], [0.0], [0.0], [0.0]], [0] * 4, scale_rewards="none")
    assert adv.group_based(unscaled) == [[0.75], [-0.25], [-0.25], [-0.25]]
    # scale_rewards="batch": the batch's sample std. totals 1, 0 | 1, 1 -> group means 0.5 and 1;
    # batch mean 0.75, std sqrt((0.0625 * 3 + 0.5625) / 3) = 0.5
    batched = AdvantageInput([[1.0], [0.0], [1.0], [1.0]], [0, 0, 1, 1], scale_rewards="batch")
    assert per_turn(adv.group_based(batched)) == pytest.approx([0.5 / (0.5 + EPS), -0.5 / (0.5 + EPS), 0.0, 0.0])
    # every turn of an episode carries the episode's advantage
    assert adv.group_based(AdvantageInput([[0.5, 0.5], [0.0]], [0, 0], scale_rewards="none")) == [[0.5, 0.5], [-0.5]]


def test_rloo_subtracts_the_leave_one_out_mean():
    # rewards 3, 1, 2: baselines (1+2)/2=1.5, (3+2)/2=2.5, (3+1)/2=2
    assert adv.rloo(AdvantageInput([[3.0], [1.0], [2.0]], [0, 0, 0])) == [[1.5], [-1.5], [0.0]]
    assert adv.rloo(AdvantageInput([[5.0]], [0])) == [[0.0]]
    # the episode total is what counts (a clipped total differs from the turns' sum), on every turn
    assert adv.rloo(AdvantageInput([[2.0, 2.0], [0.0]], [0, 0], totals=[1.0, 0.0])) == [[1.0, 1.0], [-1.0]]


@pytest.mark.parametrize("successes, k, expected", [
    # N=4, one success, k=2: rho = 1 - C(3,2)/C(4,2) = 0.5, sigma = 0.5
    # A_pos = 0.5/0.5 = 1; A_neg = (0.5 - C(2,1)/C(3,1)) / 0.5 = -1/3
    ([1, 0, 0, 0], 2, [1.0, -1 / 3, -1 / 3, -1 / 3]),
    # N=4, two successes, k=2: rho = 1 - C(2,2)/C(4,2) = 5/6, sigma = sqrt(5/36)
    # A_pos = (1/6)/sigma; A_neg = (1/6 - C(1,1)/C(3,1)) / sigma = (-1/6)/sigma
    ([1, 1, 0, 0], 2, [(1 / 6) / math.sqrt(5 / 36)] * 2 + [(-1 / 6) / math.sqrt(5 / 36)] * 2),
    # k=1 reduces to GRPO with binary rewards: rho = 1/4, sigma = sqrt(3/16)
    ([1, 0, 0, 0], 1, [0.75 / math.sqrt(3 / 16)] + [-0.25 / math.sqrt(3 / 16)] * 3),
    ([0, 0, 0, 0], 2, [0.0] * 4),  # no success: no signal
    ([1, 1, 1, 1], 2, [0.0] * 4),
])
def test_grpo_passk(successes, k, expected):
    batch = AdvantageInput([[0.0]] * 4, [0] * 4, successes=[bool(s) for s in successes], passk=k)
    assert per_turn(adv.grpo_passk(batch)) == pytest.approx(expected, abs=1e-6)


def test_grpo_passk_needs_k_samples_per_group():
    with pytest.raises(ValueError, match="at least k=3 episodes per group, got 2; raise num_generations"):
        adv.grpo_passk(AdvantageInput([[1.0], [0.0]], [0, 0], successes=[True, False], passk=3))


# -- REINFORCE++ ---------------------------------------------------------------------------------------


def test_reinforce_pp_whitens_returns_over_the_batchs_tokens():
    # episode 0: rewards 0, 1 over turns of 2 and 1 tokens -> G = [1, 1]
    # episode 1: reward 0.5 over 3 tokens                   -> G = [0.5]
    # episode 2: rewards 0, 0 over 1 and 1 tokens           -> G = [0, 0]
    # N = 2 + 1 + 3 + 1 + 1 = 8 tokens; mean = (2*1 + 1*1 + 3*0.5) / 8 = 4.5/8 = 0.5625
    # deviations: 0.4375 (3 tokens), -0.0625 (3 tokens), -0.5625 (2 tokens)
    # sum of squares = 3*0.19140625 + 3*0.00390625 + 2*0.31640625 = 1.21875; unbiased var = 1.21875/7
    batch = AdvantageInput([[0.0, 1.0], [0.5], [0.0, 0.0]], ["a", "a", "b"],
                           turn_spans=[[(0, 2), (5, 6)], [(0, 3)], [(0, 1), (2, 3)]])
    std = math.sqrt(1.21875 / 7 + 1e-8)
    out = adv.reinforce_pp(batch)
    assert per_turn(out) == pytest.approx([0.4375 / std, 0.4375 / std, -0.0625 / std, -0.5625 / std, -0.5625 / std],
                                          rel=1e-9)
    # the batch is the baseline, not the group: regrouping changes nothing
    regrouped = AdvantageInput(batch.turn_rewards, ["x", "y", "z"], turn_spans=batch.turn_spans)
    assert adv.reinforce_pp(regrouped) == out


def test_reinforce_pp_discounts_over_turns():
    # gamma 0.5: episode 0 rewards 0, 1 (1 token each) -> G = [0 + 0.5*1, 1] = [0.5, 1]; episode 1 reward 1 over
    # 2 tokens -> G = [1]. N = 4, mean = (0.5 + 1 + 2*1) / 4 = 0.875; deviations -0.375, 0.125, 0.125 (x2)
    # sum of squares = 0.140625 + 0.015625 + 2*0.015625 = 0.1875; var = 0.1875/3 = 0.0625; std = 0.25
    batch = AdvantageInput([[0.0, 1.0], [1.0]], [0, 0], turn_spans=[[(0, 1), (3, 4)], [(0, 2)]], gamma=0.5)
    assert per_turn(adv.reinforce_pp(batch)) == pytest.approx([-1.5, 0.5, 0.5], rel=1e-6)
    # fewer than two tokens: no variance to normalise by
    assert adv.reinforce_pp(AdvantageInput([[1.0]], [0], turn_spans=[[(0, 1)]])) == [[0.0]]


# -- OPO -------------------------------------------------------------------------------------------------


def test_opo_subtracts_the_length_weighted_group_mean():
    # group a: totals 1.0 (clipped; its turns sum to 1.1), 0.0, 0.5 with 4, 8 and 4 sampled tokens
    #   b = (4*1.0 + 8*0.0 + 4*0.5) / (4 + 8 + 4) = 6/16 = 0.375  (the plain mean would be 0.5)
    #   A = 1.0 - 0.375 = 0.625, 0.0 - 0.375 = -0.375, 0.5 - 0.375 = 0.125
    # group b: one episode -> its baseline is its own total -> 0
    batch = AdvantageInput([[0.2, 0.9], [0.0], [0.5], [0.7]], ["a", "a", "a", "b"], totals=[1.0, 0.0, 0.5, 0.7],
                           turn_spans=[[(0, 2), (6, 8)], [(0, 8)], [(0, 4)], [(0, 3)]])
    assert adv.opo(batch) == [[0.625, 0.625], [-0.375], [0.125], [0.0]]


def test_opo_with_equal_lengths_is_the_group_mean_baseline():
    # equal lengths (3 tokens each): b = (3*1 + 3*0 + 3*0 + 3*0) / 12 = 0.25 -> A = 0.75, -0.25, -0.25, -0.25
    batch = AdvantageInput([[1.0], [0.0], [0.0], [0.0]], [0] * 4, turn_spans=[[(0, 3)]] * 4)
    assert adv.opo(batch) == [[0.75], [-0.25], [-0.25], [-0.25]]


# -- GPG -------------------------------------------------------------------------------------------------


def gpg_batch(scale_rewards: str) -> AdvantageInput:
    # group a: 1, 0, 0, 1 (mean 0.5); group b: 1, 1 and group c: 0, 0 carry no signal.
    return AdvantageInput([[1.0], [0.0], [0.0], [1.0], [1.0], [1.0], [0.0], [0.0]],
                          ["a", "a", "a", "a", "b", "b", "c", "c"], scale_rewards=scale_rewards)


def test_gpg_rescales_by_the_share_of_episodes_with_signal():
    # B = 8 episodes, M = 4 in the flat groups b and c -> alpha = 8 / (8 - 4) = 2
    # scale_rewards="none" (F_norm = 1): group a -> 2 * (1 - 0.5) = 1, 2 * (0 - 0.5) = -1; b, c -> 0
    assert adv.gpg(gpg_batch("none")) == [[1.0], [-1.0], [-1.0], [1.0], [0.0], [0.0], [0.0], [0.0]]
    # "group": F_norm = group a's sample std sqrt(4 * 0.25 / 3) = sqrt(1/3), plus 1e-4
    s = math.sqrt(1 / 3) + EPS
    assert per_turn(adv.gpg(gpg_batch("group"))) == pytest.approx([1 / s, -1 / s, -1 / s, 1 / s, 0, 0, 0, 0])
    # "batch": F_norm = the batch's sample std: four 1s and four 0s, mean 0.5 -> sqrt(8 * 0.25 / 7) = sqrt(2/7)
    s = math.sqrt(2 / 7) + EPS
    assert per_turn(adv.gpg(gpg_batch("batch"))) == pytest.approx([1 / s, -1 / s, -1 / s, 1 / s, 0, 0, 0, 0])


def test_gpg_without_flat_groups_is_the_centred_reward_and_flat_batches_get_zero():
    # no flat group: alpha = 2/2 = 1; totals 1, 0 -> 0.5, -0.5 on every turn of each episode
    assert adv.gpg(AdvantageInput([[0.5, 0.5], [0.0]], [0, 0], scale_rewards="none")) == [[0.5, 0.5], [-0.5]]
    assert adv.gpg(AdvantageInput([[1.0], [1.0], [0.0], [0.0]], [0, 0, 1, 1])) == [[0.0]] * 4


# -- turn-level ------------------------------------------------------------------------------------------


def test_returns_to_go_and_group_based_per_turn():
    # episode 0: turn rewards 0, 1 -> G = [1, 1]; episode 1: 1, 0, 0 -> G = [1, 0, 0]; episode 2: 0 -> G = [0]
    rewards = [[0.0, 1.0], [1.0, 0.0, 0.0], [0.0]]
    assert adv.returns_to_go(rewards) == [[1.0, 1.0], [1.0, 0.0, 0.0], [0.0]]
    assert adv.returns_to_go([[1.0, 1.0]], gamma=0.5) == [[1.5, 1.0]]
    out = adv.group_based_per_turn(AdvantageInput(rewards, [0, 0, 0], scale_rewards="none"))
    # turn 0: G = 1, 1, 0 -> mean 2/3; turn 1: G = 1, 0 (episodes 0, 1) -> mean 1/2; turn 2: only episode 1 -> 0
    assert out[0] == pytest.approx([1 / 3, 0.5])
    assert out[1] == pytest.approx([1 / 3, -0.5, 0.0])
    assert out[2] == pytest.approx([-2 / 3])
    scaled = adv.group_based_per_turn(AdvantageInput(rewards, [0, 0, 0]))
    std0 = math.sqrt(((1 / 3) ** 2 * 2 + (2 / 3) ** 2) / 3)
    assert scaled[2][0] == pytest.approx((-2 / 3) / (std0 + EPS))
    assert scaled[0][1] == pytest.approx(0.5 / (0.5 + EPS))


def test_group_based_per_turn_credits_the_turn_that_earned_the_reward():
    """Two episodes that differ only in turn 0's reward: only turn 0 gets a non-zero advantage. Episode
    GRPO would give every turn of the episode the same +-0.5."""
    batch = AdvantageInput([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], [0, 0], scale_rewards="none")
    assert adv.group_based_per_turn(batch) == [[0.5, 0.0, 0.0], [-0.5, 0.0, 0.0]]
    assert adv.group_based(batch) == [[0.5, 0.5, 0.5], [-0.5, -0.5, -0.5]]


def test_monte_carlo():
    # batch-mean baseline: turn 0 mean of G (1, 1) = 1; turn 1 only episode 0 -> 1
    assert adv.monte_carlo(AdvantageInput([[0.0, 1.0], [1.0]], [0, 1])) == [[0.0, 0.0], [0.0]]
    # gamma 0.5: G = [0.5, 1] and [0]; b_0 = 0.25, b_1 = 1 -> [0.25, 0], [-0.25]
    assert adv.monte_carlo(AdvantageInput([[0.0, 1.0], [0.0]], [0, 1], gamma=0.5)) == [[0.25, 0.0], [-0.25]]


def test_gae_over_turns_by_hand():
    # r = [0, 0.5, 1], V = [0.2, 0.4, 0.6], gamma = 0.9, lambda = 0.8
    # delta_2 = 1 + 0 - 0.6 = 0.4
    # delta_1 = 0.5 + 0.9*0.6 - 0.4 = 0.64
    # delta_0 = 0 + 0.9*0.4 - 0.2 = 0.16
    # A_2 = 0.4; A_1 = 0.64 + 0.72*0.4 = 0.928; A_0 = 0.16 + 0.72*0.928 = 0.82816
    advantages, targets = adv.gae_over_turns([[0.0, 0.5, 1.0]], [[0.2, 0.4, 0.6]], gamma=0.9, lam=0.8)
    assert advantages[0] == pytest.approx([0.82816, 0.928, 0.4])
    assert targets[0] == pytest.approx([1.02816, 1.328, 1.0])
    # lambda = 1, gamma = 1: A_t = G_t - V_t (Monte-Carlo minus baseline)
    advantages, _ = adv.gae_over_turns([[0.0, 0.5, 1.0]], [[0.2, 0.4, 0.6]], gamma=1.0, lam=1.0)
    assert advantages[0] == pytest.approx([1.3, 1.1, 0.4])
    # lambda = 0: one-step TD errors
    advantages, _ = adv.gae_over_turns([[0.0, 0.5, 1.0]], [[0.2, 0.4, 0.6]], gamma=0.9, lam=0.0)
    assert advantages[0] == pytest.approx([0.16, 0.64, 0.4])
    with pytest.raises(ValueError, match="one value per turn"):
        adv.gae_over_turns([[0.0, 1.0]], [[0.0]])


def test_gae_estimator_uses_the_values_before_its_update_and_keeps_its_state():
    """The first batch's values are the zero-initialised head's, so the advantages are the plain returns;
    the head then fits the targets, and its state round-trips through state_dict()."""
    hidden = torch.randn(2, 2, 8, generator=torch.Generator().manual_seed(0))
    calls = []

    def hidden_states():
        calls.append(1)
        return hidden, [[0, 1], [0]]

    logged = {}
    batch = AdvantageInput([[0.0, 1.0], [0.5]], [0, 0], gamma=1.0, lam=1.0, value_lr=0.01, value_epochs=3,
                           hidden_states=hidden_states, log_metric=logged.__setitem__)
    gae = adv.build_estimator("gae")
    assert gae.state_dict() is None  # nothing learned yet
    # V = 0 everywhere, gamma = lambda = 1: A = G = [1, 1] and [0.5]
    assert gae(batch) == [[1.0, 1.0], [0.5]]
    assert len(calls) == 1 and logged["value/mean"] == 0.0
    # value loss of the last of the three steps, on targets G: below its value at V = 0, 0.5 * mean(1, 1, 0.25)
    assert 0.0 <= logged["value/loss"] < 0.5 * (1 + 1 + 0.25) / 3
    saved = io.BytesIO()
    torch.save(gae.state_dict(), saved)  # as a checkpoint holds it: no tensor shared with the live critic
    state = torch.load(io.BytesIO(saved.getvalue()), weights_only=True)
    assert state["hidden_size"] == 8 and set(state) == {"hidden_size", "head", "optimizer"}
    restored = adv.build_estimator("gae")
    restored.load_state_dict(state)
    assert torch.equal(restored.state_dict()["head"]["proj.weight"], state["head"]["proj.weight"])
    # both continue identically: same values, same advantages, same head after the next update
    assert restored(batch) == gae(batch)
    assert torch.equal(restored.head.proj.weight, gae.head.proj.weight)


def test_broadcast_turns_writes_shape_b_by_t():
    out = adv.broadcast_turns([[0.5, -1.0], [2.0]], [[(2, 4), (6, 7)], [(1, 2)]], length=8)
    assert out.shape == (2, 8)
    assert out.tolist() == [[0, 0, 0.5, 0.5, 0, 0, -1.0, 0], [0, 2.0, 0, 0, 0, 0, 0, 0]]
    with pytest.raises(ValueError, match="episode 0: 1 turn values for 2 turn spans"):
        adv.broadcast_turns([[0.5]], [[(0, 1), (2, 3)]], length=4)
