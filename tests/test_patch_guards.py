"""The integration layer's structure and its guards: when upstream moves a patch target, importing the plugin still
works, a convenience patch steps aside with a warning that names it, and a correctness patch's features raise a
clear error instead of running unpatched."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import PeftModelForCausalLM, PromptTuningConfig

from peft_prompt_transfer import ResidualPromptConfig, _compat, _patches
from peft_prompt_transfer._patches import generation, persistence

PACKAGE = Path(__file__).resolve().parent.parent / "peft_prompt_transfer"


def _package_imports(path: Path) -> set[str]:
    """The modules of the package that `path` imports (absolute names, relative imports resolved)."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            name = f"{base}.{node.module}" if node.level and node.module else (node.module or base)
            imported.add(name)
            imported.update(f"{name}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    return {name for name in imported if name.startswith("peft_prompt_transfer")}


def test_the_integration_layer_has_two_layers():
    """`_compat` is the bottom (it imports nothing of ours but the version); the patch layer is the top: nothing but
    the package's `__init__` imports it, so base classes, configs and encoders never do."""
    for path in sorted(PACKAGE.rglob("*.py")):
        imports = _package_imports(path)
        relative = path.relative_to(PACKAGE).as_posix()
        if relative == "_compat.py":
            assert imports <= {"peft_prompt_transfer._version"}, imports
        elif not relative.startswith("_patches/") and relative != "__init__.py":
            patch_layer = {name for name in imports if name.startswith("peft_prompt_transfer._patches")}
            assert not patch_layer, f"{relative} imports the patch layer: {patch_layer}"


def test_every_patch_is_in_the_table_of_the_patch_layer():
    table = _patches.__doc__
    mirrored = set()
    for group in _patches.GROUPS:
        for patch in group.patches:
            name = patch.target.split(":")[1].split(".")[-1]
            assert f"{name}`" in table, f"{patch.target} is missing from the table in _patches/__init__.py"
            if patch.mirrors:  # a re-implementation of a piece of peft says which release it mirrors
                assert re.match(r"peft \d+\.\d+\.\d+'s ", patch.mirrors), patch.mirrors
                mirrored.add(patch.target.split(":")[1])
    assert mirrored == {
        "PeftModelForCausalLM.forward",
        "PeftModelForSequenceClassification.forward",
        "PeftModelForSeq2SeqLM.forward",
        "PeftModelForSeq2SeqLM.generate",
        "PeftModel.from_pretrained",
    }


def test_the_cache_translation_stands_down_once_peft_reads_cache(monkeypatch):
    """Patch 7 is gated on two facts: transformers passes `cache`, and peft's own function does not read it."""

    def stand_in(self, *args, task_ids=None, **model_kwargs):  # what a fixed peft would look like
        cache = model_kwargs.get("cache")
        return {"cache": cache, **model_kwargs}

    def as_peft_0_22(self, *args, task_ids=None, **model_kwargs):  # peft 0.22 asks its helper for the name
        cache_name = get_transformers_cache_name()  # noqa: F821 (read as source, never called)
        return model_kwargs.get(cache_name)

    def still_old(self, *args, task_ids=None, **model_kwargs):
        return model_kwargs.get("past_key_values")

    assert generation.reads_cache_keyword(stand_in)
    assert generation.reads_cache_keyword(as_peft_0_22)
    assert not generation.reads_cache_keyword(still_old)
    original = _patches.installed_patches()[generation.CAUSAL_PREPARE_TARGET]
    if original is not None:  # the peft we run on needs the translation
        assert not generation.reads_cache_keyword(original)
    monkeypatch.setattr(PeftModelForCausalLM, "prepare_inputs_for_generation", stand_in)
    assert not generation.causal_generation_needed()
    _patches.install()  # re-checks every group: the fixed peft's function stays as it is
    assert PeftModelForCausalLM.prepare_inputs_for_generation is stand_in
    monkeypatch.setattr(generation, "transformers_passes_cache", lambda: True)
    monkeypatch.setattr(PeftModelForCausalLM, "prepare_inputs_for_generation", still_old)
    assert generation.causal_generation_needed()


@pytest.mark.skipif(not persistence.peft_checks_adapter_keys(), reason="peft < 0.22 does not check adapter keys")
def test_peft_key_check_leaves_our_encoder_keys_to_the_encoder():
    """Patch 16: for our configs, peft's key check keeps only the base model's keys; for peft's own, it is peft's."""
    from peft import peft_model

    keys = ["prompt_embeddings", "reparameterization.down_weight", "base_model.model.score.modules_to_save.x.weight"]
    ours = ResidualPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    assert peft_model._filter_expected_adapter_keys(keys, ours) == keys[2:]
    theirs = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    assert peft_model._filter_expected_adapter_keys(keys, theirs) == keys[1:]


def _run(tmp_path: Path, script: str) -> subprocess.CompletedProcess:
    path = tmp_path / "script.py"
    path.write_text(textwrap.dedent(script))
    env = dict(os.environ, PYTHONPATH=str(PACKAGE.parent), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    return subprocess.run(
        [sys.executable, str(path)], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path
    )


TINY_GPT2 = """
import torch
from transformers import AutoModelForCausalLM, GPT2Config

def tiny_gpt2():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=64, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    return AutoModelForCausalLM.from_config(config)
"""


def test_a_missing_trainer_target_warns_and_every_method_still_trains_and_saves(tmp_path):
    result = _run(
        tmp_path,
        TINY_GPT2
        + """
import warnings
import transformers

del transformers.Trainer._get_dataloader  # as if a transformers release renamed it
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import peft_prompt_transfer
messages = [str(w.message) for w in caught]
assert any("Trainer._get_dataloader" in m and "task_ids" in m and "TaskIdsCollator" in m for m in messages), messages
from peft import PeftModel, get_peft_model
from peft_prompt_transfer import BayesianPromptConfig, ComPTConfig, ResidualPromptConfig

configs = {
    "residual": ResidualPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, bottleneck_size=8),
    "compt": ComPTConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, num_tasks=2, num_source_prompts=2),
    "bayesian": BayesianPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, num_particles=2),
}
input_ids = torch.randint(0, 64, (4, 5), generator=torch.Generator().manual_seed(1))
batch = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=input_ids)
for name, config in configs.items():
    model = get_peft_model(tiny_gpt2(), config)
    extra = {"task_ids": torch.tensor([0, 1, 0, 1])} if name == "compt" else {}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for _ in range(8):
        loss = model(**batch, **extra).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], (name, losses)
    model.save_pretrained(f"saved-{name}")
    model.eval()
    loaded = PeftModel.from_pretrained(tiny_gpt2(), f"saved-{name}").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch, **extra).logits, model(**batch, **extra).logits)
print("trained and saved")
""",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trained and saved" in result.stdout


def test_a_reshaped_causal_forward_turns_the_shared_prefix_off_with_a_warning(tmp_path):
    result = _run(
        tmp_path,
        TINY_GPT2
        + """
import warnings
import peft

def forward(self, input_ids=None, attention_mask=None, **kwargs):  # a release whose forward lost task_ids
    return peft.PeftModel.forward(self, input_ids=input_ids, attention_mask=attention_mask, **kwargs)

peft.PeftModelForCausalLM.forward = forward
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import peft_prompt_transfer
messages = [str(w.message) for w in caught]
assert any("shared-prefix forward of causal LMs is off" in m and "no longer takes" in m for m in messages), messages
from peft_prompt_transfer import ResidualPromptConfig
ResidualPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)  # "auto": concatenates, as peft does
try:
    ResidualPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, shared_prefix="on")
except RuntimeError as err:
    print("REFUSED:", err)
""",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REFUSED:" in result.stdout and "shared_prefix='on' is refused" in result.stdout


CORRECTNESS_CASES = {
    # target removed -> the user action that must refuse, and the text of the refusal
    "prompt set-up": (
        "del peft.PeftModel._setup_prompt_encoder",
        """
from peft import LoraConfig
get_peft_model(tiny_gpt2(), LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["c_attn"]))  # peft's own: fine
try:
    ResidualPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
except RuntimeError as err:
    print("REFUSED:", err)
""",
        "_setup_prompt_encoder",
    ),
    "saving": (
        "del peft.PeftModel.get_prompt_embedding_to_save",
        """
model = get_peft_model(tiny_gpt2(), ResidualPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
model(input_ids=torch.tensor([[1, 2, 3]]))  # forward is not affected
try:
    model.save_pretrained("out")
except RuntimeError as err:
    import os
    assert not os.path.exists("out/adapter_model.safetensors")
    print("REFUSED:", err)
""",
        "get_prompt_embedding_to_save",
    ),
    "cached generation": (
        "del peft.PeftModelForCausalLM.prepare_inputs_for_generation",
        """
from peft_prompt_transfer._patches.generation import transformers_passes_cache
model = get_peft_model(tiny_gpt2(), ResidualPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
if not transformers_passes_cache():
    print("REFUSED: not needed on this transformers: prepare_inputs_for_generation")
else:
    try:
        model.generate(input_ids=torch.tensor([[1, 2, 3]]), max_new_tokens=2)
    except RuntimeError as err:
        print("REFUSED:", err)
""",
        "prepare_inputs_for_generation",
    ),
}


@pytest.mark.parametrize("case", sorted(CORRECTNESS_CASES))
def test_a_missing_correctness_target_makes_its_feature_raise(case, tmp_path):
    removal, action, target = CORRECTNESS_CASES[case]
    result = _run(
        tmp_path,
        TINY_GPT2
        + f"""
import warnings
import peft
{removal}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import peft_prompt_transfer
from peft import get_peft_model
from peft_prompt_transfer import ResidualPromptConfig
"""
        + action,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    refusal = result.stdout.split("REFUSED:", 1)
    assert len(refusal) == 2, result.stdout[-2000:]
    assert target in refusal[1]
    if "not needed" not in refusal[1]:
        assert "wrong results" in refusal[1] and "pip install 'peft>=" in refusal[1]


def test_nothing_is_disabled_on_the_supported_versions():
    assert _patches.disabled_groups() == {}
    assert _compat.disabled_features() == {}


def test_settling_an_fsdp2_root_without_torchs_lazy_init_refuses():
    """`settle_fsdp_root` reads torch's private `FSDPState._lazy_init`; where that is gone (here: a module that FSDP2
    never set up) it raises, saying to rank before sharding, rather than letting a block become the root."""

    class MovedFSDPModule(torch.nn.Linear):
        def _get_fsdp_state(self):
            return object()  # a state without `_lazy_init`

    for module in (MovedFSDPModule(2, 2), torch.nn.Linear(2, 2)):
        with pytest.raises(RuntimeError, match=r"Call it before sharding the model \(before trainer.train\(\)"):
            _compat.settle_fsdp_root(module)
