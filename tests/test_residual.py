"""Residual prompt tuning on tiny GPT-2, Llama, T5, BART, BERT and RoBERTa models."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import (
    TINY_MODELS,
    ListDataset,
    greedy_reference,
    logits,
    make_batch,
    make_trainer,
    tiny_tokenizer,
    train_losses,
)
from peft import PeftConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file

from peft_prompt_transfer import ResidualPromptConfig, export_prompt_tuning
from peft_prompt_transfer.base import load_module_state
from peft_prompt_transfer.residual import ResidualMLP

N_TOKENS = 4


def residual_config(tiny, **overrides) -> ResidualPromptConfig:
    kwargs = dict(task_type=tiny.task_type, num_virtual_tokens=N_TOKENS, bottleneck_size=16)
    kwargs.update(overrides)
    return ResidualPromptConfig(**kwargs)


def trained_model(tiny, tmp_path, steps: int = 5, **config_overrides):
    model = get_peft_model(tiny.saved(tmp_path), residual_config(tiny, **config_overrides))
    trainer = make_trainer(model, tmp_path / "train", ListDataset(make_batch(tiny)), max_steps=steps)
    trainer.train()
    return model.eval()


# ---------------------------------------------------------------------------------------------
# the reparameterisation itself
# ---------------------------------------------------------------------------------------------


def test_mlp_matches_paper_formula():
    torch.manual_seed(0)
    mlp = ResidualMLP(1, 8, 5, "relu", layer_norm=True, dropout=0.0, residual=True)
    prompt = torch.randn(3, 8)
    hidden = torch.relu(prompt @ mlp.down_weight[0] + mlp.down_bias[0])
    branch = torch.nn.functional.layer_norm(hidden @ mlp.up_weight[0] + mlp.up_bias[0], (8,))
    expected = branch * mlp.norm_weight[0] + mlp.norm_bias[0] + prompt
    torch.testing.assert_close(mlp(prompt), expected)


def test_embedding_rms_branch_starts_as_long_as_a_vocabulary_token():
    """branch_scale='embedding_rms': at step 0 every token's branch is LayerNorm(h) * rms, of norm rms * sqrt(d)
    (times sqrt(var / (var + eps)), the LayerNorm's epsilon), where the paper's branch has norm sqrt(d)."""
    tiny = TINY_MODELS["gpt2"]
    base = tiny.build()
    words = base.get_input_embeddings().weight.detach()
    rms = words.pow(2).mean().sqrt().item()  # by hand: the root mean square of all entries
    model = get_peft_model(base, residual_config(tiny, branch_scale="embedding_rms"))
    encoder = model.prompt_encoder["default"]
    mlp, prompt = encoder.reparameterization, encoder.embedding.weight.detach()
    token_dim = prompt.shape[1]
    assert mlp.output_scale.item() == pytest.approx(rms, rel=1e-6)
    hidden = torch.relu(prompt @ mlp.down_weight[0] + mlp.down_bias[0]) @ mlp.up_weight[0] + mlp.up_bias[0]
    variance = hidden.var(dim=-1, unbiased=False)
    expected_norm = rms * token_dim**0.5 * (variance / (variance + 1e-5)).sqrt()
    branch = (encoder(batch_size=1)[0] - prompt).detach()
    torch.testing.assert_close(branch.norm(dim=-1), expected_norm, rtol=1e-5, atol=0)
    unit = get_peft_model(tiny.build(), residual_config(tiny)).prompt_encoder["default"]
    unit_branch = (unit(batch_size=1)[0] - unit.embedding.weight).detach()
    assert unit_branch.norm(dim=-1).mean().item() == pytest.approx(token_dim**0.5, rel=1e-3)


def test_embedding_rms_branch_saves_loads_and_exports_with_identical_logits(tmp_path):
    tiny = TINY_MODELS["gpt2"]
    model = trained_model(tiny, tmp_path, branch_scale="embedding_rms")
    batch = make_batch(tiny, seed=1)
    expected = logits(model, batch)
    model.save_pretrained(tmp_path / "adapter")
    assert "reparameterization.output_scale" in load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    loaded = PeftModel.from_pretrained(tiny.saved(tmp_path), tmp_path / "adapter")
    torch.testing.assert_close(logits(loaded, batch), expected, atol=1e-5, rtol=0)
    export_prompt_tuning(model, tmp_path / "exported")
    exported = PeftModel.from_pretrained(tiny.saved(tmp_path), tmp_path / "exported")
    torch.testing.assert_close(logits(exported, batch), expected, atol=1e-5, rtol=0)
    fresh = get_peft_model(tiny.saved(tmp_path), residual_config(tiny, branch_scale="embedding_rms"))
    fresh.load_adapter(tmp_path / "adapter", adapter_name="default", is_trainable=True)
    for key, value in model.prompt_encoder["default"].state_dict().items():
        torch.testing.assert_close(fresh.prompt_encoder["default"].state_dict()[key], value, atol=0, rtol=0)
    with pytest.raises(ValueError, match="branch_scale must match"):  # the paper's branch has no output_scale
        get_peft_model(tiny.saved(tmp_path), residual_config(tiny)).load_adapter(
            tmp_path / "adapter", adapter_name="default", is_trainable=True
        )


def test_mlp_without_residual_or_layer_norm():
    torch.manual_seed(0)
    mlp = ResidualMLP(1, 8, 5, "tanh", layer_norm=False, dropout=0.0, residual=False)
    prompt = torch.randn(3, 8)
    expected = torch.tanh(prompt @ mlp.down_weight[0] + mlp.down_bias[0]) @ mlp.up_weight[0] + mlp.up_bias[0]
    torch.testing.assert_close(mlp(prompt), expected)
    assert mlp.norm_weight is None


def test_per_token_mlps_are_independent():
    torch.manual_seed(0)
    per_token = ResidualMLP(3, 8, 5, "gelu", layer_norm=True, dropout=0.0, residual=True)
    prompt = torch.randn(3, 8)
    out = per_token(prompt)
    for i in range(3):
        single = ResidualMLP(1, 8, 5, "gelu", layer_norm=True, dropout=0.0, residual=True)
        single.load_state_dict({k: v[i : i + 1] for k, v in per_token.state_dict().items()})
        torch.testing.assert_close(out[i], single(prompt[i : i + 1])[0])


# ---------------------------------------------------------------------------------------------
# config validation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_virtual_tokens": 0}, "num_virtual_tokens must be a positive integer"),
        ({"num_virtual_tokens": None}, "num_virtual_tokens must be a positive integer"),
        ({"bottleneck_size": 0}, "bottleneck_size must be a positive integer"),
        ({"bottleneck_size": 2.5}, "bottleneck_size must be a positive integer"),
        ({"activation": "swish"}, "activation must be one of"),
        ({"dropout": 1.0}, r"dropout must be a number in \[0, 1\)"),
        ({"dropout": -0.1}, r"dropout must be a number in \[0, 1\)"),
        ({"layer_norm": "yes"}, "layer_norm must be True or False"),
        ({"shared_mlp": 1}, "shared_mlp must be True or False"),
        ({"residual": None}, "residual must be True or False"),
        ({"prompt_tuning_init": "ZEROS"}, "prompt_tuning_init must be one of"),
        ({"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "hi"}, "needs tokenizer_name_or_path"),
        ({"prompt_tuning_init": "TEXT", "tokenizer_name_or_path": "x"}, "needs a non-empty prompt_tuning_init_text"),
        ({"tokenizer_kwargs": {"a": 1}}, "tokenizer_kwargs is only used with prompt_tuning_init='TEXT'"),
        ({"num_transformer_submodules": 2}, "num_transformer_submodules must be 1"),
        ({"branch_scale": "rms"}, "branch_scale must be one of"),
        ({"branch_scale": "embedding_rms", "layer_norm": False}, "needs layer_norm=True"),
    ],
)
def test_config_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        ResidualPromptConfig(**{"task_type": "CAUSAL_LM", "num_virtual_tokens": 4, **overrides})


def test_config_round_trip(tmp_path):
    config = ResidualPromptConfig(
        task_type="SEQ_CLS",
        num_virtual_tokens=7,
        bottleneck_size=11,
        activation="gelu",
        layer_norm=False,
        dropout=0.1,
        shared_mlp=False,
        residual=False,
    )
    config.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, ResidualPromptConfig)
    assert loaded.to_dict() == config.to_dict()
    assert loaded.peft_plugin["import"] == "import peft_prompt_transfer"


# ---------------------------------------------------------------------------------------------
# forward, training, save/load, resume, generation, export — on every tiny architecture
# ---------------------------------------------------------------------------------------------


def test_forward_uses_reparameterised_prompt(tiny, tmp_path):
    model = get_peft_model(tiny.build(), residual_config(tiny))
    encoder = model.prompt_encoder["default"]
    expected = encoder.reparameterization(encoder.embedding.weight)
    torch.testing.assert_close(model.get_prompt(batch_size=3), expected.expand(3, -1, -1))
    batch = make_batch(tiny)
    out, base_out = logits(model, batch), logits(tiny.build(), batch)  # same seed: the same base weights
    if tiny.kind == "causal":  # logits for the virtual tokens come first
        assert out.shape[1] == batch["input_ids"].shape[1] + N_TOKENS
        out = out[:, N_TOKENS:]
    assert out.shape == base_out.shape
    assert not torch.allclose(out, base_out, atol=1e-3)


def test_trainer_loss_falls(tiny, tmp_path):
    model = get_peft_model(tiny.build(), residual_config(tiny))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = make_trainer(model, tmp_path, ListDataset(make_batch(tiny)), max_steps=25)
    trainer.train()
    losses = train_losses(trainer)
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed == trainable  # the raw prompt, every MLP parameter (and the classifier head), nothing else
    assert any("reparameterization" in n for n in changed) and any("embedding" in n for n in changed)


def test_save_load_logits_equal(tiny, tmp_path):
    model = trained_model(tiny, tmp_path)
    batch = make_batch(tiny, seed=1)
    expected = logits(model, batch)
    model.save_pretrained(tmp_path / "adapter")
    weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    torch.testing.assert_close(weights["prompt_embeddings"], model.prompt_encoder["default"].inference_prompt())

    loaded = PeftModel.from_pretrained(tiny.saved(tmp_path), tmp_path / "adapter")
    assert loaded.prompt_encoder["default"].reparameterization is None  # inference costs what prompt tuning costs
    torch.testing.assert_close(logits(loaded, batch), expected, atol=1e-5, rtol=0)

    auto = tiny.auto_peft_cls.from_pretrained(tmp_path / "adapter")  # base model from base_model_name_or_path
    torch.testing.assert_close(logits(auto, batch), expected, atol=1e-5, rtol=0)


def test_load_adapter_trainable_restores_mlp_without_applying_it_twice(tiny, tmp_path):
    model = trained_model(tiny, tmp_path)
    batch = make_batch(tiny, seed=1)
    expected = logits(model, batch)
    model.save_pretrained(tmp_path / "adapter")
    fresh = get_peft_model(tiny.saved(tmp_path), residual_config(tiny))
    fresh.load_adapter(tmp_path / "adapter", adapter_name="default", is_trainable=True)
    fresh.eval()
    for key, value in model.prompt_encoder["default"].state_dict().items():
        torch.testing.assert_close(fresh.prompt_encoder["default"].state_dict()[key], value, atol=0, rtol=0)
    torch.testing.assert_close(logits(fresh, batch), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "name, branch_scale", [("gpt2", "unit"), ("t5", "unit"), ("bert", "unit"), ("gpt2", "embedding_rms")]
)
def test_resume_from_checkpoint_matches_uninterrupted_training(name, branch_scale, tmp_path):
    tiny = TINY_MODELS[name]
    data = ListDataset(make_batch(tiny), repeat=4)
    overrides = dict(max_steps=8, save_strategy="steps", save_steps=4, per_device_train_batch_size=4)

    def run(output_dir, resume=None):
        model = get_peft_model(tiny.build(), residual_config(tiny, dropout=0.1, branch_scale=branch_scale))
        trainer = make_trainer(model, output_dir, data, **overrides)
        trainer.train(resume_from_checkpoint=resume)
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}, trainer

    full, _ = run(tmp_path / "full")
    checkpoint = tmp_path / "full" / "checkpoint-4"
    saved = load_file(checkpoint / "adapter_model.safetensors")
    assert "raw_prompt_embeddings" in saved and any(k.startswith("reparameterization.") for k in saved)
    resumed, trainer = run(tmp_path / "resumed", resume=str(checkpoint))
    assert trainer.state.global_step == 8
    assert full.keys() == resumed.keys()
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], atol=1e-6, rtol=0, msg=key)


@pytest.mark.parametrize("name", ["gpt2", "llama", "t5", "bart"])
def test_generate_uses_prompt(name, tmp_path):
    tiny = TINY_MODELS[name]
    model = trained_model(tiny, tmp_path, steps=3)
    batch = make_batch(tiny, seed=2)
    steps = 5
    generated = model.generate(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        max_new_tokens=steps,
        min_new_tokens=steps,
        do_sample=False,
        pad_token_id=0,
    )
    if not model.config.is_encoder_decoder:
        generated = generated[:, batch["input_ids"].shape[1] :] if generated.shape[1] > steps else generated
    else:
        generated = generated[:, 1:]
    assert torch.equal(generated[:, :steps], greedy_reference(model, batch, steps))
    # after save/load the same tokens come out
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(tiny.saved(tmp_path), tmp_path / "adapter")
    assert torch.equal(greedy_reference(loaded, batch, steps), greedy_reference(model, batch, steps))


def test_export_gives_same_logits(tiny, tmp_path):
    model = trained_model(tiny, tmp_path)
    batch = make_batch(tiny, seed=3)
    expected = logits(model, batch)
    export_config = export_prompt_tuning(model, tmp_path / "exported")
    assert export_config.peft_type == "PROMPT_TUNING"
    config = PeftConfig.from_pretrained(tmp_path / "exported")
    assert type(config).__name__ == "PromptTuningConfig" and "peft_plugin" not in config.to_dict()
    loaded = PeftModel.from_pretrained(tiny.saved(tmp_path), tmp_path / "exported")
    assert type(loaded.prompt_encoder["default"]).__name__ == "PromptEmbedding"
    torch.testing.assert_close(logits(loaded, batch), expected, atol=1e-5, rtol=0)


def test_exported_adapter_loads_without_plugin(tmp_path):
    """A fresh interpreter that never imports peft_prompt_transfer reproduces the logits."""
    import subprocess
    import sys

    tiny = TINY_MODELS["bert"]
    model = trained_model(tiny, tmp_path)
    batch = make_batch(tiny, seed=3)
    torch.save({"batch": batch, "logits": logits(model, batch)}, tmp_path / "expected.pt")
    export_prompt_tuning(model, tmp_path / "exported")
    script = f"""
import sys, torch
from peft import AutoPeftModelForSequenceClassification
model = AutoPeftModelForSequenceClassification.from_pretrained({str(tmp_path / "exported")!r}).eval()
ref = torch.load({str(tmp_path / "expected.pt")!r})
batch = {{k: v for k, v in ref["batch"].items() if k != "labels"}}
with torch.no_grad():
    out = model(**batch).logits
assert "peft_prompt_transfer" not in sys.modules
torch.testing.assert_close(out, ref["logits"], atol=1e-5, rtol=0)
print("OK")
"""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# options and failure modes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_reaches_every_prompt_parameter(use_reentrant):
    tiny = TINY_MODELS["llama"]
    batch = make_batch(tiny)

    def grads(checkpointing):
        base = tiny.build().train()
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        torch.manual_seed(0)
        model = get_peft_model(base, residual_config(tiny))
        model(**batch).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and len(plain) == 7
    for name, grad in checkpointed.items():
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, plain[name], atol=1e-6, rtol=1e-4)


def test_per_token_mlp_and_plain_mlp_baseline_train(tmp_path):
    tiny = TINY_MODELS["gpt2"]
    for overrides in ({"shared_mlp": False}, {"residual": False}, {"layer_norm": False, "activation": "gelu"}):
        model = get_peft_model(tiny.build(), residual_config(tiny, **overrides))
        encoder = model.prompt_encoder["default"]
        assert encoder.reparameterization.num_mlps == (N_TOKENS if overrides.get("shared_mlp") is False else 1)
        trainer = make_trainer(model, tmp_path, ListDataset(make_batch(tiny)), max_steps=15)
        trainer.train()
        losses = train_losses(trainer)
        assert losses[-1] < losses[0], (overrides, losses)


def test_dropout_is_off_in_the_saved_prompt(tmp_path):
    tiny = TINY_MODELS["gpt2"]
    model = get_peft_model(tiny.build(), residual_config(tiny, dropout=0.5))
    encoder = model.prompt_encoder["default"]
    model.train()
    assert not torch.allclose(encoder(1)[0], encoder(1)[0])  # dropout is active while training
    folded = encoder.inference_prompt()
    encoder.eval()
    torch.testing.assert_close(folded, encoder(1)[0].detach())
    assert encoder.reparameterization.training is False


@pytest.mark.parametrize("init", ["SAMPLE_VOCAB", "TEXT"])
def test_prompt_initialisation_from_vocabulary(init, tmp_path):
    tiny = TINY_MODELS["gpt2"]
    base = tiny.build()
    extra = (
        {"prompt_tuning_init_text": "w5 w9 w7", "tokenizer_name_or_path": tiny_tokenizer(tmp_path)}
        if init == "TEXT"
        else {}
    )
    model = get_peft_model(base, residual_config(tiny, prompt_tuning_init=init, **extra))
    prompt = model.prompt_encoder["default"].embedding.weight
    vocab = base.get_input_embeddings().weight
    if init == "TEXT":  # the text's token embeddings, repeated to the prompt length
        torch.testing.assert_close(prompt, vocab[[5 + 2, 9 + 2, 7 + 2, 5 + 2]])
    else:  # every prompt row is some vocabulary row
        assert all(any(torch.equal(row, v) for v in vocab) for row in prompt)


def test_task_ids_are_rejected_with_a_clear_message():
    tiny = TINY_MODELS["gpt2"]
    model = get_peft_model(tiny.build(), residual_config(tiny))
    batch = make_batch(tiny)
    with pytest.raises(ValueError, match="takes no task_ids"):
        model(**batch, task_ids=torch.zeros(4, dtype=torch.long))


def test_loading_onto_a_model_with_another_hidden_size_fails_clearly(tmp_path):
    tiny = TINY_MODELS["bert"]
    model = trained_model(tiny, tmp_path, steps=1)
    model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="token_dim=32.*hidden size 48"):
        PeftModel.from_pretrained(tiny.build(hidden=48), tmp_path / "adapter")


def test_folded_adapter_cannot_silently_resume_training(tmp_path):
    tiny = TINY_MODELS["gpt2"]
    model = trained_model(tiny, tmp_path, steps=1)
    export_dir = tmp_path / "lean"
    model.save_pretrained(tmp_path / "adapter")
    PeftModel.from_pretrained(tiny.build(), tmp_path / "adapter").save_pretrained(export_dir)  # inference-mode save
    assert set(load_file(export_dir / "adapter_model.safetensors")) == {"prompt_embeddings"}
    fresh = get_peft_model(tiny.build(), residual_config(tiny))
    with pytest.raises(ValueError, match="holds only the folded prompt"):
        fresh.load_adapter(export_dir, adapter_name="default", is_trainable=True)


def test_mismatched_mlp_shape_fails_clearly(tmp_path):
    tiny = TINY_MODELS["gpt2"]
    model = trained_model(tiny, tmp_path, steps=1)
    model.save_pretrained(tmp_path / "adapter")
    other = get_peft_model(tiny.build(), residual_config(tiny, bottleneck_size=8))
    with pytest.raises(ValueError, match="reparameterisation MLP does not match"):
        other.load_adapter(tmp_path / "adapter", adapter_name="default", is_trainable=True)


def test_load_module_state_copies_in_place_with_load_state_dicts_checks():
    """The MLP is loaded by copying into its own tensors, not with `load_state_dict`, whose FSDP2 post-load hook fails
    inside `gathered_parameters` (tests/test_distributed.py resumes from sharded checkpoints); what it accepts and
    refuses is what `load_state_dict(strict=True)` would."""
    torch.manual_seed(0)
    saved = ResidualMLP(1, 8, 5, "relu", layer_norm=True, dropout=0.0, residual=True)
    mlp = ResidualMLP(1, 8, 5, "relu", layer_norm=True, dropout=0.0, residual=True)
    own = dict(mlp.named_parameters())
    load_module_state(mlp, saved.state_dict())
    for name, value in saved.state_dict().items():
        assert getattr(mlp, name) is own[name]  # the same parameters, now holding the saved values
        torch.testing.assert_close(getattr(mlp, name), value, atol=0, rtol=0)

    state = saved.state_dict()
    with pytest.raises(RuntimeError, match=r"missing keys \['up_bias'\], unexpected keys \['extra'\]"):
        load_module_state(mlp, {**{k: v for k, v in state.items() if k != "up_bias"}, "extra": state["up_bias"]})
    with pytest.raises(RuntimeError, match="'down_weight' has shape"):
        load_module_state(mlp, {**state, "down_weight": state["down_weight"][:, :4]})


def test_state_dict_has_prompt_and_training_state():
    tiny = TINY_MODELS["gpt2"]
    model = get_peft_model(tiny.build(), residual_config(tiny, shared_mlp=False))
    state = get_peft_model_state_dict(model)
    assert state["prompt_embeddings"].shape == (N_TOKENS, 32)
    assert state["raw_prompt_embeddings"].shape == (N_TOKENS, 32)
    assert state["reparameterization.down_weight"].shape == (N_TOKENS, 32, 16)


def test_sequence_classification_head_is_saved_and_exported(tmp_path):
    tiny = TINY_MODELS["bert"]
    model = trained_model(tiny, tmp_path)
    # peft's task-head names (peft 0.22 adds "pre_classifier", DistilBERT's)
    assert {"classifier", "score"} <= set(model.peft_config["default"].modules_to_save)
    model.save_pretrained(tmp_path / "adapter")
    export_prompt_tuning(model, tmp_path / "exported")
    for folder in ("adapter", "exported"):
        keys = set(load_file(tmp_path / folder / "adapter_model.safetensors"))
        assert any(k.endswith("classifier.weight") for k in keys), (folder, keys)


def test_trainer_evaluate_and_predict(tmp_path):
    tiny = TINY_MODELS["bert"]
    model = get_peft_model(tiny.build(), residual_config(tiny))
    data = ListDataset(make_batch(tiny))
    trainer = make_trainer(model, tmp_path, data, max_steps=10, eval_strategy="steps", eval_steps=5, eval_dataset=data)
    trainer.train()
    assert [e["step"] for e in trainer.state.log_history if "eval_loss" in e] == [5, 10]
    metrics = trainer.evaluate()
    predictions = trainer.predict(data)
    model.eval()
    torch.testing.assert_close(
        torch.as_tensor(predictions.predictions), logits(model, make_batch(tiny)), atol=1e-5, rtol=0
    )
    assert metrics["eval_loss"] == pytest.approx(predictions.metrics["test_loss"])
