"""Smoke test of an installed peft-prompt-transfer wheel, run from outside the repository by scripts/check_package.sh.

Checks what a package index and a user see: the metadata (license, classifiers, declared ranges), the typing
marker, and that every method trains one step, saves and reloads with the same logits on a tiny model.
"""

import importlib.metadata
import importlib.resources
import os
import sys
import tempfile

import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, GPT2Config

import peft_prompt_transfer as ppt

here = os.path.dirname(os.path.abspath(ppt.__file__))
assert "site-packages" in here, f"imported from {here}, not from the installed wheel"
metadata = importlib.metadata.metadata("peft-prompt-transfer")
assert metadata["License-Expression"] == "Apache-2.0", metadata["License-Expression"]
assert "Typing :: Typed" in metadata.get_all("Classifier")
assert any(f.name == "LICENSE" for f in importlib.metadata.files("peft-prompt-transfer"))
assert importlib.resources.files("peft_prompt_transfer").joinpath("py.typed").is_file()
requires = importlib.metadata.requires("peft-prompt-transfer")
assert any(r.startswith("transformers") and "<" in r for r in requires), requires


def base():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=64))


with tempfile.TemporaryDirectory() as folder:
    torch.manual_seed(1)
    get_peft_model(
        base(), ppt.BayesianPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, num_particles=2)
    ).save_pretrained(os.path.join(folder, "posterior"))
    configs = {
        "residual": ppt.ResidualPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, bottleneck_size=8),
        "compt": ppt.ComPTConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=4, task_names=["a", "b"], num_source_prompts=2
        ),
        "bayesian": ppt.BayesianPromptConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=4, stage="target", posterior=os.path.join(folder, "posterior")
        ),
    }
    input_ids = torch.randint(3, 64, (2, 5))
    for name, config in configs.items():
        model = get_peft_model(base(), config)
        extra = {"task_ids": torch.tensor([0, 1])} if name == "compt" else {}
        model(input_ids=input_ids, labels=input_ids, **extra).loss.backward()
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
        model.eval()
        with torch.no_grad():
            expected = model(input_ids=input_ids, **extra).logits
        model.save_pretrained(os.path.join(folder, name))
        loaded = PeftModel.from_pretrained(base(), os.path.join(folder, name)).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=input_ids, **extra).logits, expected)
        print(f"{name}: trained a step, saved, reloaded with the same logits")
try:  # the clean venv has no `datasets`: combine_tasks names the extra that brings it
    ppt.combine_tasks([])
    raise AssertionError("combine_tasks ran without datasets")
except ImportError as err:
    assert "pip install 'peft-prompt-transfer[data]'" in str(err), err
print(f"peft-prompt-transfer {ppt.__version__} from {here}: OK (python {sys.version.split()[0]})")
