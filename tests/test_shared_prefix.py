"""The shared-prefix path gives the concatenated path's outputs, for every method on every decoder architecture the
suite builds, and falls back (or, with "on", refuses) where it cannot be exact.

Tolerances (fp32): loss and logits within 1e-5 relative, gradients within 1e-4 relative.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import GENERATIVE_MODELS, TINY_MODELS, ListDataset, make_trainer
from peft import get_peft_model
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GPTNeoXConfig,
    MistralConfig,
    Phi3Config,
    Qwen3Config,
)

from peft_prompt_transfer import BayesianPromptConfig, ComPTConfig, ResidualPromptConfig

VOCAB, HIDDEN, VIRTUAL_TOKENS = 64, 32, 5
_DECODER = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=2 * HIDDEN,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    initializer_range=0.2,
)
# the decoder families of the suite's models, and the attention variants the path must survive: Mistral's sliding
# window (shorter than prompt + input), Gemma 2's alternating sliding and global layers with logit soft-capping
DECODERS = {
    "gpt2": lambda: TINY_MODELS["gpt2"].make_config(HIDDEN),
    "llama": lambda: TINY_MODELS["llama"].make_config(HIDDEN),
    "qwen2": lambda: GENERATIVE_MODELS["qwen2"].make_config(HIDDEN),
    "opt": lambda: GENERATIVE_MODELS["opt"].make_config(HIDDEN),
    "mistral": lambda: MistralConfig(**_DECODER, sliding_window=6),
    "qwen3": lambda: Qwen3Config(**_DECODER, head_dim=8),
    "phi3": lambda: Phi3Config(**_DECODER),
    "gemma2": lambda: Gemma2Config(**_DECODER, head_dim=8, sliding_window=6),
    "gpt_neox": lambda: GPTNeoXConfig(
        **{k: v for k, v in _DECODER.items() if k != "num_key_value_heads"}, hidden_dropout=0.0, attention_dropout=0.0
    ),
}
METHODS = {
    "residual": (lambda **kw: ResidualPromptConfig(bottleneck_size=8, **kw), {}),
    "compt": (
        lambda **kw: ComPTConfig(num_tasks=3, num_source_prompts=2, **kw),
        {"task_ids": torch.tensor([2, 0, 2, 2])},  # two tasks present, in an order that is not sorted
    ),
    # 3 particles for 4 rows: the uneven split's per-particle gradient scale
    "bayesian_source": (lambda **kw: BayesianPromptConfig(num_particles=3, **kw), {}),
}


def _base(arch: str, dropout_free: bool = True):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(DECODERS[arch]())
    if dropout_free:
        for module in base.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    return base


def _model(arch: str, method: str, shared_prefix: str, **config_kwargs):
    make_config, _ = METHODS[method]
    config = make_config(
        task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL_TOKENS, shared_prefix=shared_prefix, **config_kwargs
    )
    base = _base(arch)
    torch.manual_seed(1)
    return get_peft_model(base, config)


def _batch(padding: str, seed: int = 2) -> dict:
    input_ids = torch.randint(3, VOCAB, (4, 7), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(input_ids)
    if padding == "left":
        mask[0, :3], mask[1, :1] = 0, 0
    else:
        mask[0, -3:], mask[1, -1:] = 0, 0
    labels = input_ids.masked_fill(mask == 0, -100)  # rows without padding on the left label their first token
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def _run(model, batch: dict, **kwargs):
    output = model(**batch, **kwargs)
    output.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return output, grads


def _calls(model) -> list[int]:
    """Record the batch size of every call of the base model (the shared path calls it twice: U prompts, B rows)."""
    sizes = []
    model.base_model.register_forward_pre_hook(
        lambda module, args, kwargs: sizes.append(kwargs["inputs_embeds"].shape[0]), with_kwargs=True
    )
    return sizes


def _assert_same(shared, concatenated):
    (out, grads), (ref, ref_grads) = shared, concatenated
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=0)
    assert out.logits.shape == ref.logits.shape  # peft's shape, prompt positions included
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5 * ref.logits.abs().max().item())
    assert grads.keys() == ref_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-4 * ref_grads[name].abs().max().item())


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("arch", sorted(DECODERS))
def test_shared_prefix_gives_the_concatenated_loss_logits_and_gradients(arch, method, padding):
    _, extra = METHODS[method]
    batch = _batch(padding)
    results = {}
    for mode in ("on", "off"):
        model = _model(arch, method, mode).train()
        calls = _calls(model)
        results[mode] = _run(model, batch, **extra)
        distinct = {"residual": 1, "compt": 2, "bayesian_source": 3}[method]
        assert calls == ([distinct, 4] if mode == "on" else [4]), calls
    _assert_same(results["on"], results["off"])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_auto_shares_in_eval_and_in_training_without_dropout(method):
    _, extra = METHODS[method]
    make_config, _ = METHODS[method]
    # at least (4 rows - 3 distinct prompts) * 130 positions saved: worth sharing for every method
    config = make_config(task_type="CAUSAL_LM", num_virtual_tokens=130)
    model = get_peft_model(_base("llama"), config)
    calls = _calls(model)
    with torch.no_grad():
        model.eval()(**_batch("left"), **extra)
        model.train()(**_batch("left"), **extra)
    assert len(calls) == 4  # two calls per forward: shared both times


def test_bayesian_source_in_eval_shares_the_posterior_mean():
    model = _model("llama", "bayesian_source", "on").eval()
    calls = _calls(model)
    batch = _batch("left")
    with torch.no_grad():
        shared = model(**batch)
    reference = _model("llama", "bayesian_source", "off").eval()
    with torch.no_grad():
        concatenated = reference(**batch)
    assert calls == [1, 4]
    torch.testing.assert_close(shared.logits, concatenated.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shared.loss, concatenated.loss, rtol=1e-5, atol=0)


def test_num_items_in_batch_counts_as_in_the_concatenated_path():
    batch = _batch("left")
    results = {}
    for mode in ("on", "off"):
        model = _model("llama", "residual", mode).train()
        results[mode] = _run(model, batch, num_items_in_batch=torch.tensor(40))
    _assert_same(results["on"], results["off"])


@pytest.mark.parametrize("logits_to_keep", [1, 3, 9, torch.tensor([-1, -7, 2, 4]), torch.tensor([0, 11])])
def test_logits_to_keep_keeps_the_same_logits(logits_to_keep):
    batch = {k: v for k, v in _batch("left").items() if k != "labels"}
    outputs = {}
    for mode in ("on", "off"):
        model = _model("llama", "compt", mode).eval()
        with torch.no_grad():
            outputs[mode] = model(**batch, task_ids=torch.tensor([0, 1, 0, 2]), logits_to_keep=logits_to_keep).logits
    assert outputs["on"].shape == outputs["off"].shape
    torch.testing.assert_close(outputs["on"], outputs["off"], rtol=1e-5, atol=1e-5)


def test_hidden_states_and_return_dict_false_match():
    batch = _batch("right")
    outputs = {}
    for mode in ("on", "off"):
        model = _model("qwen3", "residual", mode).eval()
        with torch.no_grad():
            outputs[mode] = model(**batch, output_hidden_states=True, return_dict=False)
    (loss, logits, *_, hidden), (ref_loss, ref_logits, *_, ref_hidden) = outputs["on"], outputs["off"]
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert len(hidden) == len(ref_hidden)
    for layer, ref_layer in zip(hidden, ref_hidden):
        torch.testing.assert_close(layer, ref_layer, rtol=1e-5, atol=1e-5)


def test_the_trainer_with_gradient_accumulation_trains_the_same(tmp_path):
    """The Trainer passes num_items_in_batch under gradient accumulation; both paths count it alike."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, VOCAB, (8, 6), generator=generator)
    data = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}
    data["labels"][:, :2] = -100  # uneven label counts per micro-batch
    data["labels"][0, 2:4] = -100
    params = {}
    for mode in ("on", "off"):
        model = _model("llama", "residual", mode)
        trainer = make_trainer(model, tmp_path / mode, ListDataset(data), gradient_accumulation_steps=2, max_steps=3)
        trainer.train()
        params[mode] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for name, value in params["on"].items():
        torch.testing.assert_close(value, params["off"][name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "setup, reason",
    [
        ("dropout", "dropout is active in training mode"),
        ("checkpointing", "gradient checkpointing is on"),
        ("attentions", "output_attentions=True"),
    ],
)
def test_auto_falls_back_and_on_refuses_where_sharing_is_not_exact(setup, reason):
    batch = _batch("left")
    for mode in ("auto", "on"):
        config = ResidualPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL_TOKENS, shared_prefix=mode)
        base = _base("gpt2", dropout_free=setup != "dropout")
        if setup == "checkpointing":
            base.gradient_checkpointing_enable()
        model = get_peft_model(base, config).train()
        calls = _calls(model)
        kwargs = {"output_attentions": True} if setup == "attentions" else {}
        if mode == "on":
            with pytest.raises(ValueError, match=f"shared_prefix='on', but .*{reason}"):
                model(**batch, **kwargs)
        else:
            assert model(**batch, **kwargs).loss.isfinite()
            assert calls == [4]  # concatenated: one call with every row


def test_a_decoder_whose_forward_takes_no_logits_to_keep_concatenates_and_ranks(tmp_path):
    """A decoder whose forward has no `logits_to_keep` (TrOCR's, Whisper's) is not shared: "on" says why, a prompt
    library ranks on it by concatenation, with the concatenated scores, and `export_kv_prefix` never asks for it."""
    from peft import PromptTuningConfig

    from peft_prompt_transfer import PromptLibrary, export_kv_prefix

    def without_logits_to_keep(base):
        original, signature = base.forward, inspect.signature(base.forward)

        def forward(*args, **kwargs):
            if "logits_to_keep" in kwargs:
                raise TypeError("forward() got an unexpected keyword argument 'logits_to_keep'")
            return original(*args, **kwargs)

        forward.__signature__ = signature.replace(
            parameters=[p for p in signature.parameters.values() if p.name != "logits_to_keep"]
        )
        base.forward = forward
        return base

    config = ResidualPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL_TOKENS, shared_prefix="on")
    model = get_peft_model(without_logits_to_keep(_base("llama")), config)
    with pytest.raises(ValueError, match="shared_prefix='on', but .*forward takes no logits_to_keep"):
        model(**_batch("right"))
    export_kv_prefix(model, tmp_path / "kv-prefix")
    assert (tmp_path / "kv-prefix" / "adapter_model.safetensors").exists()

    base = without_logits_to_keep(_base("llama"))
    user_model = get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL_TOKENS))
    prompt = torch.randn(VIRTUAL_TOKENS, base.config.hidden_size, generator=torch.Generator().manual_seed(0))
    library = PromptLibrary(base)
    library.add("p", prompt)
    calls = _calls(user_model)
    batch = _batch("right")
    rows = [
        {"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "labels": labels.tolist()}
        for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"])
    ]
    score = dict(library.rank(user_model, rows, include_current=False, progress=False))["p"]
    assert calls == [len(rows)]  # the prompt in front of every example, in one call
    user_model.prompt_encoder["default"].embedding.weight.data.copy_(prompt)
    with torch.no_grad():
        assert score == pytest.approx(user_model(**batch).loss.item(), rel=1e-5)


def test_the_rule_follows_what_changes_after_the_first_forward():
    """The architecture is read once per model (a cache); train()/eval(), gradient checkpointing, `output_attentions`
    and the dropout rates, set after the first forward, are read at every forward."""
    config = ResidualPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL_TOKENS, shared_prefix="on")
    model = get_peft_model(_base("llama"), config).train()
    calls, batch = _calls(model), _batch("left")
    model(**batch)
    assert calls == [1, 4]  # shared

    def refuses(reason: str, **kwargs) -> None:
        with pytest.raises(ValueError, match=f"shared_prefix='on', but .*{reason}"):
            model(**batch, **kwargs)

    attention = model.base_model.model.layers[0].self_attn
    attention.attention_dropout = 0.1  # the rate Llama's attention passes to its kernel
    refuses(r"dropout is active in training mode \(model.layers.0.self_attn.attention_dropout=0.1\)")
    model.eval()(**batch)  # no dropout in eval
    attention.attention_dropout = 0.0
    model.train()
    model.base_model.gradient_checkpointing_enable()
    refuses("gradient checkpointing is on")
    model.base_model.gradient_checkpointing_disable()
    refuses("output_attentions=True", output_attentions=True)
    calls.clear()
    model(**batch)
    assert calls == [1, 4]  # shared again


def test_shared_prefix_on_is_refused_for_other_task_types():
    with pytest.raises(ValueError, match="shared_prefix='on' needs a decoder-only model .* got 'SEQ_2_SEQ_LM'"):
        ResidualPromptConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=4, shared_prefix="on")
    with pytest.raises(ValueError, match=r"shared_prefix must be one of \['auto', 'on', 'off'\], got 'yes'"):
        ResidualPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, shared_prefix="yes")


def test_an_adapter_saved_with_on_loads_and_runs_anywhere(tmp_path):
    from peft import PeftModel

    model = _model("llama", "residual", "on").eval()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(_base("llama"), tmp_path).eval()
    assert loaded.peft_config["default"].shared_prefix == "on"
    batch = _batch("left")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "num_virtual_tokens, rows, length",
    [(32, 1, 7), (10, 8, 7), (10, 32, 128)],  # one row; 70 positions saved; 0.93 of the positions run
)
def test_auto_concatenates_where_sharing_saves_too_little(num_virtual_tokens, rows, length):
    input_ids = torch.randint(3, VOCAB, (rows, length), generator=torch.Generator().manual_seed(0))
    for mode, expected in (("auto", [rows]), ("on", [1, rows])):
        config = ResidualPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens, shared_prefix=mode)
        model = get_peft_model(_base("llama"), config).eval()
        calls = _calls(model)
        with torch.no_grad():
            model(input_ids=input_ids)
        assert calls == expected, (mode, calls)


@pytest.mark.parametrize(
    "method, task_ids, shares",
    [
        ("residual", None, True),  # one prompt: (8 - 1) * 20 = 140 positions saved
        ("compt", [1] * 8, True),  # one task present: 140
        ("compt", [0, 1] * 4, False),  # two tasks: (8 - 2) * 20 = 120
        ("bayesian_source", None, False),  # four particles in training: (8 - 4) * 20 = 80
    ],
)
def test_auto_counts_the_distinct_prompts_of_the_batch(method, task_ids, shares):
    make_config = (
        (lambda **kw: BayesianPromptConfig(num_particles=4, **kw))
        if method == "bayesian_source"
        else METHODS[method][0]
    )
    model = get_peft_model(_base("llama"), make_config(task_type="CAUSAL_LM", num_virtual_tokens=20))
    calls = _calls(model.train())
    input_ids = torch.randint(3, VOCAB, (8, 7), generator=torch.Generator().manual_seed(0))
    extra = {"task_ids": torch.tensor(task_ids)} if task_ids else {}
    model(input_ids=input_ids, labels=input_ids, **extra)
    assert len(calls) == (2 if shares else 1), calls


def _embeds_calls(model) -> list[int]:
    """The batch size of every base-model call that gets embeddings (generate's decoding steps get token ids)."""
    sizes = []

    def record(module, args, kwargs):
        if kwargs.get("inputs_embeds") is not None:
            sizes.append(kwargs["inputs_embeds"].shape[0])

    model.base_model.register_forward_pre_hook(record, with_kwargs=True)
    return sizes


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("arch", sorted(DECODERS))
def test_generate_prefills_once_per_distinct_prompt_with_the_concatenated_tokens(arch, method):
    """Greedy, beam search and sampling, batched and left-padded: the same tokens (and beam scores) with the prompt
    shared at prefill as concatenated; the shared prefill runs the distinct prompts, then the rows (and beams)."""
    _, extra = METHODS[method]
    batch = {key: value for key, value in _batch("left").items() if key != "labels"}
    common = dict(max_new_tokens=4, min_new_tokens=4, pad_token_id=0, **extra)
    results, prefill_calls = {}, {}
    for mode in ("on", "off"):
        model = _model(arch, method, mode).eval()
        calls = _embeds_calls(model)
        with torch.no_grad():
            greedy = model.generate(**batch, do_sample=False, **common)
            beams = model.generate(
                **batch, do_sample=False, num_beams=3, return_dict_in_generate=True, output_scores=True, **common
            )
            torch.manual_seed(5)
            sampled = model.generate(**batch, do_sample=True, top_k=0, **common)
        results[mode] = (greedy, beams.sequences, beams.sequences_scores, sampled)
        prefill_calls[mode] = calls
    for shared, concatenated in zip(results["on"][:2] + results["on"][3:], results["off"][:2] + results["off"][3:]):
        assert torch.equal(shared, concatenated)
    torch.testing.assert_close(results["on"][2], results["off"][2], rtol=1e-5, atol=1e-5)
    distinct = {"residual": 1, "compt": 2, "bayesian_source": 1}[method]  # a Bayesian source in eval: the mean
    rows = batch["input_ids"].shape[0]
    assert prefill_calls["on"] == [distinct, rows, distinct, rows * 3, distinct, rows]
    assert prefill_calls["off"] == [rows, rows * 3, rows]


def test_generate_with_output_attentions_concatenates_under_auto_and_on_refuses():
    batch = {key: value for key, value in _batch("left").items() if key != "labels"}
    common = dict(
        max_new_tokens=3, do_sample=False, pad_token_id=0, output_attentions=True, return_dict_in_generate=True
    )
    with torch.no_grad():
        torch.manual_seed(1)  # 48 tokens: (4 - 1) * 48 positions saved, so only output_attentions stops "auto"
        config = ResidualPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=48, bottleneck_size=8)
        model = get_peft_model(_base("llama"), config).eval()
        calls = _embeds_calls(model)
        found = model.generate(**batch, **common)
        with pytest.raises(ValueError, match="generate cannot share the prompt's keys and values: output_attentions"):
            _model("llama", "residual", "on").eval().generate(**batch, **common)
    assert calls == [batch["input_ids"].shape[0]]  # concatenated: the prompt in front of every row
    assert found.sequences.shape == (batch["input_ids"].shape[0], batch["input_ids"].shape[1] + 3)


def _peft_prompt(kind: str, arch: str = "llama"):
    from peft import PromptEncoderConfig, PromptTuningConfig

    config = (
        PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL_TOKENS)
        if kind == "prompt_tuning"
        else PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL_TOKENS, encoder_hidden_size=16)
    )
    base = _base(arch)
    torch.manual_seed(1)
    return get_peft_model(base, config)


@pytest.mark.parametrize("kind", ["prompt_tuning", "p_tuning"])
@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_enable_shared_prefix_gives_peft_prompt_methods_the_path_with_the_same_results(arch, kind, tmp_path):
    from peft import PeftModel

    from peft_prompt_transfer import enable_shared_prefix

    batch = _batch("left")
    plain = _peft_prompt(kind, arch).train()
    calls = _embeds_calls(plain)
    concatenated = _run(plain, batch)
    assert calls == [4]  # without the call, peft's own path
    shared_model = enable_shared_prefix(_peft_prompt(kind, arch).train(), "on")
    calls = _embeds_calls(shared_model)
    _assert_same(_run(shared_model, batch), concatenated)
    assert calls == [1, 4]  # the one prompt, then the rows
    generation = {key: value for key, value in batch.items() if key != "labels"}
    common = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, num_beams=2)
    with torch.no_grad():
        assert torch.equal(
            shared_model.eval().generate(**generation, **common), plain.eval().generate(**generation, **common)
        )
    # not saved: the adapter loads with stock peft as before
    shared_model.save_pretrained(tmp_path / "saved")
    assert "shared_prefix" not in (tmp_path / "saved" / "adapter_config.json").read_text()
    loaded = PeftModel.from_pretrained(_base(arch), tmp_path / "saved")
    assert not hasattr(loaded.active_peft_config, "shared_prefix")


def test_enable_shared_prefix_refuses_what_it_cannot_share():
    from peft import LoraConfig, PromptTuningConfig

    from peft_prompt_transfer import enable_shared_prefix

    with pytest.raises(ValueError, match="adapters choose their path with their config's shared_prefix field"):
        enable_shared_prefix(_model("llama", "residual", "auto"))
    lora = get_peft_model(_base("llama"), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="takes peft's PROMPT_TUNING and P_TUNING adapters.*is LORA"):
        enable_shared_prefix(lora)
    classifier = get_peft_model(
        TINY_MODELS["bert"].build(), PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=VIRTUAL_TOKENS)
    )
    with pytest.raises(ValueError, match="needs a decoder-only causal LM.*is SEQ_CLS"):
        enable_shared_prefix(classifier)
    with pytest.raises(ValueError, match=r"mode must be one of \['auto', 'on', 'off'\], got 'yes'"):
        enable_shared_prefix(_peft_prompt("prompt_tuning"), "yes")


CLASSIFIERS = ("llama", "mistral", "gemma2", "qwen3")


def _classifier(arch: str, method: str, shared_prefix: str, num_labels: int = 3):
    from transformers import AutoModelForSequenceClassification

    make_config, _ = METHODS[method]
    torch.manual_seed(0)
    config = DECODERS[arch]()
    config.num_labels = num_labels
    base = AutoModelForSequenceClassification.from_config(config)
    for module in base.modules():  # as _base: the concatenated path's reference has no dropout either
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    torch.manual_seed(1)
    adapter = make_config(task_type="SEQ_CLS", num_virtual_tokens=VIRTUAL_TOKENS, shared_prefix=shared_prefix)
    return get_peft_model(base, adapter)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("arch", CLASSIFIERS)
def test_a_decoder_classifier_shares_the_prefix_with_the_concatenated_results(arch, method):
    """transformers' generic decoder classifier pools the last position of the embeddings peft gives it: shared or
    concatenated, the same position, so the same logits, loss and gradients."""
    _, extra = METHODS[method]
    batch = {**_batch("left"), "labels": torch.tensor([0, 2, 1, 2])}
    results = {}
    for mode in ("on", "off"):
        model = _classifier(arch, method, mode).train()
        calls = []  # (rows, positions) of each call of the classifier's body
        model.base_model.base_model.register_forward_pre_hook(
            lambda module, args, kwargs: calls.append(tuple(kwargs["inputs_embeds"].shape[:2])), with_kwargs=True
        )
        output = model(**batch, **extra, output_hidden_states=True)
        output.loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results[mode] = (output, grads)
        distinct = {"residual": 1, "compt": 2, "bayesian_source": 3}[method]
        expected = [(distinct, VIRTUAL_TOKENS), (4, 7)] if mode == "on" else [(4, VIRTUAL_TOKENS + 7)]
        assert calls == expected, calls
    (shared, grads), (concatenated, ref_grads) = results["on"], results["off"]
    torch.testing.assert_close(shared.loss, concatenated.loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(shared.logits, concatenated.logits, rtol=1e-5, atol=1e-6)
    assert len(shared.hidden_states) == len(concatenated.hidden_states)
    for ours, theirs in zip(shared.hidden_states, concatenated.hidden_states):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys() and grads
    for name in grads:
        scale = ref_grads[name].abs().max().item()
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-4 * scale)


def test_other_classifiers_concatenate_under_auto_and_on_says_why():
    from transformers import AutoModelForSequenceClassification

    batch = {**_batch("right"), "labels": torch.tensor([0, 1, 1, 0])}
    gpt2_config = DECODERS["gpt2"]()
    gpt2_config.pad_token_id = 0
    gpt2 = AutoModelForSequenceClassification.from_config(gpt2_config)
    for module in gpt2.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    config = ResidualPromptConfig(task_type="SEQ_CLS", num_virtual_tokens=48, shared_prefix="on")
    with pytest.raises(
        ValueError, match="GPT2ForSequenceClassification is not transformers' generic decoder classifier"
    ):
        get_peft_model(gpt2, config)(**batch)
    bert = TINY_MODELS["bert"].build()
    model = get_peft_model(bert, ResidualPromptConfig(task_type="SEQ_CLS", num_virtual_tokens=48))
    calls = _calls(model)
    assert model(**batch).loss.isfinite()
    assert calls == [4]  # an encoder: bidirectional, so concatenated
