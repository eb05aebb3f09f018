"""SFT on TRL's ``SFTTrainer`` with the batch's system prompt run once: :class:`SharedPrefixSFTTrainer`.

Every demonstration of a customer-service batch opens with the same system prompt: 1,721 of a
demonstration's ~2,300 tokens, none of them learnt (the loss is on assistant tokens only). TRL's forward
runs it once per demonstration and projects every position onto the vocabulary (its fused LM head scores
every position off Triton devices). This trainer keeps TRL's loss, its normalisation
(``num_items_in_batch``), its metrics (``entropy``, ``mean_token_accuracy``, ``num_tokens``) and the rest of
``SFTTrainer``, and replaces only the forward behind them with
:func:`~pipeline.training.shared_prefix.shared_prefix_lm_output`: the prefix the batch's rows share runs
once, its KV cache (with its gradient) serves every row, and the LM head runs only at labelled positions.
Same loss and gradients, within float tolerance.

The prefix is shared within a batch, so ``per_device_train_batch_size`` should be more than 1 (with the
same demonstrations per optimiser step, move ``gradient_accumulation_steps`` into it: TRL normalises the
loss by the tokens of the whole accumulation window, so the gradient is the same). With gradient
checkpointing, which drops KV caches, every row runs whole, still with the LM head at labelled positions
only. TRL's own forward runs where this one does not apply: several processes (DDP's wrapper must run the
forward to sync gradients), MoE aux losses, ``compute_loss_func``, label smoothing, padding-free or
multimodal batches, or an adapter on the LM head.

``compute_loss`` is the one method overridden, pinned to its ``trl==1.16.0`` signature by a test
(:data:`TRL_HOOKS`).
"""

from __future__ import annotations

from trl import SFTTrainer

from pipeline.training.lm_head import has_plain_head
from pipeline.training.shared_prefix import shared_prefix_lm_output

#: The SFTTrainer methods overridden here, with the signatures (trl==1.16.0) they were written for.
TRL_HOOKS = {
    "compute_loss": "(self, model, inputs, return_outputs=False, num_items_in_batch=None)",
}

_PLAIN_INPUTS = {"input_ids", "attention_mask", "labels"}


class _SharedPrefixForward:
    """Stands in for the model in ``SFTTrainer.compute_loss``: called as ``model(**inputs, fused_lm_head=True)``,
    returns the fused head's output from :func:`shared_prefix_lm_output`."""

    def __init__(self, model, share: bool) -> None:
        self.model, self.share = model, share

    def __call__(self, *, input_ids, attention_mask, labels, fused_lm_head: bool = False, use_cache=None):
        if not fused_lm_head:
            raise RuntimeError("SharedPrefixSFTTrainer's forward only serves the fused-LM-head loss.")
        return shared_prefix_lm_output(self.model, input_ids, attention_mask, labels, share=self.share)


class SharedPrefixSFTTrainer(SFTTrainer):
    """``SFTTrainer`` whose loss runs the batch's shared prefix once and the LM head at labelled positions only."""

    def uses_shared_forward(self, model, inputs) -> bool:
        """Whether the loss on ``inputs`` runs :func:`shared_prefix_lm_output` (else TRL's own forward)."""
        return (self.accelerator.num_processes == 1 and not self.aux_loss_enabled and self.compute_loss_func is None
                and self.label_smoother is None and set(inputs) - {"use_cache"} <= _PLAIN_INPUTS
                and {"input_ids", "attention_mask", "labels"} <= set(inputs) and has_plain_head(model))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not return_outputs and self.uses_shared_forward(model, inputs):
            model = _SharedPrefixForward(model, share=not self.args.gradient_checkpointing)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
