"""Faults and bad input: damaged files, interrupted saves, unknown or missing config keys, non-finite SVGD."""

from __future__ import annotations

import json
import os
import warnings

import peft.peft_model
import pytest
import torch
from conftest import TINY_MODELS, logits, make_batch
from peft import PeftModel, PromptTuningConfig, get_peft_model
from safetensors import SafetensorError

from peft_prompt_transfer import BayesianPromptConfig, ComPTConfig, ResidualPromptConfig
from peft_prompt_transfer._patches import persistence

TINY = TINY_MODELS["gpt2"]
CONFIGS = {
    "residual": lambda: ResidualPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, bottleneck_size=8),
    "compt": lambda: ComPTConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=4, task_names=["a", "b"], num_source_prompts=2
    ),
    "bayesian": lambda: BayesianPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, num_particles=2),
}
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def saved(tmp_path, method="residual", name="adapter"):
    model = get_peft_model(TINY.build(), CONFIGS[method]()).eval()
    model.save_pretrained(tmp_path / name)
    return model, tmp_path / name


def batch_for(method):
    batch = make_batch(TINY)
    if method == "compt":
        batch["task_ids"] = torch.tensor([0, 1, 1, 0])
    return batch


@pytest.mark.parametrize("method", sorted(CONFIGS))
@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_weights_file_names_the_problem(method, damage, tmp_path):
    _, folder = saved(tmp_path, method)
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00" * 64 + data[64:])
    with pytest.raises(
        ValueError, match=r"adapter_model.safetensors.*truncated or corrupted.*Save the adapter again"
    ) as info:
        PeftModel.from_pretrained(TINY.build(), folder)
    assert isinstance(info.value.__cause__, SafetensorError)


def test_damaged_weights_of_peft_adapters_keep_peft_behaviour(tmp_path):
    get_peft_model(TINY.build(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).save_pretrained(
        tmp_path
    )
    (tmp_path / WEIGHTS).write_bytes((tmp_path / WEIGHTS).read_bytes()[:40])
    with pytest.raises(SafetensorError):
        PeftModel.from_pretrained(TINY.build(), tmp_path)


def test_malformed_config_names_the_file(tmp_path):
    _, folder = saved(tmp_path)
    (folder / CONFIG).write_text('{"peft_type": "RESIDUAL_PROMPT_TUNING", ')
    with pytest.raises(ValueError, match=r"adapter_config.json is not valid JSON .*damaged or truncated"):
        PeftModel.from_pretrained(TINY.build(), folder)


def test_missing_config_file(tmp_path):
    _, folder = saved(tmp_path)
    (folder / CONFIG).unlink()
    with pytest.raises(ValueError, match="Can't find 'adapter_config.json'"):
        PeftModel.from_pretrained(TINY.build(), folder)


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_unknown_config_keys_from_a_newer_version_are_ignored_with_a_warning(method, tmp_path):
    model, folder = saved(tmp_path, method)
    config = json.loads((folder / CONFIG).read_text())
    config["option_from_the_future"] = 3
    (folder / CONFIG).write_text(json.dumps(config))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(TINY.build(), folder)
    assert any("option_from_the_future" in str(w.message) for w in caught)
    torch.testing.assert_close(logits(loaded, batch_for(method)), logits(model, batch_for(method)), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "method, key, message",
    [
        ("residual", "num_virtual_tokens", "num_virtual_tokens must be a positive integer, got None"),
        ("compt", "task_names", "ComPTConfig needs the tasks"),
        ("bayesian", "num_virtual_tokens", "num_virtual_tokens must be a positive integer, got None"),
    ],
)
def test_missing_required_config_key(method, key, message, tmp_path):
    _, folder = saved(tmp_path, method)
    config = json.loads((folder / CONFIG).read_text())
    del config[key]
    config.pop("num_tasks", None) if key == "task_names" else None
    (folder / CONFIG).write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        PeftModel.from_pretrained(TINY.build(), folder)


def test_interrupted_save_leaves_the_previous_adapter_intact(tmp_path, monkeypatch):
    model, folder = saved(tmp_path)
    before = {name: (folder / name).read_bytes() for name in os.listdir(folder)}
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.add_(1.0)  # the new save would differ

    def crash_half_way(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(peft.peft_model, "safe_save_file", crash_half_way)
    with pytest.raises(OSError, match=r"Saving the adapter to .*adapter failed: .*No space left on device"):
        model.save_pretrained(folder)
    assert {name: (folder / name).read_bytes() for name in os.listdir(folder)} == before
    assert [p for p in os.listdir(tmp_path) if p.startswith(".saving-")] == []  # no staging folder left behind
    PeftModel.from_pretrained(TINY.build(), folder)  # still loads


def test_unwritable_location_fails_clearly_and_changes_nothing(tmp_path, monkeypatch):
    model, folder = saved(tmp_path)
    before = (folder / WEIGHTS).read_bytes()

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("tempfile.mkdtemp", refuse)
    with pytest.raises(
        OSError, match="Cannot save the adapter to .*Permission denied.*Choose a directory you can write to"
    ):
        model.save_pretrained(folder)
    assert (folder / WEIGHTS).read_bytes() == before


def test_save_keeps_an_edited_model_card(tmp_path):
    model, folder = saved(tmp_path)
    card = (
        (folder / "README.md").read_text().replace("# Model Card for Model ID", "# My prompt\n\nNotes by the author.")
    )
    (folder / "README.md").write_text(card)
    model.save_pretrained(folder)
    text = (folder / "README.md").read_text()
    assert "Notes by the author." in text and text.count("## Loading this adapter") == 1


def test_save_into_a_file_path_is_refused(tmp_path):
    model, _ = saved(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="should be a directory, not a file"):
        model.save_pretrained(tmp_path / "file")


def test_non_finite_svgd_gradient_stops_before_the_step(tmp_path):
    model = get_peft_model(TINY.build(), CONFIGS["bayesian"]())
    particles = model.prompt_encoder["default"].particles
    before = particles.detach().clone()
    optimizer = torch.optim.SGD([particles], lr=0.1)
    model(**make_batch(TINY)).loss.backward()
    particles.grad[0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN or inf entries.*prompts are unchanged"):
        optimizer.step()
    assert torch.equal(particles.detach(), before)


def test_library_never_unpickles(tmp_path):
    """Adapters and posteriors are read with safetensors only: no torch.load or pickle in the package."""
    import pathlib

    import peft_prompt_transfer

    source = "\n".join(p.read_text() for p in pathlib.Path(peft_prompt_transfer.__file__).parent.rglob("*.py"))
    assert "torch.load" not in source and "import pickle" not in source


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_zero3_partitioned_word_embeddings_are_measured_by_ds_shape(method):
    """Under DeepSpeed ZeRO-3 a parameter is a shape-[0] shard with its real shape in `ds_shape` (peft issue #206)."""
    embeddings = torch.nn.Embedding(64, 32)
    sharded = torch.nn.Parameter(torch.empty(0))
    sharded.ds_shape = torch.Size([64, 32])
    embeddings.weight = sharded
    config = CONFIGS[method]()
    config.token_dim = 32
    encoder_cls = {"residual": "ResidualPromptEncoder", "compt": "ComPTEncoder", "bayesian": "BayesianPromptEncoder"}
    import peft_prompt_transfer

    encoder = getattr(peft_prompt_transfer, encoder_cls[method])(config, embeddings)
    assert encoder.embedding.weight.shape[-1] == 32
    config.token_dim = 48
    with pytest.raises(ValueError, match="token_dim=48.*hidden size 32"):
        getattr(peft_prompt_transfer, encoder_cls[method])(config, embeddings)


@pytest.mark.parametrize("stage", ["source", "target"])
def test_bayesian_training_under_zero3_is_refused(stage, tmp_path):
    """ZeRO-3's optimizer never steps the particles themselves, so the SVGD transform could not run: say so."""
    model = get_peft_model(TINY.build(), CONFIGS["bayesian"]())
    if stage == "target":
        model.save_pretrained(tmp_path)
        target = BayesianPromptConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=4, stage="target", posterior=str(tmp_path)
        )
        model = get_peft_model(TINY.build(), target)
    model.prompt_encoder["default"].embedding.weight.ds_id = 0  # what DeepSpeed's partitioning sets
    model.train()
    with pytest.raises(NotImplementedError, match="ZeRO-3 is not supported"):
        model(**make_batch(TINY))
    model.eval()
    model(**make_batch(TINY))  # inference is fine


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_loading_passes_peft_strict_adapter_key_check(method, tmp_path):
    """peft 0.22 checks a loaded adapter's keys and excuses only a prompt method's top-level ones; our encoders nest
    some (a residual MLP's), which warned of "unexpected adapter keys" on every load."""
    if not persistence.peft_checks_adapter_keys():
        pytest.skip("peft < 0.22 does not check adapter keys")
    model, folder = saved(tmp_path, method)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        loaded = PeftModel.from_pretrained(TINY.build(), folder, strict_adapter_check="error").eval()
    batch = batch_for(method)
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch))


def test_another_vocabulary_warns(tmp_path):
    from transformers import AutoModelForCausalLM, GPT2Config

    _, folder = saved(tmp_path)
    assert json.loads((folder / CONFIG).read_text())["base_vocab_size"] == 64
    torch.manual_seed(0)
    other = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=80, n_embd=32, n_layer=2, n_head=2, n_positions=64))
    with pytest.warns(UserWarning, match="vocabulary of 64 tokens, but this one has 80"):
        PeftModel.from_pretrained(other, folder)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        PeftModel.from_pretrained(TINY.build(), folder)  # the same vocabulary: no warning
