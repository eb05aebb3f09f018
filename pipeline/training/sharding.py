"""Multi-turn GRPO across processes: the checks a distributed run needs before the model loads, and
generation from sharded parameters.

turnwise scales out through accelerate (DDP, DeepSpeed ZeRO-2/3, FSDP) with TRL, as TRL's own trainer
does; it adds no distribution layer. Multi-turn rollouts add three needs that TRL's single-turn path
does not have, and this module covers the first two (the third is in
:class:`~pipeline.training.advantages.GAE`):

1. **Generation under sharded parameters.** ZeRO-3 and FSDP keep each parameter in shards, gathered by a
   collective in every forward pass. A rollout runs as many forward passes as its episodes need (turns,
   prefills, decode steps), which differs from process to process, so the collectives would not line up
   and the run would hang. :func:`generation_model` gathers the parameters once for the whole rollout
   instead: under ZeRO-3 through TRL's ``unwrap_model_for_generation`` (``deepspeed.zero.GatheredParameters``
   with DeepSpeed's hooks removed), under FSDP2 by unsharding every ``FSDPModule`` and keeping it
   unsharded until the rollout ends (``set_reshard_after_forward(False)``), then resharding. FSDP1 has no
   such switch (its forward refuses to run inside ``summon_full_params``), so the HF rollout backend
   refuses it with a pointer to ``fsdp_version: 2`` or to vLLM rollouts.
2. **Whole groups per process.** Each process computes advantages from its own episodes, so a task's
   ``num_generations`` episodes must all land on one process: ``per_device_train_batch_size x
   steps_per_generation`` (``steps_per_generation`` is ``gradient_accumulation_steps`` unless set) must
   be a multiple of ``num_generations`` (:func:`check_parallel_config`).
3. **The critic's state is the same on every process**: the ``gae`` value head all-reduces its gradients
   (``AdvantageInput.all_reduce``), so every process takes the same optimiser step.

With vLLM rollouts (``use_vllm``) generation does not touch the training model: TRL's weight sync gathers
the shards itself (:mod:`pipeline.training.vllm`).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Iterator, Mapping


def launch_topology(environ: Mapping[str, str] | None = None) -> tuple[int, int | None]:
    """``(zero_stage, fsdp_version)`` as ``accelerate launch`` set them in the environment, before any model or
    accelerator exists: ``(0, None)`` without DeepSpeed or FSDP."""
    env = os.environ if environ is None else environ
    zero_stage = 0
    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        zero_stage = int(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "0") or 0)
    fsdp_version = None
    if env.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        fsdp_version = int(env.get("FSDP_VERSION", "1") or 1)
    return zero_stage, fsdp_version


def check_parallel_config(grpo_args: Any, rollout_config: Any, zero_stage: int | None = None,
                          fsdp_version: int | None = None) -> None:
    """Fail before the model loads when a run cannot train as configured across processes.

    ``zero_stage`` and ``fsdp_version`` default to what ``accelerate launch`` put in the environment
    (:func:`launch_topology`); the trainer passes its accelerator's own.
    """
    if zero_stage is None and fsdp_version is None:
        zero_stage, fsdp_version = launch_topology()
    zero_stage = zero_stage or 0
    per_device = grpo_args.per_device_train_batch_size
    steps = grpo_args.steps_per_generation or grpo_args.gradient_accumulation_steps
    generations = grpo_args.num_generations
    episodes = per_device * steps
    if episodes % generations:
        fitting = generations // _gcd(generations, steps)  # the smallest per-device batch that fits
        raise ValueError(
            f"per_device_train_batch_size ({per_device}) x steps_per_generation ({steps}; it is "
            f"gradient_accumulation_steps unless set) = {episodes} episodes per process per rollout, which is not a "
            f"multiple of num_generations ({generations}): a task's group would be split across processes, and each "
            "process computes its advantages from its own episodes. Make per_device_train_batch_size x "
            f"gradient_accumulation_steps a multiple of num_generations (for example per_device_train_batch_size="
            f"{fitting * max(1, -(-per_device // fitting))}).")
    if getattr(grpo_args, "use_vllm", False):
        return  # generation runs in vLLM; TRL's weight sync gathers the shards
    if fsdp_version == 1:
        raise ValueError(
            "FSDP1 (fsdp_version: 1, the accelerate default) cannot run turnwise's rollouts: a rollout runs a "
            "different number of forward passes on each process, FSDP1 gathers the parameters in every one, and its "
            "forward refuses to run with the parameters held gathered. Set fsdp_version: 2 in the accelerate config "
            "(configs/accelerate/fsdp.yaml does), or generate with vLLM (use_vllm: true, backend: vllm).")
    if zero_stage == 3 and not getattr(grpo_args, "ds3_gather_for_generation", True):
        raise ValueError(
            "ds3_gather_for_generation=False under DeepSpeed ZeRO-3: each generation forward would gather the "
            "parameters collectively, and processes play episodes of different lengths, so the run would hang. Keep "
            "ds3_gather_for_generation=True (the default), or generate with vLLM (use_vllm: true, backend: vllm).")


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


@contextmanager
def generation_model(trainer: Any) -> Iterator[Any]:
    """The policy to generate from, with its parameters gathered for the whole ``with`` block (see the module
    docstring). Yields the unwrapped model (a ``PeftModel`` under LoRA)."""
    from trl.distributed import DistributedBackend
    from trl.models import unwrap_model_for_generation

    accelerator = trainer.accelerator
    backend = DistributedBackend(accelerator)
    wrapped = getattr(trainer, "model_wrapped", None) or trainer.model
    with unwrap_model_for_generation(wrapped, accelerator, gather_deepspeed3_params=True,
                                     gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs) as model:
        if backend.fsdp_version == 2:
            plugin = accelerator.state.fsdp_plugin
            with fsdp2_unsharded(wrapped, reshard_after_forward=bool(getattr(plugin, "reshard_after_forward", True))):
                yield model
        else:
            yield model


@contextmanager
def fsdp2_unsharded(module: Any, reshard_after_forward: bool = True) -> Iterator[None]:
    """Hold every FSDP2 unit of ``module`` unsharded for the ``with`` block, so forward passes inside it run
    no collective; then reshard them and restore ``reshard_after_forward`` (the root keeps FSDP2's own
    default, False). Every process must enter and leave together: unsharding is one all-gather per unit."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in module.modules() if isinstance(m, FSDPModule)]
    if not units:
        yield
        return
    root = units[0]
    for unit in units:
        unit.unshard()
    root.set_reshard_after_forward(False)
    try:
        yield
    finally:
        root.set_reshard_after_forward(reshard_after_forward)
        root.set_reshard_after_forward(False, recurse=False)
        for unit in units:
            unit.reshard()
