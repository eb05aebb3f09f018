"""Tests for pipeline/training/sft_trainer.py: SFT with the batch's system prompt run once and the LM head at
labelled positions only, against TRL's stock ``SFTTrainer``.

Shrunk settings, each on purpose: the tiny 2-layer random Llama with a byte-level tokenizer (logic, not
quality), 3 oracle demonstrations (each opens with the domain's real system prompt), LoRA r=4.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from pipeline.envs import load_tasks
from pipeline.models import load_model
from pipeline.sft import demonstration_dataset, oracle_demonstrations
from pipeline.training.sft_trainer import TRL_HOOKS, SharedPrefixSFTTrainer


@pytest.mark.parametrize("name", sorted(TRL_HOOKS))
def test_each_overridden_trl_method_has_the_signature_it_was_written_for(name):
    """Fails when a TRL upgrade changes a method the trainer overrides: re-read TRL's new version, adapt the
    override, then update TRL_HOOKS."""
    assert str(inspect.signature(getattr(SFTTrainer, name))) == TRL_HOOKS[name]


def test_every_overridden_trl_method_is_pinned():
    overridden = {name for name, value in vars(SharedPrefixSFTTrainer).items() if callable(value)
                  and not name.startswith("__") and hasattr(SFTTrainer, name)}
    assert overridden == set(TRL_HOOKS)


@pytest.fixture(scope="module")
def demos():
    return oracle_demonstrations(load_tasks("customer_service", "train")[:3], n=3)


def make(cls, tiny_model_dir, tmp_path, demos, **overrides):
    model, tokenizer = load_model(str(tiny_model_dir))
    settings = dict(output_dir=str(tmp_path), max_length=None, report_to=[], use_cpu=True, bf16=False, max_steps=1,
                    learning_rate=1e-2, gradient_checkpointing=False, save_strategy="no", logging_steps=1, seed=0,
                    dataset_text_field="input_ids")
    torch.manual_seed(0)
    trainer = cls(model=model, args=SFTConfig(**{**settings, **overrides}),
                  train_dataset=demonstration_dataset(demos, tokenizer), processing_class=tokenizer,
                  peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                         init_lora_weights=False))  # random B: gradients reach both LoRA factors
    return trainer


def lora_grads(trainer):
    return {n: p.grad.clone() for n, p in trainer.model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("checkpointing,per_row", [(False, True), (False, False), (True, True)],
                         ids=["rows_one_at_a_time", "rows_batched", "checkpointing"])
def test_loss_metrics_and_gradients_equal_stock_sfttrainers(tiny_model_dir, tmp_path, demos, checkpointing, per_row,
                                                          monkeypatch):
    """On a right-padded batch of three demonstrations, the loss, TRL's metrics (entropy, token accuracy) and
    the LoRA gradients equal the stock trainer's. Without gradient checkpointing the shared system prompt
    runs once, as one row, and the rows continue from its cache: one at a time, their real tokens only (the
    CPU's way), or as one padded batch (other devices'); with it, every row runs whole."""
    import pipeline.training.shared_prefix as shared_prefix

    monkeypatch.setattr(shared_prefix, "PER_ROW_DEVICES", frozenset({"cpu"}) if per_row else frozenset())
    results = {}
    for cls in (SFTTrainer, SharedPrefixSFTTrainer):
        trainer = make(cls, tiny_model_dir, tmp_path / cls.__name__, demos, gradient_checkpointing=checkpointing)
        if checkpointing:
            trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        trainer.model.train()
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
        assert len(set(batch["attention_mask"].sum(1).tolist())) == 3  # three lengths: padding in two rows
        calls = []
        decoder = trainer.model.get_base_model().model
        handle = decoder.register_forward_hook(lambda m, a, kw, out: calls.append(tuple(kw["input_ids"].shape)),
                                               with_kwargs=True)
        items = (batch["labels"][:, 1:] != -100).sum() * 2  # as if the accumulation window held twice the tokens
        loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=items)
        handle.remove()
        loss.backward()
        results[cls] = (loss.detach(), dict(trainer._metrics["train"]), lora_grads(trainer), calls, batch)
    (loss, metrics, grads, calls, batch), (ref_loss, ref_metrics, ref_grads, ref_calls, _) = (
        results[SharedPrefixSFTTrainer], results[SFTTrainer])
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert metrics["entropy"] == pytest.approx(ref_metrics["entropy"], rel=1e-5)
    assert metrics["mean_token_accuracy"] == pytest.approx(ref_metrics["mean_token_accuracy"], abs=1e-9)
    assert metrics["num_tokens"] == ref_metrics["num_tokens"]
    assert all(g.abs().sum() > 0 for g in ref_grads.values())
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-3, atol=1e-7)
    if checkpointing:
        assert calls == [tuple(batch["input_ids"].shape)]
    else:
        first_label = int((batch["labels"] != -100).int().argmax(1).min())
        assert calls[0][0] == 1 and 1000 < calls[0][1] < first_label  # the system prompt, once, as one row
        lengths = batch["attention_mask"].sum(1).tolist()
        if per_row:  # then each row's remainder on its cache, without the row's padding
            assert calls[1:] == [(1, n - calls[0][1]) for n in lengths]
        else:
            assert calls[1:] == [(3, max(lengths) - calls[0][1])]


def test_one_batch_of_n_trains_like_stock_sft_with_n_accumulated_batches_of_one(tiny_model_dir, tmp_path, demos,
                                                                             monkeypatch):
    """The recipe change the shared prefix asks for: one optimiser step on a batch of three demonstrations
    moves the LoRA weights as stock SFT's step on three accumulated batches of one does (TRL normalises by
    the tokens of the whole accumulation window), and logs the same loss."""
    import pipeline.training.sft_trainer as sft_trainer

    shared_calls = []
    original = sft_trainer.shared_prefix_lm_output
    monkeypatch.setattr(sft_trainer, "shared_prefix_lm_output",
                        lambda *a, **k: shared_calls.append(a[1].shape) or original(*a, **k))
    weights = {}
    for cls, batch, accumulation in ((SFTTrainer, 1, 3), (SharedPrefixSFTTrainer, 3, 1)):
        trainer = make(cls, tiny_model_dir, tmp_path / cls.__name__, demos, per_device_train_batch_size=batch,
                       gradient_accumulation_steps=accumulation)
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
        trainer.train()
        after = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
        assert any(not torch.equal(before[n], after[n]) for n in before)
        loss = next(h["loss"] for h in trainer.state.log_history if "loss" in h)
        weights[cls] = (after, loss)
    assert [shape[0] for shape in shared_calls] == [3]  # ours ran its own forward, on the batch of three
    ours, stock = weights[SharedPrefixSFTTrainer], weights[SFTTrainer]
    assert ours[1] == pytest.approx(stock[1], rel=1e-4)
    for name in stock[0]:
        torch.testing.assert_close(ours[0][name], stock[0][name], rtol=1e-4, atol=1e-6)


def test_a_batch_that_is_not_right_padded_runs_every_row_whole(tiny_model_dir, tmp_path, demos):
    """The shared prefix assumes SFT's right padding (each row's real tokens first). A left-padded batch,
    whose rows' shared prompt starts at different columns, runs whole, as one call, like ``share=False``."""
    from pipeline.training.shared_prefix import shared_prefix_lm_output

    trainer = make(SharedPrefixSFTTrainer, tiny_model_dir, tmp_path, demos)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    width = batch["input_ids"].shape[1]
    pads = (width - batch["attention_mask"].sum(1)).tolist()
    assert len(set(pads)) == 3
    left = {key: torch.stack([row.roll(pad) for row, pad in zip(batch[key], pads)]) for key in batch
            if key in ("input_ids", "attention_mask", "labels")}
    calls = []
    decoder = trainer.model.get_base_model().model
    handle = decoder.register_forward_hook(lambda m, a, kw, out: calls.append(tuple(kw["input_ids"].shape)),
                                           with_kwargs=True)
    shared = shared_prefix_lm_output(trainer.model, left["input_ids"], left["attention_mask"], left["labels"])
    plain = shared_prefix_lm_output(trainer.model, left["input_ids"], left["attention_mask"], left["labels"],
                                    share=False)
    handle.remove()
    assert calls == [(3, width), (3, width)]
    torch.testing.assert_close(shared.loss, plain.loss)
    assert torch.isfinite(shared.loss)
