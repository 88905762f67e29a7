"""The peft integration layer: registration, delegation to peft's own methods, plugin-less loading."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import TINY_MODELS, logits, make_batch
from packaging.version import Version
from peft import (
    LoraConfig,
    MultitaskPromptTuningConfig,
    PeftConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    get_peft_model,
)
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType

import peft_prompt_transfer
from peft_prompt_transfer import ResidualPromptConfig, ResidualPromptEncoder, _compat, _patches
from peft_prompt_transfer._patches.patching import PATCH_MARKER


def test_peft_type_and_mappings_are_registered():
    assert PeftType.RESIDUAL_PROMPT_TUNING == "RESIDUAL_PROMPT_TUNING"
    assert PeftType("RESIDUAL_PROMPT_TUNING") is PeftType.RESIDUAL_PROMPT_TUNING
    assert "RESIDUAL_PROMPT_TUNING" in list(PeftType)
    assert PEFT_TYPE_TO_CONFIG_MAPPING["RESIDUAL_PROMPT_TUNING"] is ResidualPromptConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING["RESIDUAL_PROMPT_TUNING"] is ResidualPromptEncoder
    assert ResidualPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=2).is_prompt_learning


def test_registration_is_idempotent():
    members_before = list(PeftType)
    _patches.install()
    _patches.install()
    _compat.register_method("RESIDUAL_PROMPT_TUNING", ResidualPromptConfig, ResidualPromptEncoder)
    importlib.reload(peft_prompt_transfer)
    assert list(PeftType) == members_before
    # every needed patch wraps peft's original exactly once; a patch that upstream no longer needs is not installed
    assert _patches.disabled_groups() == {}
    for group in _patches.GROUPS:
        for patch in group.patches:
            original = patch.original()
            if not group.needed():
                assert original is None, f"{patch.target} is patched although upstream does not need it"
                continue
            assert original is not None, patch.target
            assert getattr(original, PATCH_MARKER, None) is None, f"{patch.target} is wrapped twice"
    # after the reload peft builds the current classes
    model = get_peft_model(
        TINY_MODELS["gpt2"].build(),
        peft_prompt_transfer.ResidualPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=2, bottleneck_size=4),
    )
    assert type(model.prompt_encoder["default"]) is peft_prompt_transfer.ResidualPromptEncoder


def test_a_different_method_under_our_name_is_refused():
    class Impostor(ResidualPromptConfig):
        pass

    with pytest.raises(KeyError, match="different method registered as RESIDUAL_PROMPT_TUNING"):
        _compat.register_method("RESIDUAL_PROMPT_TUNING", Impostor, ResidualPromptEncoder)


PEFT_METHODS = {
    "prompt_tuning": lambda task: PromptTuningConfig(task_type=task, num_virtual_tokens=4),
    "p_tuning": lambda task: PromptEncoderConfig(task_type=task, num_virtual_tokens=4, encoder_hidden_size=8),
    "multitask": lambda task: MultitaskPromptTuningConfig(task_type=task, num_virtual_tokens=4, num_tasks=2),
    "prefix": lambda task: PrefixTuningConfig(task_type=task, num_virtual_tokens=4),
    "lora": lambda task: LoraConfig(task_type=task, r=2, target_modules="all-linear"),
}


@pytest.mark.parametrize("method", sorted(PEFT_METHODS))
@pytest.mark.parametrize("name", ["gpt2", "t5"])
def test_peft_methods_behave_as_without_the_plugin(method, name, tmp_path):
    """With the plugin imported, peft's own methods run peft's original code paths and give the same outputs."""
    tiny = TINY_MODELS[name]
    torch.manual_seed(0)
    model = get_peft_model(tiny.build(), PEFT_METHODS[method](tiny.task_type)).eval()
    batch = make_batch(tiny)
    kwargs = {"task_ids": torch.tensor([0, 1, 0, 1])} if method == "multitask" else {}
    # seq2seq: decoder inputs come from the labels (peft's MPT path needs that)
    inputs = batch if tiny.kind == "seq2seq" else {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        patched = model(**inputs, **kwargs).logits
        originals = _patches.installed_patches()
        if tiny.kind == "seq2seq":
            unpatched = originals["peft.peft_model:PeftModelForSeq2SeqLM.forward"](model, **inputs, **kwargs).logits
        else:
            unpatched = patched
        if model.peft_config["default"].is_prompt_learning and method != "prefix":
            torch.testing.assert_close(
                model.get_prompt(4, **kwargs), originals["peft.peft_model:PeftModel.get_prompt"](model, 4, **kwargs)
            )
    torch.testing.assert_close(patched, unpatched)
    # and a save/load round trip still works for them
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny.build(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs, **kwargs).logits, patched, atol=1e-5, rtol=0)


def test_our_adapter_and_peft_adapters_in_one_process(tmp_path):
    tiny = TINY_MODELS["gpt2"]
    batch = make_batch(tiny)
    ours = get_peft_model(tiny.build(), ResidualPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).eval()
    theirs = get_peft_model(tiny.build(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).eval()
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    assert json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())["peft_type"] == "PROMPT_TUNING"
    for folder, model in (("ours", ours), ("theirs", theirs)):
        loaded = PeftModel.from_pretrained(tiny.build(), tmp_path / folder)
        torch.testing.assert_close(logits(loaded, batch), logits(model, batch), atol=1e-5, rtol=0)


def test_two_residual_adapters_on_one_model(tmp_path):
    tiny = TINY_MODELS["gpt2"]
    batch = make_batch(tiny)
    model = get_peft_model(tiny.build(), ResidualPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    model.add_adapter("other", ResidualPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, bottleneck_size=8))
    model.eval()
    first = logits(model, batch)
    model.set_adapter("other")
    second = logits(model, batch)
    assert not torch.allclose(first, second)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny.build(), tmp_path / "other", adapter_name="other")
    torch.testing.assert_close(logits(loaded, batch), second, atol=1e-5, rtol=0)


def test_saved_files_tell_how_to_load_without_the_plugin(tmp_path):
    tiny = TINY_MODELS["gpt2"]
    model = get_peft_model(tiny.saved(tmp_path), ResidualPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "RESIDUAL_PROMPT_TUNING"
    assert config["peft_plugin"] == {
        "package": "peft-prompt-transfer",
        "version": peft_prompt_transfer.__version__,
        "import": "import peft_prompt_transfer",
    }
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "library_name: peft" in card and "- peft-prompt-transfer" in card and "- residual_prompt_tuning" in card
    assert "pip install peft-prompt-transfer" in card and "import peft_prompt_transfer" in card
    assert str(tmp_path / "base-gpt2-32") in card  # base_model
    model.save_pretrained(tmp_path / "adapter")  # saving again does not duplicate the section
    assert (tmp_path / "adapter" / "README.md").read_text().count("## Loading this adapter") == 1


def _card_snippet(adapter_dir) -> str:
    card = (adapter_dir / "README.md").read_text()
    return card.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.parametrize("name", ["gpt2", "t5", "bert"])
def test_model_card_snippets_run_as_written(name, tmp_path):
    """The loading code in the card save_pretrained writes (and in an exported adapter's card) runs in a fresh
    interpreter with only the path filled in, and gives the saved model's logits."""
    tiny = TINY_MODELS[name]
    model = get_peft_model(
        tiny.saved(tmp_path), ResidualPromptConfig(task_type=tiny.task_type, num_virtual_tokens=4)
    ).eval()
    model.save_pretrained(tmp_path / "adapter")
    peft_prompt_transfer.export_prompt_tuning(model, tmp_path / "exported")
    batch = make_batch(tiny, seed=1)
    expected = logits(model, batch)
    torch.save(batch, tmp_path / "batch.pt")
    for folder, plugin in (("adapter", True), ("exported", False)):
        snippet = _card_snippet(tmp_path / folder)
        assert ("import peft_prompt_transfer" in snippet) is plugin
        assert (
            f"AutoPeftModelFor{ {'causal': 'CausalLM', 'seq2seq': 'Seq2SeqLM', 'cls': 'SequenceClassification'}[tiny.kind] }"
            in snippet
        )
        script = snippet.replace("ADAPTER_PATH_OR_REPO_ID", repr(str(tmp_path / folder))) + (
            "import sys, torch\n"
            f"sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
            "from conftest import logits\n"  # conftest imports the plugin: load first, as a reader would
            f"torch.save(logits(model.eval(), torch.load({str(tmp_path / 'batch.pt')!r})), {str(tmp_path / folder / 'out.pt')!r})\n"
        )
        run = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1")
        )
        assert run.returncode == 0, run.stderr[-3000:]
        torch.testing.assert_close(torch.load(tmp_path / folder / "out.pt"), expected, atol=1e-5, rtol=0)


def test_plugin_free_process_gets_peft_error_and_plugin_fixes_it(tmp_path):
    """Without the import, peft fails on the unknown type; the same files load once the plugin is imported."""
    tiny = TINY_MODELS["gpt2"]
    get_peft_model(tiny.build(), ResidualPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).save_pretrained(
        tmp_path
    )
    script = f"from peft import PeftConfig; PeftConfig.from_pretrained({str(tmp_path)!r})"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    without = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert without.returncode != 0 and "RESIDUAL_PROMPT_TUNING" in without.stderr
    with_plugin = subprocess.run(
        [sys.executable, "-c", "import peft_prompt_transfer; " + script], capture_output=True, text=True, env=env
    )
    assert with_plugin.returncode == 0, with_plugin.stderr[-2000:]
    assert isinstance(PeftConfig.from_pretrained(tmp_path), ResidualPromptConfig)


@pytest.mark.parametrize("library", ["peft", "transformers"])
def test_supported_ranges_match_pyproject_and_the_installed_versions(library):
    pyproject = os.path.join(os.path.dirname(os.path.dirname(__file__)), "pyproject.toml")
    low, high = _compat.SUPPORTED_VERSIONS[library]
    assert f'"{library}>={low},<{str(high)[:-2]}"' in open(pyproject).read()
    installed = _compat.INSTALLED_VERSIONS[library]
    assert low <= installed < high, f"{library} {installed} is outside the supported range"


def test_an_unsupported_version_warns_with_the_fix(monkeypatch):
    monkeypatch.setitem(_compat.INSTALLED_VERSIONS, "transformers", Version("5.99.0"))
    with pytest.warns(UserWarning) as caught:
        _compat.check_versions()
    low, high = _compat.SUPPORTED_VERSIONS["transformers"]
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "transformers 5.99.0 is installed" in message
    assert message.endswith(f"pip install 'transformers>={low},<{high}'")


def _continue_training(model, batch: dict, steps: int = 2) -> dict:
    """`steps` SGD steps (a stateless optimizer, so a fresh one continues exactly) from a fixed seed."""
    torch.manual_seed(0)
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(steps):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    return model.eval()


TRAINABLE_LOAD_METHODS = {
    "residual": lambda path: ResidualPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, bottleneck_size=8),
    "compt": lambda path: peft_prompt_transfer.ComPTConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=4, task_names=["a", "b"], num_source_prompts=2
    ),
    "bayesian_source": lambda path: peft_prompt_transfer.BayesianPromptConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=4, num_particles=2
    ),
    "bayesian_target": lambda path: peft_prompt_transfer.BayesianPromptConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=4, stage="target", posterior=str(path / "posterior")
    ),
}


@pytest.mark.parametrize("method", sorted(TRAINABLE_LOAD_METHODS))
def test_trainable_loads_continue_training_exactly(method, tmp_path):
    """peft refuses is_trainable=True for prompt methods; ours load their whole training state, so training goes on
    from a saved adapter exactly as it would have gone on in memory, through from_pretrained and load_adapter."""
    tiny = TINY_MODELS["gpt2"]
    torch.manual_seed(1)
    get_peft_model(
        tiny.saved(tmp_path),
        peft_prompt_transfer.BayesianPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, num_particles=2),
    ).save_pretrained(tmp_path / "posterior")
    make_config = TRAINABLE_LOAD_METHODS[method]
    batch = make_batch(tiny)
    if method == "compt":
        batch["task_ids"] = torch.tensor([0, 1, 1, 0])
    torch.manual_seed(2)
    model = _continue_training(get_peft_model(tiny.saved(tmp_path), make_config(tmp_path)), batch)
    model.save_pretrained(tmp_path / "adapter")

    loaded = PeftModel.from_pretrained(tiny.saved(tmp_path), tmp_path / "adapter", is_trainable=True)
    assert not loaded.peft_config["default"].inference_mode
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad
    }
    host = get_peft_model(tiny.saved(tmp_path), make_config(tmp_path))
    host.load_adapter(tmp_path / "adapter", "resumed", is_trainable=True)
    host.set_adapter("resumed")
    expected_state = _continue_training(model, batch).prompt_encoder["default"].adapter_state_dict()
    expected_logits = logits(model, batch)
    for resumed, name in ((_continue_training(loaded, batch), "default"), (_continue_training(host, batch), "resumed")):
        state = resumed.prompt_encoder[name].adapter_state_dict()
        assert state.keys() == expected_state.keys()
        for key in state:
            torch.testing.assert_close(state[key], expected_state[key], atol=1e-6, rtol=0, msg=key)
        torch.testing.assert_close(logits(resumed, batch), expected_logits, atol=1e-5, rtol=0)


def test_trainable_loads_of_peft_prompt_methods_keep_peft_rule(tmp_path):
    tiny = TINY_MODELS["gpt2"]
    get_peft_model(tiny.build(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).save_pretrained(
        tmp_path
    )
    with pytest.raises(ValueError, match="Cannot set a prompt learning adapter to trainable"):
        PeftModel.from_pretrained(tiny.build(), tmp_path, is_trainable=True)
    host = get_peft_model(tiny.build(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with pytest.raises(ValueError, match="Cannot set a prompt learning adapter to trainable"):
        host.load_adapter(tmp_path, "other", is_trainable=True)
