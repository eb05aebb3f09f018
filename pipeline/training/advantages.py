"""Advantage estimators for multi-turn episodes, and the registry that names them.

Notation. A *group* is the set of episodes rolled out from the same task (GRPO's "G completions per
prompt"). Episode ``i`` has assistant turns ``t = 0..K_i-1`` with per-turn rewards ``r_{i,t}`` (the
terminal reward is added to the last turn), an episode reward ``R_i`` (the reward's total, normally
``sum_t r_{i,t}``) and ``n_{i,t}`` sampled tokens in turn ``t``.

Every estimator has one signature, ``estimator(batch: AdvantageInput) -> list[list[float]]``: one list
per episode, one advantage per assistant turn. The trainer writes each turn's advantage onto that
turn's tokens (:func:`broadcast_turns`); the loss sees a ``(B, T)`` tensor that is zero off assistant
tokens. An episode-level estimator gives every turn of an episode the same value.

Adding an estimator is one decorated function::

    @register_estimator("my_baseline")
    def my_baseline(batch: AdvantageInput) -> list[list[float]]:
        mean = sum(batch.totals) / len(batch.totals)
        return batch.spread([r - mean for r in batch.totals])

after which ``RolloutConfig(advantage="my_baseline")`` and :func:`~pipeline.training.train.train` train with
it (``turnwise train --advantage`` knows the estimators registered here). An estimator that learns (a
critic) is a class registered the same way: its instances are called like the functions and expose
``state_dict()`` / ``load_state_dict()``, which the trainer saves into every checkpoint and restores on
resume; it reads the policy's hidden states through ``batch.hidden_states()``, which the trainer computes
only when called.

Registered here: ``group_based`` (GRPO; training keeps TRL's own advantages), ``rloo``, ``grpo_passk``,
``reinforce_pp``, ``opo``, ``gpg`` (episode-level or batch-normalised) and ``group_based_per_turn``,
``monte_carlo``, ``gae`` (turn-level; ``gae`` with a learned value head: PPO in multi-turn form).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Sequence

import torch

from pipeline.training.value_head import ValueHead

EPS = 1e-4  # added to a standard deviation before dividing by it, as TRL's GRPO does
ESTIMATOR_STATE_FILE = "estimator_state.pt"  # a stateful estimator's file in each checkpoint, unless it names one

Estimator = Callable[["AdvantageInput"], list[list[float]]]


def _ignore_metric(name: str, value: float) -> None:
    return None


@dataclass(frozen=True)
class AdvantageInput:
    """One rollout batch, as every estimator sees it.

    The per-episode fields are lists of length ``B`` (episodes) in the same order; ``turn_rewards[i]``
    and ``turn_spans[i]`` have one entry per assistant turn of episode ``i``.
    """

    turn_rewards: Sequence[Sequence[float]]
    """``r_{i,t}``: per-turn rewards, the terminal reward added to the last turn."""
    group_ids: Sequence[Hashable]
    """Episodes with the same id were rolled out from the same task (one group)."""
    totals: Sequence[float] | None = None
    """``R_i``: the reward's episode total; default ``sum_t r_{i,t}``."""
    successes: Sequence[bool] | None = None
    """The environment's strict success check per episode (``grpo_passk`` needs it)."""
    turn_spans: Sequence[Sequence[tuple[int, int]]] | None = None
    """``[start, end)`` token range of each assistant turn in the episode's completion; ``end - start`` is
    ``n_{i,t}``, which token-weighted estimators read through :meth:`turn_tokens`."""
    gamma: float = 1.0
    """Discount over turns."""
    lam: float = 0.95
    """GAE lambda over turns."""
    passk: int = 2
    """k of ``grpo_passk``."""
    scale_rewards: str = "group"
    """TRL's ``GRPOConfig.scale_rewards``: divide by the group's (``group``) or batch's (``batch``) reward
    standard deviation, or not (``none``)."""
    value_lr: float = 1e-3
    """Learning rate of a critic's own optimiser."""
    value_epochs: int = 4
    """A critic's optimiser steps per batch."""
    hidden_states: Callable[[], tuple[torch.Tensor, list[list[int]]]] | None = None
    """For critics: ``() -> (hidden (B, K, H), indices)``, the policy's hidden state before each turn
    (:func:`~pipeline.training.value_head.boundary_hidden_states`); computed on the first call only."""
    log_metric: Callable[[str, float], None] = _ignore_metric
    """``log_metric(name, value)`` logs a scalar with the trainer's metrics (averaged per logging step)."""
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
    """With several processes, ``all_reduce(tensor)`` sums a tensor over them (the same result on every one);
    a critic uses it to keep its state identical everywhere. None with one process."""

    def __post_init__(self) -> None:
        n = len(self.turn_rewards)
        for name in ("group_ids", "totals", "successes", "turn_spans"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"AdvantageInput.{name} has {len(value)} entries for {n} episodes "
                                 f"(turn_rewards); give one per episode.")
        if self.turn_spans is not None:
            for i, (rewards, spans) in enumerate(zip(self.turn_rewards, self.turn_spans)):
                if len(rewards) != len(spans):
                    raise ValueError(f"AdvantageInput episode {i}: {len(rewards)} turn rewards for {len(spans)} "
                                     "turn spans; give one span per assistant turn.")
        if self.scale_rewards not in ("group", "batch", "none"):
            raise ValueError(f"AdvantageInput.scale_rewards={self.scale_rewards!r}; use 'group', 'batch' or 'none' "
                             "(as TRL's GRPOConfig.scale_rewards).")
        if self.totals is None:
            object.__setattr__(self, "totals", [float(sum(r)) for r in self.turn_rewards])

    @property
    def scale(self) -> bool:
        """Whether rewards are divided by a standard deviation (``scale_rewards`` is not ``none``)."""
        return self.scale_rewards != "none"

    def groups(self) -> dict[Hashable, list[int]]:
        """Episode indices per group id, in order of first appearance."""
        groups: dict[Hashable, list[int]] = {}
        for i, g in enumerate(self.group_ids):
            groups.setdefault(g, []).append(i)
        return groups

    def spread(self, per_episode: Sequence[float]) -> list[list[float]]:
        """An episode-level advantage on every turn of its episode: ``[[A_i] * K_i for each i]``."""
        return [[float(a)] * len(r) for a, r in zip(per_episode, self.turn_rewards)]

    def turn_tokens(self, estimator: str) -> list[list[int]]:
        """``n_{i,t}``, the tokens of each turn; ``estimator`` names the caller for the error without spans."""
        if self.turn_spans is None:
            raise ValueError(f"The {estimator} estimator weighs turns by their tokens: AdvantageInput.turn_spans "
                             "is None; pass each turn's [start, end) token span.")
        return [[end - start for start, end in spans] for spans in self.turn_spans]

    def require_successes(self, estimator: str) -> list[bool]:
        """The success flags; ``estimator`` names the caller for the error when there are none."""
        if self.successes is None:
            raise ValueError(f"The {estimator} estimator reads each episode's success: AdvantageInput.successes "
                             "is None; pass the outcomes' success flags.")
        return list(self.successes)


# -- the registry ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Registration:
    """One registered estimator: a function, or a class whose instances are estimators (critics)."""

    name: str
    estimator: Estimator | type
    trl_advantages: bool = False
    """Training keeps TRL's own GRPO advantages (shape (B,)) instead of calling the estimator; the
    estimator computes the same numbers for use outside the trainer."""


ESTIMATORS: dict[str, Registration] = {}


def register_estimator(name: str, *, trl_advantages: bool = False) -> Callable[[Any], Any]:
    """Register an advantage estimator under ``name`` (the value of ``RolloutConfig.advantage``).

    Decorates a function ``(AdvantageInput) -> list[list[float]]`` or a class whose no-argument instances
    are such callables. A name can be registered once; registering it again with the same function (same
    module and name, as a reloaded module does) replaces it, and with another is an error.
    """

    def decorator(obj: Any) -> Any:
        existing = ESTIMATORS.get(name)
        if existing is not None and _qualname(existing.estimator) != _qualname(obj):
            raise ValueError(f"An advantage estimator named {name!r} is already registered "
                             f"({_qualname(existing.estimator)}); register {_qualname(obj)} under another name.")
        ESTIMATORS[name] = Registration(name, obj, trl_advantages)
        return obj

    return decorator


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def get_estimator(name: str) -> Registration:
    """The registration of ``name``; an unknown name is an error that lists the registered ones."""
    if name not in ESTIMATORS:
        raise ValueError(f"advantage={name!r} is not an estimator; use one of {', '.join(ESTIMATORS)} (the "
                         "registered ones; add yours with @register_estimator).")
    return ESTIMATORS[name]


def build_estimator(name: str) -> Estimator:
    """A ready estimator: the registered function, or a fresh instance of the registered class."""
    estimator = get_estimator(name).estimator
    return estimator() if isinstance(estimator, type) else estimator


def has_state(estimator: Any) -> bool:
    """Whether an estimator carries state across batches (and so into checkpoints)."""
    return callable(getattr(estimator, "state_dict", None)) and callable(getattr(estimator, "load_state_dict", None))


# -- shared pieces -----------------------------------------------------------------------------------


def returns_to_go(turn_rewards: Sequence[Sequence[float]], gamma: float = 1.0) -> list[list[float]]:
    """``G_{i,t} = sum_{t' >= t} gamma^(t'-t) r_{i,t'}`` for every episode and turn.

    >>> returns_to_go([[0.0, 0.5, 1.0]], gamma=0.5)
    [[0.5, 1.0, 1.0]]
    """
    out = []
    for rewards in turn_rewards:
        g, rtg = 0.0, []
        for r in reversed(rewards):
            g = r + gamma * g
            rtg.append(g)
        out.append(rtg[::-1])
    return out


def broadcast_turns(turn_values: Sequence[Sequence[float]], turn_spans: Sequence[Sequence[tuple[int, int]]],
                    length: int) -> torch.Tensor:
    """Write each turn's value onto its tokens: ``out[i, start:end] = turn_values[i][t]``; 0 elsewhere.

    ``turn_spans[i][t]`` is the ``[start, end)`` token range of episode ``i``'s turn ``t`` in a
    sequence of ``length`` tokens. Returns shape ``(B, length)``.

    >>> broadcast_turns([[1.0, -1.0]], [[(1, 3), (4, 5)]], 6).tolist()
    [[0.0, 1.0, 1.0, 0.0, -1.0, 0.0]]
    """
    out = torch.zeros(len(turn_values), length)
    for i, (vals, spans) in enumerate(zip(turn_values, turn_spans)):
        if len(vals) != len(spans):
            raise ValueError(f"episode {i}: {len(vals)} turn values for {len(spans)} turn spans")
        for v, (start, end) in zip(vals, spans):
            out[i, start:end] = v
    return out


def gae_over_turns(turn_rewards: Sequence[Sequence[float]], values: Sequence[Sequence[float]], gamma: float = 1.0,
                   lam: float = 0.95) -> tuple[list[list[float]], list[list[float]]]:
    """Generalised advantage estimation over turns (Schulman et al., 2016).

    ``V_{i,t}`` is the value of the state before assistant turn ``t``; the state after the last turn is
    terminal (``V = 0``). ``delta_t = r_t + gamma V_{t+1} - V_t`` and ``A_t = sum_l (gamma lam)^l delta_{t+l}``.
    Returns ``(advantages, value_targets)`` with ``value_targets = A + V`` (the lambda-returns the value
    head regresses on).

    >>> gae_over_turns([[0.0, 1.0]], [[0.5, 0.5]], gamma=1.0, lam=1.0)
    ([[0.5, 0.5]], [[1.0, 1.0]])
    """
    advantages, targets = [], []
    for rewards, vals in zip(turn_rewards, values):
        if len(rewards) != len(vals):
            raise ValueError(f"gae needs one value per turn: {len(rewards)} rewards, {len(vals)} values")
        adv, running = [0.0] * len(rewards), 0.0
        for t in reversed(range(len(rewards))):
            next_value = vals[t + 1] if t + 1 < len(vals) else 0.0
            delta = rewards[t] + gamma * next_value - vals[t]
            running = delta + gamma * lam * running
            adv[t] = running
        advantages.append(adv)
        targets.append([a + v for a, v in zip(adv, vals)])
    return advantages, targets


def _zero_variance_groups(batch: AdvantageInput) -> list[list[int]]:
    """The groups whose episodes all scored the same total (no learning signal in a group baseline)."""
    return [idx for idx in batch.groups().values()
            if max(batch.totals[i] for i in idx) - min(batch.totals[i] for i in idx) < 1e-8]


# -- episode-level and batch-normalised estimators ---------------------------------------------------


@register_estimator("group_based", trl_advantages=True)
def group_based(batch: AdvantageInput) -> list[list[float]]:
    """GRPO (Shao et al., 2024, "DeepSeekMath"), exactly as TRL 1.16's ``GRPOTrainer`` computes it.

    ``A_i = (R_i - mean_g R) / (std_g R + 1e-4)`` with the sample (Bessel-corrected) standard deviation;
    ``scale_rewards="batch"`` divides by the batch's standard deviation instead, ``"none"`` does not
    divide (Dr. GRPO). Float32, with TRL's own reductions. Training keeps TRL's advantages for this
    estimator (``trl_advantages=True``); this function gives the same numbers to anyone else.

    >>> group_based(AdvantageInput([[1.0], [0.0], [0.5], [0.5]], [0, 0, 1, 1]))
    [[0.7070068120956421], [-0.7070068120956421], [0.0], [0.0]]
    """
    from trl.trainer.utils import nanstd

    rewards = torch.tensor(batch.totals, dtype=torch.float32)
    out = torch.zeros_like(rewards)
    batch_std = nanstd(rewards) if rewards.numel() > 1 else torch.zeros(())
    for idx in batch.groups().values():
        r = rewards[idx].view(1, -1)
        advantages = r - torch.nanmean(r, dim=1)
        if batch.scale_rewards == "group":
            std = nanstd(r, dim=1) if len(idx) > 1 else torch.zeros(1)
            advantages = advantages / (std + EPS)
        elif batch.scale_rewards == "batch":
            advantages = advantages / (batch_std + EPS)
        out[idx] = torch.nan_to_num(advantages, nan=0.0).view(-1)
    return batch.spread(out.tolist())


@register_estimator("rloo")
def rloo(batch: AdvantageInput) -> list[list[float]]:
    """REINFORCE leave-one-out (Ahmadian et al., 2024): ``A_i = R_i - mean_{j in g, j != i} R_j``.

    Equal to ``n/(n-1) * (R_i - mean_g R)``; a group of one gets 0. Every turn of an episode gets ``A_i``.

    >>> rloo(AdvantageInput([[1.0], [0.0], [0.0]], [0, 0, 0]))
    [[1.0], [-0.5], [-0.5]]
    """
    rewards = torch.tensor([float(r) for r in batch.totals])
    out = torch.zeros_like(rewards, dtype=torch.float32)
    for idx in batch.groups().values():
        n = len(idx)
        if n > 1:
            r = rewards[idx].float()
            out[idx] = r - (r.sum() - r) / (n - 1)
    return batch.spread(out.tolist())


@register_estimator("grpo_passk")
def grpo_passk(batch: AdvantageInput) -> list[list[float]]:
    """Pass@k advantages (Chen et al., 2025, "Pass@k Training"), analytic form on the success flags.

    For a group of ``N`` episodes with ``N_neg`` failures, the group's pass@k is
    ``rho = 1 - C(N_neg, k) / C(N, k)`` and ``sigma = sqrt(rho (1 - rho))``. Then
    ``A_pos = (1 - rho) / sigma`` and ``A_neg = (1 - rho - C(N_neg - 1, k - 1) / C(N - 1, k - 1)) / sigma``.
    A failure is penalised only to the extent that it appears in k-subsets with no success, so the
    policy is pushed to explore rather than to collapse onto one answer. Groups with ``rho`` of 0 or 1
    get 0. ``k`` is ``batch.passk``.

    >>> grpo_passk(AdvantageInput([[0.0]] * 4, [0] * 4, successes=[True, False, False, False], passk=2))
    [[1.0], [-0.3333333432674408], [-0.3333333432674408], [-0.3333333432674408]]
    """
    k = batch.passk
    successes = torch.tensor(batch.require_successes("grpo_passk"))
    out = torch.zeros(len(successes), dtype=torch.float32)
    for idx in batch.groups().values():
        n = len(idx)
        if n < k:
            raise ValueError(f"grpo_passk needs at least k={k} episodes per group, got {n}; raise num_generations "
                             "or lower passk.")
        s = successes[idx].bool()
        n_neg = int((~s).sum())
        rho = 1.0 - math.comb(n_neg, k) / math.comb(n, k)
        if rho <= 0.0 or rho >= 1.0:
            continue
        sigma = math.sqrt(rho * (1.0 - rho))
        a_pos = (1.0 - rho) / sigma
        a_neg = (1.0 - rho - math.comb(n_neg - 1, k - 1) / math.comb(n - 1, k - 1)) / sigma
        out[idx] = torch.where(s, torch.tensor(a_pos), torch.tensor(a_neg))
    return batch.spread(out.tolist())


@register_estimator("reinforce_pp")
def reinforce_pp(batch: AdvantageInput) -> list[list[float]]:
    """REINFORCE++ (Hu et al., 2025, "REINFORCE++: An Efficient RLHF Algorithm with Robustness to Both
    Prompt and Reward Models", arXiv:2501.03262): critic-free returns, normalised over the whole batch.

    Formula: the token's return ``G_t = sum_{s >= t} gamma^(s-t) r_s``, whitened over every trained token
    of the batch, ``A = (G - mean) / sqrt(var + 1e-8)`` with the token-weighted mean and the unbiased
    variance (verl's ``compute_reinforce_plus_plus_outcome_advantage`` with ``masked_whiten``). The
    baseline is the global batch rather than each prompt's group, which the paper argues keeps
    easy prompts from being over-fitted.

    Multi-turn reading: a turn's tokens share the turn's return-to-go ``G_{i,t}`` over turns (``gamma``),
    and the mean and variance weigh turn ``t`` by its ``n_{i,t}`` tokens, so the advantages of the batch's
    assistant tokens have mean 0 and unit (sample) variance. The paper's per-token KL penalty stays in
    TRL's loss (``beta``). A batch of fewer than two tokens gets 0.

    >>> reinforce_pp(AdvantageInput([[1.0], [0.0]], [0, 1], turn_spans=[[(0, 1)], [(0, 1)]]))
    [[0.7071067741154798], [-0.7071067741154798]]
    """
    returns = returns_to_go(batch.turn_rewards, batch.gamma)
    tokens = batch.turn_tokens("reinforce_pp")
    count = sum(map(sum, tokens))
    if count < 2:
        return [[0.0] * len(g) for g in returns]
    mean = sum(n * g for ns, gs in zip(tokens, returns) for n, g in zip(ns, gs)) / count
    variance = sum(n * (g - mean) ** 2 for ns, gs in zip(tokens, returns) for n, g in zip(ns, gs)) / (count - 1)
    scale = 1.0 / math.sqrt(variance + 1e-8)
    return [[(g - mean) * scale for g in gs] for gs in returns]


@register_estimator("opo")
def opo(batch: AdvantageInput) -> list[list[float]]:
    """OPO's optimal reward baseline (Hao et al., 2025, "On-Policy RL with Optimal Reward Baseline",
    arXiv:2505.23585): a length-weighted group mean.

    Formula: ``b_g = sum_{j in g} |o_j| R_j / sum_{j in g} |o_j|`` and ``A_i = R_i - b_g``, where ``|o_j|``
    is the response's length: the baseline that minimises the gradient's variance when the squared
    gradient norm grows with length (verl's ``compute_opo_outcome_advantage``). The paper pairs it with
    exact on-policy training: ``num_iterations=1``, one optimiser step per rollout batch.

    Multi-turn reading: ``|o_j| = sum_t n_{j,t}``, the tokens episode ``j``'s policy sampled over all its
    turns (the tokens its gradient runs through); every turn of episode ``i`` gets ``A_i``. A group of one
    gets 0 (its baseline would be its own reward; verl's gives such an episode its whole reward).

    >>> opo(AdvantageInput([[1.0], [0.0]], [0, 0], turn_spans=[[(0, 1)], [(0, 3)]]))
    [[0.75], [-0.25]]
    """
    lengths = [sum(ns) for ns in batch.turn_tokens("opo")]
    out = [0.0] * len(lengths)
    for idx in batch.groups().values():
        weight = sum(lengths[i] for i in idx)
        if len(idx) < 2 or weight == 0:  # no other episode to compare with
            continue
        baseline = sum(lengths[i] * batch.totals[i] for i in idx) / weight
        for i in idx:
            out[i] = batch.totals[i] - baseline
    return batch.spread(out)


@register_estimator("gpg")
def gpg(batch: AdvantageInput) -> list[list[float]]:
    """Group Policy Gradient (Chu et al., 2025, "GPG: A Simple and Strong Reinforcement Learning Baseline
    for Model Reasoning", arXiv:2504.02546): the group-centred reward, rescaled for the groups that carry
    no signal.

    Formula: ``A_i = alpha (R_i - mean_g R) / F_norm`` with ``alpha = B / (B - M)``: ``B`` episodes in the
    batch, ``M`` of them in groups whose rewards are all equal (their centred reward is 0, so without
    ``alpha`` the batch-mean loss shrinks by ``(B - M) / B``; the paper's "accurate gradient
    estimation"). ``F_norm`` is the group's sample standard deviation (``+ 1e-4``) with
    ``scale_rewards="group"``, the batch's with ``"batch"``, and 1 with ``"none"`` (verl's
    ``compute_gpg_outcome_advantage`` default). GPG's loss is the plain policy gradient averaged over
    tokens: TRL's ``loss_type="dapo"`` with ``num_iterations=1`` (the ratio is 1, so nothing is clipped)
    and ``beta=0``.

    Multi-turn reading: ``R_i`` is the episode's total and every turn of episode ``i`` gets ``A_i``;
    ``alpha`` counts episodes of this rollout batch. A batch where every group is flat gets 0.

    >>> gpg(AdvantageInput([[1.0], [0.0], [1.0], [1.0]], [0, 0, 1, 1], scale_rewards="none"))
    [[1.0], [-1.0], [0.0], [0.0]]
    """
    invalid = sum(len(idx) for idx in _zero_variance_groups(batch))
    valid = len(batch.totals) - invalid
    if valid == 0:
        return batch.spread([0.0] * len(batch.totals))
    alpha = len(batch.totals) / valid
    batch_std = _sample_std(batch.totals)
    out = [0.0] * len(batch.totals)
    for idx in batch.groups().values():
        rewards = [batch.totals[i] for i in idx]
        mean = sum(rewards) / len(rewards)
        norm = {"group": _sample_std(rewards) + EPS, "batch": batch_std + EPS, "none": 1.0}[batch.scale_rewards]
        for i in idx:
            out[i] = alpha * (batch.totals[i] - mean) / norm
    return batch.spread(out)


def _sample_std(values: Sequence[float]) -> float:
    """The Bessel-corrected standard deviation; 0 for fewer than two values."""
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


# -- turn-level estimators ---------------------------------------------------------------------------


@register_estimator("group_based_per_turn")
def group_based_per_turn(batch: AdvantageInput) -> list[list[float]]:
    """Turn-level GRPO: returns-to-go normalised within the group at each turn index.

    ``A_{i,t} = (G_{i,t} - mean_{j in g: K_j > t} G_{j,t}) / (std_{j in g: K_j > t} G_{j,t} + eps)``
    (population standard deviation; no division with ``scale_rewards="none"``). A turn index that only one
    episode of the group reached gets 0 (no comparison exists). Unlike episode-level GRPO, a turn that
    earns its reward (a correct tool call, a policy-compliant refusal) is credited at that turn, not
    smeared over the whole episode.

    >>> group_based_per_turn(AdvantageInput([[1.0, 1.0], [0.0, 1.0]], [0, 0], scale_rewards="none"))
    [[0.5, 0.0], [-0.5, 0.0]]
    """
    rtg = returns_to_go(batch.turn_rewards, batch.gamma)
    out = [[0.0] * len(r) for r in rtg]
    for idx in batch.groups().values():
        depth = max(len(rtg[i]) for i in idx)
        for t in range(depth):
            members = [i for i in idx if len(rtg[i]) > t]
            if len(members) < 2:
                continue
            values = torch.tensor([rtg[i][t] for i in members])
            centered = values - values.mean()
            if batch.scale:
                centered = centered / (values.std(unbiased=False) + EPS)
            for i, a in zip(members, centered.tolist()):
                out[i][t] = a
    return out


@register_estimator("monte_carlo")
def monte_carlo(batch: AdvantageInput) -> list[list[float]]:
    """REINFORCE with Monte-Carlo returns and a per-turn batch baseline: ``A_{i,t} = G_{i,t} - b_t``.

    ``b_t`` is the mean return-to-go of all episodes of the batch that reached turn ``t``: a variance
    reducer that keeps the estimator unbiased.

    >>> monte_carlo(AdvantageInput([[1.0], [0.0]], [0, 1]))
    [[0.5], [-0.5]]
    """
    rtg = returns_to_go(batch.turn_rewards, batch.gamma)
    depth = max((len(r) for r in rtg), default=0)
    means = []
    for t in range(depth):
        vals = [r[t] for r in rtg if len(r) > t]
        means.append(sum(vals) / len(vals))
    return [[g - means[t] for t, g in enumerate(r)] for r in rtg]


@register_estimator("gae")
class GAE:
    """PPO's advantages over turns (Schulman et al., 2016/2017), with a learned value head.

    A :class:`~pipeline.training.value_head.ValueHead` (its own parameters and Adam optimiser, never the
    policy's) reads the policy's hidden state before each turn (``batch.hidden_states()``); GAE(gamma,
    lambda) over turns (:func:`gae_over_turns`) uses the values before the head's update; then the head
    takes ``value_epochs`` steps of value loss (lr ``value_lr``) on this batch's lambda-returns. With several
    processes the gradients are averaged over all of them (``batch.all_reduce``), so the head, which starts
    at zero everywhere, stays the same on every process. Logs ``value/loss`` and ``value/mean``. The head and its optimiser are the estimator's state: saved into
    each checkpoint as ``value_head.pt`` and restored on resume, so a resumed run continues the same critic.
    """

    state_file = "value_head.pt"

    def __init__(self) -> None:
        self.head: ValueHead | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._optimizer_state: dict | None = None  # restored, loaded once the head is on the policy's device

    def __call__(self, batch: AdvantageInput) -> list[list[float]]:
        if batch.hidden_states is None:
            raise ValueError("The gae estimator reads the policy's hidden states: AdvantageInput.hidden_states is "
                             "None; pass a callable returning boundary_hidden_states(...).")
        hidden, boundaries = batch.hidden_states()
        self._ready(hidden, batch.value_lr)
        with torch.no_grad():
            values = [v.tolist() for v in self.head(hidden, boundaries)]
        advantages, targets = gae_over_turns(batch.turn_rewards, values, gamma=batch.gamma, lam=batch.lam)
        turns = sum(map(len, targets))
        for _ in range(batch.value_epochs):
            loss = ValueHead.loss(self.head(hidden, boundaries), targets)
            self.optimizer.zero_grad()
            loss.backward()
            if batch.all_reduce is not None:
                self._average_gradients(batch.all_reduce, turns)
            self.optimizer.step()
        batch.log_metric("value/loss", loss.detach().item())
        batch.log_metric("value/mean", sum(map(sum, values)) / max(1, sum(map(len, values))))
        return advantages

    def _average_gradients(self, all_reduce: Callable[[torch.Tensor], torch.Tensor], turns: int) -> None:
        """Replace each process's gradient by the gradient of the loss over every process's turns (each
        process's mean-loss gradient weighted by its turn count), so every process takes the same step and
        the heads, which start equal, stay equal."""
        device = self.head.proj.weight.device
        weight = torch.tensor(float(turns), device=device)
        total = all_reduce(weight.clone())
        for parameter in self.head.parameters():
            parameter.grad = all_reduce(parameter.grad * weight) / total

    def _ready(self, hidden: torch.Tensor, lr: float) -> None:
        if self.head is None:
            self.head = ValueHead(hidden.shape[-1]).to(hidden.device)
        elif self.head.proj.in_features != hidden.shape[-1]:
            raise ValueError(f"The restored value head reads hidden size {self.head.proj.in_features}, but the "
                             f"policy's is {hidden.shape[-1]}: resume with the model the checkpoint was trained on.")
        if self.optimizer is None:
            self.head.to(hidden.device)
            self.optimizer = torch.optim.Adam(self.head.parameters(), lr=lr)
            if self._optimizer_state is not None:
                self.optimizer.load_state_dict(self._optimizer_state)  # moves Adam's moments to the head's device
                self._optimizer_state = None

    def state_dict(self) -> dict | None:
        """``{"hidden_size", "head", "optimizer"}``, or None before the first batch."""
        if self.head is None:
            return None
        optimizer = self.optimizer.state_dict() if self.optimizer is not None else self._optimizer_state
        return {"hidden_size": self.head.proj.in_features, "head": self.head.state_dict(), "optimizer": optimizer}

    def load_state_dict(self, state: dict) -> None:
        hidden_size = state.get("hidden_size") if isinstance(state, dict) else None
        head = state.get("head") if isinstance(state, dict) else None
        if type(hidden_size) is not int or hidden_size < 1 or not isinstance(head, dict):
            raise ValueError("a gae state is {'hidden_size': int, 'head': ValueHead state, 'optimizer': ...}")
        shapes = {name: tuple(value.shape) for name, value in head.items() if isinstance(value, torch.Tensor)}
        if shapes != {"proj.weight": (1, hidden_size), "proj.bias": (1,)}:
            raise ValueError(f"the value head's tensors are {shapes}, not those of a head on hidden size {hidden_size}")
        self.head = ValueHead(hidden_size)
        self.head.load_state_dict(head)
        self.optimizer, self._optimizer_state = None, state.get("optimizer")

    def check_model(self, model, source: str = "the restored value head") -> None:
        """Fail before training when the restored head reads another hidden size than ``model``'s."""
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        if self.head is not None and self.head.proj.in_features != config.hidden_size:
            raise ValueError(f"{source} reads hidden size {self.head.proj.in_features}, but the policy's is "
                             f"{config.hidden_size}: resume with the model the checkpoint was trained on, or delete "
                             "the checkpoint.")
