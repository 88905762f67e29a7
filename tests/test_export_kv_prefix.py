"""`export_kv_prefix`: the prompt's keys and values as a stock peft PREFIX_TUNING adapter, loaded in a fresh
interpreter that never imports the plugin."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import GENERATIVE_MODELS, TINY_MODELS, greedy_reference
from peft import PromptTuningConfig, get_peft_model
from transformers import AutoModelForCausalLM, Gemma2Config

import peft_prompt_transfer as ppt
from peft_prompt_transfer._patches import generation

ARCHITECTURES = {"gpt2": TINY_MODELS["gpt2"], "llama": TINY_MODELS["llama"], "qwen2": GENERATIVE_MODELS["qwen2"]}
METHODS = {
    "residual": (lambda: ppt.ResidualPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, bottleneck_size=8), {}),
    "compt": (
        lambda: ppt.ComPTConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, task_names=["a", "b"]),
        {"task": "b"},
    ),
    "bayesian": (lambda: ppt.BayesianPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, num_particles=3), {}),
}
NEW_TOKENS = 6

WITHOUT_PLUGIN = """
import json, sys, torch
from peft import PeftModel, PrefixTuningConfig, get_peft_model
from transformers import AutoModelForCausalLM

assert "peft_prompt_transfer" not in sys.modules


@torch.no_grad()
def decode(model, input_ids, mask):
    \"\"\"Greedy tokens of model's forward passes (eos excluded, as generate(min_new_tokens=...) does), and of
    its generate.\"\"\"
    out, step_mask = input_ids, mask
    for _ in range(NEW_TOKENS):
        step = model(input_ids=out, attention_mask=step_mask).logits[:, -1]
        step[:, model.config.eos_token_id] = float("-inf")
        out = torch.cat([out, step.argmax(-1, keepdim=True)], dim=1)
        step_mask = torch.cat([step_mask, torch.ones_like(step_mask[:, :1])], dim=1)
    generated = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                               min_new_tokens=NEW_TOKENS, do_sample=False)
    return out[:, -NEW_TOKENS:], generated[:, -NEW_TOKENS:]


results, own_results = {}, {}
for case in json.load(open("cases.json")):
    base = AutoModelForCausalLM.from_pretrained(case["base"]).eval()
    model = PeftModel.from_pretrained(base, case["adapter"]).eval()
    assert model.peft_config["default"].peft_type == "PREFIX_TUNING"
    expected = torch.load(case["expected"])
    for padding in ("left", "none"):
        input_ids, mask = expected[padding]["input_ids"], expected[padding]["attention_mask"]
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=mask).logits
        torch.testing.assert_close(logits, expected[padding]["logits"], rtol=1e-5, atol=1e-5)
        by_forward, generated = decode(model, input_ids, mask)
        assert torch.equal(by_forward, expected[padding]["tokens"]), case["name"]
        results[f"{case['name']}/{padding}"] = torch.equal(generated, expected[padding]["tokens"])
        # peft's own PREFIX_TUNING on the same model and inputs: does its generate give its forward's greedy tokens?
        torch.manual_seed(0)
        own = get_peft_model(AutoModelForCausalLM.from_pretrained(case["base"]).eval(),
                             PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).eval()
        by_forward, generated = decode(own, input_ids, mask)
        own_results[f"{case['name']}/{padding}"] = torch.equal(generated, by_forward)
print("RESULTS", json.dumps({"export": results, "peft_own": own_results}))
""".replace("NEW_TOKENS", str(NEW_TOKENS))


def test_the_export_serves_the_plugins_logits_and_tokens_in_stock_peft(tmp_path):
    cases = []
    for arch, tiny in ARCHITECTURES.items():
        for method, (make_config, export_kwargs) in METHODS.items():
            name = f"{arch}-{method}"
            base = tiny.saved(tmp_path)  # a folder the export's base_model_name_or_path names
            torch.manual_seed(0)
            model = get_peft_model(base, make_config()).eval()
            if method == "compt":
                ppt.set_active_task(model, "b")
            config = ppt.export_kv_prefix(model, tmp_path / name, **export_kwargs)
            assert config.peft_type == "PREFIX_TUNING" and config.num_virtual_tokens == 4
            saved = json.loads((tmp_path / name / "adapter_config.json").read_text())
            assert saved["peft_type"] == "PREFIX_TUNING" and "peft_plugin" not in saved
            input_ids = torch.randint(3, 64, (2, 5), generator=torch.Generator().manual_seed(1))
            expected = {}
            for padding in ("left", "none"):
                attention_mask = torch.ones_like(input_ids)
                if padding == "left":
                    attention_mask[0, :2] = 0
                inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
                with torch.no_grad():
                    logits = model(**inputs).logits[:, 4:]  # input positions
                expected[padding] = {**inputs, "logits": logits, "tokens": greedy_reference(model, inputs, NEW_TOKENS)}
            torch.save(expected, tmp_path / f"{name}.pt")
            base_path = os.path.join(str(tmp_path), f"base-{tiny.name}-32")
            cases.append({"name": name, "base": base_path, "adapter": str(tmp_path / name), "expected": f"{name}.pt"})
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(WITHOUT_PLUGIN)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # the logits and the greedy tokens of stock peft's forward passes matched the plugin's for every case
    generated = json.loads(result.stdout.split("RESULTS", 1)[1])
    generated_same, peft_own = generated["export"], generated["peft_own"]
    # where stock peft's prefix `generate` gives its own PREFIX_TUNING's forward tokens, it gives the export's the
    # plugin's tokens: the export inherits peft's generate, no more
    assert all(generated_same[case] for case, right in peft_own.items() if right), generated
    if generation.causal_generation_needed():
        # peft <= 0.21.2's prefix `generate` loses the cache under transformers >= 5.24's new keyword: wrong for its
        # own PREFIX_TUNING (peft 0.22 reads the new keyword)
        assert not any(peft_own.values()), generated
    else:  # right without padding, as the docs say (left padding shifts its positions)
        assert all(right for case, right in peft_own.items() if case.endswith("/none")), generated


def test_export_kv_prefix_refuses_what_a_prefix_cannot_hold(tmp_path):
    t5 = get_peft_model(
        TINY_MODELS["t5"].build(), ppt.ResidualPromptConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=4)
    )
    with pytest.raises(ValueError, match="decoder-only causal LM .* Use export_prompt_tuning"):
        ppt.export_kv_prefix(t5, tmp_path / "t5")
    bert = get_peft_model(
        TINY_MODELS["bert"].build(), ppt.ResidualPromptConfig(task_type="SEQ_CLS", num_virtual_tokens=4)
    )
    with pytest.raises(ValueError, match="task_type='SEQ_CLS'"):
        ppt.export_kv_prefix(bert, tmp_path / "bert")
    # Gemma 2's sliding layers keep only the window's last keys: shorter than the global layers' for a long prompt
    torch.manual_seed(0)
    gemma = AutoModelForCausalLM.from_config(
        Gemma2Config(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            sliding_window=3,
        )
    )
    model = get_peft_model(gemma, ppt.ResidualPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=6))
    with pytest.raises(ValueError, match="keys and values of different shapes"):
        ppt.export_kv_prefix(model, tmp_path / "gemma")
    assert not (tmp_path / "gemma").exists()
    theirs = get_peft_model(
        TINY_MODELS["llama"].build(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    )
    with pytest.raises(ValueError, match="exports this package's methods"):
        ppt.export_kv_prefix(theirs, tmp_path / "peft")
