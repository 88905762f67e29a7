"""ComPT: normalisations, compositions, task ids, Trainer training, save/load/export, add-a-task, per-group LRs."""

from __future__ import annotations

import math

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
from peft import PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from peft_prompt_transfer import (
    COMPT_AUTHORS_LEARNING_RATES,
    ComPTConfig,
    ResidualPromptConfig,
    TaskIdsCollator,
    add_tasks,
    compt_parameter_groups,
    create_compt_optimizer,
    export_prompt_tuning,
    plot_routing_weights,
    set_active_task,
)
from peft_prompt_transfer.compt import sparsemax

TASKS = ["alpha", "beta", "gamma"]


def compt_config(tiny, **overrides) -> ComPTConfig:
    kwargs = dict(task_type=tiny.task_type, task_names=TASKS, num_source_prompts=3, num_virtual_tokens=4)
    kwargs.update(overrides)
    return ComPTConfig(**kwargs)


def task_batch(tiny, task_ids=(0, 1, 2, 1), seed=0):
    batch = make_batch(tiny, seed=seed)
    batch["task_ids"] = torch.tensor(task_ids)
    return batch


def trained(tiny, tmp_path, steps=5, task_ids=(0, 1, 2, 1), **overrides):
    model = get_peft_model(tiny.saved(tmp_path), compt_config(tiny, **overrides))
    trainer = make_trainer(
        model, tmp_path / "train", ListDataset(task_batch(tiny, task_ids)), max_steps=steps, remove_unused_columns=False
    )
    trainer.train()
    return model.eval()


# ---------------------------------------------------------------------------------------------
# sparsemax
# ---------------------------------------------------------------------------------------------


def test_sparsemax_hand_computed_values():
    # z = (1.0, 0.8, 0.1): support {0, 1}, tau = (1.8 - 1) / 2 = 0.4
    torch.testing.assert_close(sparsemax(torch.tensor([1.0, 0.8, 0.1])), torch.tensor([0.6, 0.4, 0.0]))
    torch.testing.assert_close(sparsemax(torch.tensor([3.0, 0.0, 0.0])), torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(sparsemax(torch.tensor([0.2, 0.2, 0.2, 0.2])), torch.full((4,), 0.25))
    out = sparsemax(torch.tensor([[0.5, float("-inf"), 0.1], [0.0, 2.0, 1.5]]))  # rows independent, -inf -> 0
    torch.testing.assert_close(out, torch.tensor([[0.7, 0.0, 0.3], [0.0, 0.75, 0.25]]))
    assert (out == 0).sum() == 2  # exact zeros


def test_sparsemax_gradient_matches_finite_differences():
    torch.manual_seed(0)
    for point in (torch.tensor([[1.0, 0.8, 0.1, -0.5]]), torch.randn(5, 6) * 2):
        z = point.double().requires_grad_()
        assert torch.autograd.gradcheck(sparsemax, (z,), eps=1e-6, atol=1e-6)
    # hand-computed Jacobian on the support {0, 1}: d p / d z = I - 1/2
    z = torch.tensor([1.0, 0.8, 0.1], requires_grad=True)
    (sparsemax(z) * torch.tensor([1.0, 0.0, 0.0])).sum().backward()
    torch.testing.assert_close(z.grad, torch.tensor([0.5, -0.5, 0.0]))


# ---------------------------------------------------------------------------------------------
# weights and composition
# ---------------------------------------------------------------------------------------------


def _encoder(tiny=TINY_MODELS["gpt2"], **overrides):
    model = get_peft_model(tiny.build(), compt_config(tiny, **overrides))
    encoder = model.prompt_encoder["default"]
    with torch.no_grad():
        encoder.router.trainable.copy_(torch.tensor([[2.0, 1.0, -1.0], [0.0, 0.5, 0.4], [-3.0, 3.0, 0.0]]))
        if encoder.gates is not None:
            encoder.gates.trainable.copy_(torch.tensor([[0.5, -0.5], [1.0, 0.0], [0.0, 2.0]]))
    return model, encoder


@pytest.mark.parametrize("normalization", ["sigmoid", "softmax", "sparsemax"])
@pytest.mark.parametrize("top_k", [None, 2])
def test_normalisations(normalization, top_k):
    _, encoder = _encoder(normalization=normalization, top_k=top_k)
    logits = encoder.router.value().detach()
    expected = {"sigmoid": torch.sigmoid, "softmax": lambda x: x.softmax(-1), "sparsemax": sparsemax}[normalization]
    if top_k:
        keep = logits >= logits.topk(top_k, dim=-1).values[:, -1:]
        masked = logits.masked_fill(~keep, float("-inf"))
        reference = torch.sigmoid(logits) * keep if normalization == "sigmoid" else expected(masked)
        assert ((reference > 0).sum(-1) <= top_k).all()
    else:
        reference = expected(logits)
    torch.testing.assert_close(encoder.source_weights(), reference)
    if normalization == "sparsemax":
        assert (encoder.source_weights() == 0).any()  # row 2: exact zeros
    gates = torch.sigmoid(encoder.gates.value().detach())
    torch.testing.assert_close(encoder.routing_weights(), gates[:, :1] * reference)


@pytest.mark.parametrize("composition", ["sum", "concat"])
@pytest.mark.parametrize("private", [True, False])
def test_composition_formula(composition, private):
    if composition == "concat" and not private:
        with pytest.raises(ValueError, match="set private_prompt=True"):
            compt_config(TINY_MODELS["gpt2"], composition=composition, private_prompt=private)
        return
    model, encoder = _encoder(composition=composition, private_prompt=private)
    cfg = encoder.config
    sources = encoder.embedding.weight.view(3, cfg.prompt_length, -1)
    weights, gates = encoder.source_weights(), torch.sigmoid(encoder.gates.value())
    shared = torch.einsum("ts,slh->tlh", weights * gates[:, :1], sources)
    if not private:
        expected = shared
    else:
        priv = gates[:, 1, None, None] * encoder.private.value()
        expected = shared + priv if composition == "sum" else torch.cat([shared, priv], dim=1)
    prompts = encoder.task_prompts()
    assert prompts.shape == (3, 4, 32)
    torch.testing.assert_close(prompts, expected)
    # forward gathers each example's task prompt
    torch.testing.assert_close(model.get_prompt(4, task_ids=torch.tensor([2, 0, 0, 1])), expected[[2, 0, 0, 1]])


def test_fixed_gates_and_unnamed_tasks():
    _, encoder = _encoder(learn_gates=False, task_names=None, num_tasks=3)
    assert encoder.gates is None and torch.equal(encoder.gate_values(), torch.ones(3, 2))


def test_relaxed_bernoulli_samples_while_training_and_anneals_per_optimizer_step():
    model, encoder = _encoder(
        relaxed_bernoulli=True, bernoulli_temperature=2.0, bernoulli_anneal_rate=0.5, bernoulli_min_temperature=0.5
    )
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    first, second = encoder.task_prompts(), encoder.task_prompts()
    assert not torch.allclose(first, second)  # sampled
    assert int(encoder.sampling_step) == 0 and encoder.temperature() == 2.0  # forward passes do not count
    optimizer.step()  # two accumulated forward passes, one optimizer step
    assert int(encoder.sampling_step) == 1
    assert encoder.temperature() == pytest.approx(2.0 * math.exp(-0.5))
    optimizer.step()  # no forward since the last step: nothing to count
    assert int(encoder.sampling_step) == 1
    for _ in range(10):
        encoder.task_prompts()
        optimizer.step()
    assert int(encoder.sampling_step) == 11 and encoder.temperature() == 0.5  # the floor
    model.eval()
    torch.testing.assert_close(encoder.task_prompts(), encoder.task_prompts())  # deterministic
    optimizer.step()
    assert int(encoder.sampling_step) == 11  # evaluation does not anneal


def test_another_models_optimizer_leaves_the_temperature_clock_alone():
    """The step counter counts only optimizers that hold the encoder's parameters (or flattened copies of them)."""
    model, encoder = _encoder(relaxed_bernoulli=True, bernoulli_temperature=2.0, bernoulli_anneal_rate=0.5)
    model.train()
    compt_optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    plain = torch.nn.Linear(4, 2)
    plain_optimizer = torch.optim.SGD(plain.parameters(), lr=0.1)
    encoder.task_prompts()  # a training forward of ComPT, then the plain model trains
    plain(torch.randn(3, 4)).sum().backward()
    plain_optimizer.step()
    assert int(encoder.sampling_step) == 0 and encoder.temperature() == 2.0
    compt_optimizer.step()
    assert int(encoder.sampling_step) == 1
    for _ in range(3):
        encoder.task_prompts()
        plain_optimizer.step()
        compt_optimizer.step()
        plain_optimizer.step()
    assert int(encoder.sampling_step) == 4
    # the fallback: an optimizer that steps flattened copies (DeepSpeed ZeRO's fp32 partitions are plain tensors)
    flat_copy = torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad]).requires_grad_()
    zero_like_optimizer = torch.optim.SGD([flat_copy], lr=0.0)
    encoder.task_prompts()
    zero_like_optimizer.step()
    assert int(encoder.sampling_step) == 5


@pytest.mark.parametrize(
    "steps, temperature", [(0, 5.0), (1, 4.98), (100, 3.0), (249, 0.02), (250, 0.001), (10_000, 0.001)]
)
def test_linear_temperature_schedule_hand_values(steps, temperature):
    # the authors' CrossPT configs: 5 -> 0.001, linear, 0.02 per optimizer step
    _, encoder = _encoder(
        relaxed_bernoulli=True,
        bernoulli_temperature=5.0,
        bernoulli_min_temperature=0.001,
        bernoulli_anneal_schedule="linear",
        bernoulli_anneal_rate=0.02,
    )
    encoder.sampling_step.fill_(steps)
    assert encoder.temperature() == pytest.approx(temperature, abs=1e-9)


def test_sampled_convex_share_formula():
    model, encoder = _encoder(share="sampled_convex", share_temperature=4.0)
    assert encoder.gates is None
    with torch.no_grad():
        encoder.shares.trainable.copy_(torch.tensor([[0.0], [1.0], [-2.0]]))
    share = torch.tensor([0.5, 0.7310585786, 0.1192029220])  # sigmoid(0), sigmoid(1), sigmoid(-2) by hand
    model.eval()
    sources = encoder.embedding.weight.view(3, 4, -1)
    shared = torch.einsum("ts,slh->tlh", encoder.source_weights(), sources)
    expected = (1 - share)[:, None, None] * shared + share[:, None, None] * encoder.private.value()
    torch.testing.assert_close(encoder.task_prompts(), expected)
    torch.testing.assert_close(encoder.routing_weights(), (1 - share)[:, None] * encoder.source_weights())
    # training: a relaxed-Bernoulli sample at share_temperature, as torch's RelaxedBernoulli draws it
    model.train()
    torch.manual_seed(3)
    sampled = encoder.gate_values(sample=True)
    torch.manual_seed(3)
    reference = torch.distributions.RelaxedBernoulli(torch.tensor(4.0), logits=encoder.shares.value()).rsample()
    torch.testing.assert_close(sampled, torch.cat([1 - reference, reference], dim=1))
    assert not torch.allclose(encoder.task_prompts(), encoder.task_prompts())


def test_authors_router_sampling_normalises_a_relaxed_bernoulli_sample():
    model, encoder = _encoder(relaxed_bernoulli=True, router_sampling="relaxed_bernoulli", bernoulli_temperature=5.0)
    router = encoder.router.value().detach()
    torch.manual_seed(5)
    sampled = encoder.source_weights(sample=True)
    torch.manual_seed(5)
    reference = torch.distributions.RelaxedBernoulli(torch.tensor(5.0), logits=router).rsample().softmax(-1)
    torch.testing.assert_close(sampled, reference)
    torch.testing.assert_close(encoder.source_weights(), router.softmax(-1))  # evaluation: the logits themselves


def test_per_prompt_encoder_and_uniform_init():
    model, encoder = _encoder(prompt_encoder="per_prompt", prompt_encoder_hidden_size=5, uniform_init_range=0.5)
    sources, private = encoder.reparameterization, encoder.private_reparameterization
    assert sources.down_weight.shape == (3, 32, 5) and private.down_weight.shape == (3, 32, 5)
    raw = torch.cat([encoder.embedding.weight.detach().view(-1), encoder.private.value().detach().view(-1)])
    assert raw.abs().max() <= 0.5 and raw.std() == pytest.approx(0.5 / math.sqrt(3), rel=0.1)  # U(-0.5, 0.5)
    with torch.no_grad():  # known weights: prompt j's encoder is x -> W2_j gelu(W1_j x + b1_j) + b2_j
        for mlp in (sources, private):
            for j in range(3):
                mlp.down_weight[j] = torch.linspace(-1, 1, 32 * 5).view(32, 5) * (j + 1)
                mlp.down_bias[j] = 0.1 * j
                mlp.up_weight[j] = torch.linspace(1, -1, 5 * 32).view(5, 32) / (j + 1)
                mlp.up_bias[j] = -0.2 * j
    raw_sources, raw_private = encoder.embedding.weight.detach().view(3, 4, 32), encoder.private.value().detach()
    for j in range(3):
        w1 = torch.linspace(-1, 1, 32 * 5).view(32, 5) * (j + 1)
        w2 = torch.linspace(1, -1, 5 * 32).view(5, 32) / (j + 1)
        for encoded, raw in ((encoder.source_prompts(), raw_sources), (encoder.private_prompts(), raw_private)):
            torch.testing.assert_close(encoded[j], torch.nn.functional.gelu(raw[j] @ w1 + 0.1 * j) @ w2 - 0.2 * j)
    # the default width is the model's hidden size, as in the authors' MLPPromptEncoder
    _, default = _encoder(prompt_encoder="per_prompt")
    assert default.reparameterization.down_weight.shape == (3, 32, 32)


def test_authors_recipe():
    tiny = TINY_MODELS["gpt2"]
    config = ComPTConfig.authors_recipe(
        task_type=tiny.task_type, task_names=TASKS, num_source_prompts=3, num_virtual_tokens=4, share_temperature=2.0
    )
    assert (config.share, config.prompt_encoder, config.router_sampling, config.bernoulli_anneal_schedule) == (
        "sampled_convex",
        "per_prompt",
        "relaxed_bernoulli",
        "linear",
    )
    assert (
        config.relaxed_bernoulli,
        config.bernoulli_temperature,
        config.bernoulli_min_temperature,
        config.bernoulli_anneal_rate,
        config.uniform_init_range,
        config.normalization,
    ) == (True, 5.0, 0.001, 0.02, 0.5, "softmax")
    assert config.share_temperature == 2.0  # overrides win
    assert COMPT_AUTHORS_LEARNING_RATES == {"source_lr": 0.05, "private_lr": 0.05, "router_lr": 0.1}
    model = get_peft_model(tiny.build(), config)
    encoder = model.prompt_encoder["default"]
    groups = {g["name"]: g for g in compt_parameter_groups(model, **COMPT_AUTHORS_LEARNING_RATES)}
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    assert {id(p) for p in encoder.private_reparameterization.parameters()} <= ids["private"]
    assert {id(p) for p in encoder.reparameterization.parameters()} <= ids["source"]
    assert id(encoder.shares.trainable) in ids["router"] and groups["router"]["lr"] == 0.1


def test_old_configs_mean_what_they_meant():
    tiny = TINY_MODELS["gpt2"]
    assert compt_config(tiny).prompt_encoder == "none"
    assert compt_config(tiny, prompt_mlp_bottleneck_size=8).prompt_encoder == "shared_mlp"
    defaults = compt_config(tiny)
    assert (
        defaults.share,
        defaults.relaxed_bernoulli,
        defaults.router_sampling,
        defaults.bernoulli_anneal_schedule,
        defaults.uniform_init_range,
    ) == ("gates", False, "noisy_logits", "exponential", None)


# ---------------------------------------------------------------------------------------------
# task ids
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpt2", "t5", "bert"])
def test_mixed_task_batch_equals_single_task_batches(name):
    tiny = TINY_MODELS[name]
    model = get_peft_model(tiny.build(), compt_config(tiny)).eval()
    batch = task_batch(tiny, task_ids=(2, 0, 1, 0))
    mixed = logits(model, batch)
    for row, task in enumerate(batch["task_ids"].tolist()):
        single = {k: v[row : row + 1] for k, v in batch.items()}
        torch.testing.assert_close(logits(model, single)[0], mixed[row], atol=1e-5, rtol=0)
    # the prompt depends on the task
    other = dict(batch, task_ids=torch.tensor([0, 0, 0, 0]))
    assert not torch.allclose(logits(model, other)[0], mixed[0])


@pytest.mark.parametrize(
    "task_ids, message",
    [
        (None, "COMPT needs task_ids"),
        (torch.tensor([0, 1, 3, 0]), r"task_ids \[3\] are out of range: this adapter has 3 tasks"),
        (torch.tensor([0, 1]), r"shape \[batch_size\] = \[4\]"),
        (torch.tensor([0.0, 1.0, 1.0, 0.0]), "integer task indices"),
    ],
)
def test_bad_task_ids_in_forward(task_ids, message):
    tiny = TINY_MODELS["gpt2"]
    model = get_peft_model(tiny.build(), compt_config(tiny))
    batch = make_batch(tiny)
    with pytest.raises(ValueError, match=message):
        model(**batch, task_ids=task_ids)


def _trained_state(model, tmp_path, dataset, **overrides) -> dict:
    make_trainer(model, tmp_path, dataset, max_steps=3, **overrides).train()
    return model.prompt_encoder["default"].adapter_state_dict()


def test_trainer_default_arguments_keep_task_ids(tmp_path):
    """The Trainer's default remove_unused_columns=True keeps the task_ids column for ComPT (a torch dataset, and a
    datasets.Dataset whose text column it still drops): training equals training with remove_unused_columns=False."""
    import datasets

    tiny = TINY_MODELS["gpt2"]
    batch = task_batch(tiny)
    expected = _trained_state(
        get_peft_model(tiny.build(), compt_config(tiny)),
        tmp_path / "explicit",
        ListDataset(batch),
        remove_unused_columns=False,
    )
    with_text = datasets.Dataset.from_dict({**{k: v.tolist() for k, v in batch.items()}, "text": ["a b"] * 4})
    for name, dataset in (("torch", ListDataset(batch)), ("datasets", with_text.with_format("torch"))):
        state = _trained_state(get_peft_model(tiny.build(), compt_config(tiny)), tmp_path / name, dataset)
        for key in expected:
            torch.testing.assert_close(state[key], expected[key], atol=1e-6, rtol=0, msg=f"{name}: {key}")


def test_task_ids_collator_carries_task_ids_through_a_collator_that_drops_them():
    rows = ListDataset(task_batch(TINY_MODELS["gpt2"], task_ids=(2, 0, 1, 1))).rows

    def known_keys_only(features):
        return {k: torch.stack([f[k] for f in features]) for k in ("input_ids", "labels")}

    batch = TaskIdsCollator(known_keys_only)(rows)
    assert torch.equal(batch["task_ids"], torch.tensor([2, 0, 1, 1]))
    assert torch.equal(batch["input_ids"], known_keys_only(rows)["input_ids"])
    assert TaskIdsCollator(TaskIdsCollator(known_keys_only)).collator is known_keys_only  # no double wrapping
    float_ids = [dict(row, task_ids=torch.tensor(1.0)) for row in rows]
    model = get_peft_model(TINY_MODELS["gpt2"].build(), compt_config(TINY_MODELS["gpt2"]))
    with pytest.raises(ValueError, match="integer task indices"):  # not silently rounded by the collator
        model(**TaskIdsCollator(known_keys_only)(float_ids))


def test_missing_task_ids_error_names_every_way_to_give_them():
    tiny = TINY_MODELS["gpt2"]
    model = get_peft_model(tiny.build(), compt_config(tiny))
    with pytest.raises(ValueError, match="COMPT needs task_ids") as caught:
        model(**make_batch(tiny))
    for remedy in ("set_active_task(model, task)", "TaskIdsCollator(your_collator)", "TRL"):
        assert remedy in str(caught.value)


def test_trl_sft_trainer_trains_compt_with_task_ids(tmp_path):
    """TRL's SFTTrainer (its own column list and collator, default arguments) trains ComPT with the dataset's task_ids:
    the loss falls, and only the tasks in the data move."""
    trl = pytest.importorskip("trl")
    import datasets
    from transformers import AutoTokenizer

    tiny = TINY_MODELS["gpt2"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer(tmp_path))
    texts = [" ".join(f"w{(3 * i + j) % 50 + 3}" for j in range(6)) for i in range(8)]
    data = datasets.Dataset.from_dict({"text": texts, "task_ids": [0, 1] * 4})
    model = get_peft_model(tiny.build(), compt_config(tiny))
    before = model.prompt_encoder["default"].adapter_state_dict()
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "sft"),
        max_steps=12,
        per_device_train_batch_size=4,
        learning_rate=3e-2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        lr_scheduler_type="constant",
        max_length=16,
        seed=0,
    )
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    losses = train_losses(trainer)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    after = model.prompt_encoder["default"].adapter_state_dict()
    assert not torch.equal(after["router_logits"][:2], before["router_logits"][:2])  # tasks 0 and 1 trained
    torch.testing.assert_close(after["router_logits"][2], before["router_logits"][2], atol=0, rtol=0)  # task 2 unused


def test_pipelines_run_the_active_task(tmp_path):
    from transformers import AutoTokenizer, pipeline

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer(tmp_path))
    texts = ["w3 w7 w9 w20", "w12 w4 w33"]
    classifier_model = trained(TINY_MODELS["bert"], tmp_path / "bert", steps=3)
    classify = pipeline(
        "text-classification", model=classifier_model, tokenizer=tokenizer, function_to_apply="none", top_k=None
    )
    scores = {}
    for task, task_id in (("beta", 1), ("gamma", 2)):
        with set_active_task(classifier_model, task):
            found = [{d["label"]: d["score"] for d in row} for row in classify(texts)]
        for text, row in zip(texts, found):
            encoded = tokenizer(text, return_tensors="pt")
            with torch.no_grad():
                expected = classifier_model(**encoded, task_ids=torch.tensor([task_id])).logits[0]
            torch.testing.assert_close(torch.tensor([row["LABEL_0"], row["LABEL_1"]]), expected, atol=1e-5, rtol=0)
        scores[task] = found
    assert scores["beta"] != scores["gamma"]  # the task chose the prompt
    with pytest.raises(ValueError, match="COMPT needs task_ids"):  # the context manager restored "no task"
        classify(texts)

    generator_model = trained(TINY_MODELS["gpt2"], tmp_path / "gpt2", steps=3)
    set_active_task(generator_model, "gamma")
    generate = pipeline("text-generation", model=generator_model, tokenizer=tokenizer)
    text = generate(texts[0], max_new_tokens=4, do_sample=False, return_full_text=False)[0]["generated_text"]
    encoded = tokenizer(texts[0], return_tensors="pt")
    expected = generator_model.generate(**encoded, task_ids=torch.tensor([2]), max_new_tokens=4, do_sample=False)
    assert (
        text.split() == tokenizer.decode(expected[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True).split()
    )
    set_active_task(generator_model, None)
    with pytest.raises(ValueError, match="set_active_task needs a ComPT adapter"):
        set_active_task(
            get_peft_model(
                TINY_MODELS["gpt2"].build(), ResidualPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)
            ),
            0,
        )


# ---------------------------------------------------------------------------------------------
# training, save/load, export, generation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpt2", "t5", "bert"])
@pytest.mark.parametrize("composition", ["sum", "concat"])
def test_trainer_loss_falls(name, composition, tmp_path):
    tiny = TINY_MODELS[name]
    model = get_peft_model(tiny.build(), compt_config(tiny, composition=composition))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = make_trainer(
        model, tmp_path, ListDataset(task_batch(tiny)), max_steps=30, remove_unused_columns=False, learning_rate=0.1
    )
    trainer.train()
    losses = train_losses(trainer)
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    for n, p in model.named_parameters():
        if n in before and "classifier" not in n:
            assert not torch.equal(p.detach(), before[n]), f"{n} did not train"


AUTHORS_OPTIONS = dict(
    share="sampled_convex",
    relaxed_bernoulli=True,
    router_sampling="relaxed_bernoulli",
    bernoulli_anneal_schedule="linear",
    bernoulli_temperature=5.0,
    bernoulli_anneal_rate=0.02,
    bernoulli_min_temperature=0.001,
    prompt_encoder="per_prompt",
    uniform_init_range=0.5,
)


@pytest.mark.parametrize("name", ["gpt2", "bart", "roberta"])
@pytest.mark.parametrize(
    "options", [{}, {"prompt_mlp_bottleneck_size": 8}, AUTHORS_OPTIONS], ids=["plain", "shared_mlp", "authors"]
)
def test_save_load_and_export_logits_equal(name, options, tmp_path):
    tiny = TINY_MODELS[name]
    model = trained(tiny, tmp_path, normalization="sparsemax", **options)
    batch = task_batch(tiny, seed=1)
    expected = logits(model, batch)
    model.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert saved["router_logits"].shape == (3, 3) and saved["private_prompt_embeddings"].shape == (12, 32)
    encoded = model.peft_config["default"].prompt_encoder != "none"
    assert ("raw_prompt_embeddings" in saved) == encoded
    assert any(k.startswith("private_reparameterization.") for k in saved) == (options is AUTHORS_OPTIONS)
    assert ("share_logits" in saved) == (options is AUTHORS_OPTIONS) != ("gate_logits" in saved)
    assert isinstance(PeftConfig.from_pretrained(tmp_path / "adapter"), ComPTConfig)

    loaded = PeftModel.from_pretrained(tiny.saved(tmp_path), tmp_path / "adapter")
    inference_encoder = loaded.prompt_encoder["default"]
    assert inference_encoder.reparameterization is None and inference_encoder.private_reparameterization is None
    torch.testing.assert_close(logits(loaded, batch), expected, atol=1e-5, rtol=0)

    resumed = get_peft_model(tiny.saved(tmp_path), compt_config(tiny, normalization="sparsemax", **options))
    resumed.load_adapter(tmp_path / "adapter", adapter_name="default", is_trainable=True)
    torch.testing.assert_close(logits(resumed.eval(), batch), expected, atol=1e-5, rtol=0)

    for task_id, task in enumerate(TASKS):  # each task's composed prompt as a plain PROMPT_TUNING adapter
        export_prompt_tuning(model, tmp_path / task, task=task)
        plain = PeftModel.from_pretrained(tiny.saved(tmp_path), tmp_path / task)
        rows = batch["task_ids"] == task_id
        single = {k: v[rows] for k, v in batch.items() if k != "task_ids"}
        torch.testing.assert_close(logits(plain, single), expected[rows], atol=1e-5, rtol=0)


def test_export_needs_a_task(tmp_path):
    tiny = TINY_MODELS["gpt2"]
    model = get_peft_model(tiny.build(), compt_config(tiny))
    with pytest.raises(ValueError, match="pass task= one of"):
        export_prompt_tuning(model, tmp_path)
    with pytest.raises(ValueError, match="Unknown task 'delta'"):
        export_prompt_tuning(model, tmp_path, task="delta")


@pytest.mark.parametrize(
    "config",
    [dict(relaxed_bernoulli=True, prompt_mlp_bottleneck_size=8, normalization="sigmoid"), AUTHORS_OPTIONS],
    ids=["shared_mlp", "authors"],
)
def test_resume_from_checkpoint_matches_uninterrupted_training(config, tmp_path):
    tiny = TINY_MODELS["gpt2"]
    data = ListDataset(task_batch(tiny), repeat=4)
    overrides = dict(max_steps=8, save_strategy="steps", save_steps=4, remove_unused_columns=False)

    def run(output_dir, resume=None):
        model = get_peft_model(tiny.build(), compt_config(tiny, **config))
        trainer = make_trainer(model, output_dir, data, **overrides)
        trainer.train(resume_from_checkpoint=resume)
        return model.prompt_encoder["default"].adapter_state_dict()

    full = run(tmp_path / "full")
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "full" / "checkpoint-4"))
    assert int(full["sampling_step"]) == 8
    assert set(resumed) == set(full)
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], atol=1e-6, rtol=0, msg=key)


def test_temperature_schedule_counts_optimizer_steps_under_gradient_accumulation(tmp_path):
    tiny = TINY_MODELS["gpt2"]
    data = ListDataset(task_batch(tiny), repeat=4)

    def temperature_after(steps, **batching):
        model = get_peft_model(tiny.build(), compt_config(tiny, **AUTHORS_OPTIONS))
        make_trainer(
            model, tmp_path / str(batching), data, max_steps=steps, remove_unused_columns=False, **batching
        ).train()
        encoder = model.prompt_encoder["default"]
        return int(encoder.sampling_step), encoder.temperature()

    accumulated = temperature_after(3, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    assert accumulated == temperature_after(3, per_device_train_batch_size=4) == (3, pytest.approx(5.0 - 3 * 0.02))


@pytest.mark.parametrize("name", ["gpt2", "t5"])
def test_generate_with_task_ids(name, tmp_path):
    tiny = TINY_MODELS[name]
    model = trained(tiny, tmp_path, steps=3)
    batch = task_batch(tiny, task_ids=(1, 0, 2, 1), seed=2)
    steps = 4
    out = model.generate(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        task_ids=batch["task_ids"],
        max_new_tokens=steps,
        min_new_tokens=steps,
        do_sample=False,
        pad_token_id=0,
    )
    out = out[:, 1:] if model.config.is_encoder_decoder else out[:, batch["input_ids"].shape[1] :]
    reference = greedy_reference(model, batch, steps, task_ids=batch["task_ids"])
    assert torch.equal(out[:, :steps], reference)
    with pytest.raises(ValueError, match="COMPT needs task_ids"):
        model.generate(input_ids=batch["input_ids"], max_new_tokens=2)


# ---------------------------------------------------------------------------------------------
# beyond the paper: routing weights, adding a task, per-group learning rates
# ---------------------------------------------------------------------------------------------


def test_routing_weights_plot(tmp_path):
    model, encoder = _encoder(normalization="sparsemax")
    ax = plot_routing_weights(model)
    assert [t.get_text() for t in ax.get_yticklabels()] == TASKS
    assert len(ax.texts) == 9 and ax.texts[0].get_text() == f"{float(encoder.routing_weights()[0, 0]):.2f}"
    ax.figure.savefig(tmp_path / "routing.png")
    assert (tmp_path / "routing.png").stat().st_size > 1000
    # nothing is cut off: the title and the task names lie inside the figure
    renderer = ax.figure.canvas.get_renderer()
    figure_box = ax.figure.bbox
    for artist in [ax.title, *ax.get_yticklabels()]:
        box = artist.get_window_extent(renderer)
        assert box.x0 >= figure_box.x0 and box.x1 <= figure_box.x1, artist.get_text()


@pytest.mark.parametrize("name, mlp", [("gpt2", None), ("gpt2", 8), ("bert", None)])
def test_added_task_trains_and_old_tasks_stay_bit_for_bit(name, mlp, tmp_path):
    tiny = TINY_MODELS[name]
    model = trained(
        tiny,
        tmp_path,
        steps=5,
        task_ids=(0, 1, 1, 0),
        task_names=TASKS[:2],
        prompt_mlp_bottleneck_size=mlp,
        relaxed_bernoulli=True,
    )
    old_batch = task_batch(tiny, task_ids=(0, 1, 1, 0), seed=4)
    before = logits(model, old_batch)

    add_tasks(model, ["gamma"])
    config = model.peft_config["default"]
    assert config.task_names == TASKS and config.num_frozen_tasks == 2
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        "prompt_encoder.default.private.trainable",
        "prompt_encoder.default.router.trainable",
        "prompt_encoder.default.gates.trainable",
    }
    new_data = ListDataset(task_batch(tiny, task_ids=(2, 2, 2, 2)))
    trainer = make_trainer(
        model, tmp_path / "new", new_data, max_steps=20, remove_unused_columns=False, weight_decay=0.1
    )
    trainer.train()
    losses = train_losses(trainer)
    assert losses[-1] < losses[0]
    model.eval()
    assert torch.equal(logits(model, old_batch), before)

    model.save_pretrained(tmp_path / "extended")
    loaded = PeftModel.from_pretrained(tiny.saved(tmp_path), tmp_path / "extended")
    assert loaded.peft_config["default"].num_frozen_tasks == 2
    torch.testing.assert_close(logits(loaded, old_batch), before, atol=1e-5, rtol=0)


def test_add_tasks_errors(tmp_path):
    tiny = TINY_MODELS["gpt2"]
    model = trained(tiny, tmp_path, steps=1, prompt_mlp_bottleneck_size=8)
    model.save_pretrained(tmp_path / "adapter")
    inference = PeftModel.from_pretrained(tiny.saved(tmp_path), tmp_path / "adapter")
    with pytest.raises(ValueError, match="loaded for inference"):
        add_tasks(inference, ["delta"])
    with pytest.raises(ValueError, match="pass the new tasks' names"):
        add_tasks(model, 1)
    with pytest.raises(ValueError, match="task_names must be unique"):
        add_tasks(model, ["alpha"])
    per_prompt = get_peft_model(tiny.build(), compt_config(tiny, prompt_encoder="per_prompt"))
    with pytest.raises(ValueError, match="does not support prompt_encoder='per_prompt'"):
        add_tasks(per_prompt, ["delta"])


def test_trainer_uses_per_group_learning_rates(tmp_path):
    tiny = TINY_MODELS["bert"]
    model = get_peft_model(tiny.build(), compt_config(tiny))
    encoder = model.prompt_encoder["default"]
    groups = compt_parameter_groups(model, source_lr=0.1, private_lr=0.01, router_lr=0.0)
    assert [g["name"] for g in groups] == ["source", "private", "router", "other"]
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in model.parameters() if p.requires_grad}
    router_before = encoder.router.trainable.detach().clone()
    sources_before = encoder.embedding.weight.detach().clone()
    private_before = encoder.private.trainable.detach().clone()
    optimizer = create_compt_optimizer(model, source_lr=0.1, private_lr=0.01, router_lr=0.0)
    trainer = make_trainer(
        model,
        tmp_path,
        ListDataset(task_batch(tiny)),
        max_steps=1,
        remove_unused_columns=False,
        optimizers=(optimizer, None),
    )
    trainer.train()
    assert getattr(trainer.optimizer, "optimizer", trainer.optimizer) is optimizer  # accelerate may wrap it
    assert torch.equal(encoder.router.trainable, router_before)
    # one Adam step moves each parameter by about its learning rate
    source_step = float((encoder.embedding.weight.detach() - sources_before).abs().max())
    private_step = float((encoder.private.trainable.detach() - private_before).abs().max())
    assert source_step == pytest.approx(0.1, rel=0.05) and private_step == pytest.approx(0.01, rel=0.05)


# ---------------------------------------------------------------------------------------------
# config validation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"task_names": None}, "needs the tasks"),
        ({"task_names": ["a", "a"]}, "must be unique"),
        ({"task_names": "abc"}, "non-empty list of non-empty strings"),
        ({"task_names": ["a", "b"], "num_tasks": 3}, "num_tasks=3 but task_names has 2"),
        ({"task_names": None, "num_tasks": 0}, "num_tasks must be a positive integer"),
        ({"num_source_prompts": 0}, "num_source_prompts must be a positive integer"),
        ({"composition": "product"}, "composition must be one of"),
        ({"composition": "concat", "num_virtual_tokens": 5}, "must be even"),
        ({"normalization": "relu"}, "normalization must be one of"),
        ({"top_k": 4}, r"top_k must be None or an integer in \[1, num_source_prompts=3\]"),
        ({"bernoulli_temperature": 0}, "bernoulli_temperature must be a positive number"),
        ({"bernoulli_min_temperature": 2.0}, "must not exceed bernoulli_temperature"),
        ({"bernoulli_anneal_rate": -1}, "bernoulli_anneal_rate must be a number >= 0"),
        ({"prompt_mlp_bottleneck_size": 0}, "prompt_mlp_bottleneck_size must be None or a positive integer"),
        ({"share": "convex"}, r"share must be one of \('gates', 'sampled_convex'\)"),
        ({"share": "sampled_convex", "private_prompt": False}, "mixes .* set private_prompt=True"),
        ({"share": "sampled_convex", "learn_gates": False}, "learn_gates=False fixes the gates of share='gates'"),
        ({"share_temperature": 0}, "share_temperature must be a positive number"),
        ({"router_sampling": "gumbel"}, "router_sampling must be one of"),
        ({"bernoulli_anneal_schedule": "cosine"}, r"anneal_schedule must be one of \('exponential', 'linear'\)"),
        ({"prompt_encoder": "lstm"}, "prompt_encoder must be one of"),
        ({"prompt_encoder": "shared_mlp"}, "prompt_mlp_bottleneck_size is the width of prompt_encoder='shared_mlp'"),
        ({"prompt_encoder": "per_prompt", "prompt_mlp_bottleneck_size": 8}, "set both or neither"),
        ({"prompt_encoder_hidden_size": 8}, "prompt_encoder_hidden_size is the width of prompt_encoder='per_prompt'"),
        ({"prompt_encoder": "per_prompt", "prompt_encoder_hidden_size": 0}, "hidden_size must be None or a positive"),
        ({"uniform_init_range": -0.5}, "uniform_init_range must be None or a positive number"),
        ({"uniform_init_range": 0.5, "prompt_tuning_init": "SAMPLE_VOCAB"}, "combined with prompt_tuning_init='SAMPLE"),
        ({"num_frozen_tasks": 3}, r"num_frozen_tasks must be an integer in \[0, num_tasks=3\)"),
        ({"private_prompt": "no"}, "private_prompt must be True or False"),
        ({"task_type": "FEATURE_EXTRACTION"}, "ComPT does not support task_type='FEATURE_EXTRACTION'"),
        ({"task_type": "QUESTION_ANS"}, "ComPT does not support task_type='QUESTION_ANS'.*does not pass task_ids"),
    ],
)
def test_config_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        compt_config(TINY_MODELS["gpt2"], **overrides)


def test_trainer_evaluate_with_task_ids(tmp_path):
    tiny = TINY_MODELS["bert"]
    model = get_peft_model(tiny.build(), compt_config(tiny))
    data = ListDataset(task_batch(tiny, task_ids=(2, 0, 1, 1)))
    trainer = make_trainer(model, tmp_path, data, max_steps=4, remove_unused_columns=False)
    trainer.train()
    predictions = trainer.predict(data)
    model.eval()
    expected = logits(model, task_batch(tiny, task_ids=(2, 0, 1, 1)))
    torch.testing.assert_close(torch.as_tensor(predictions.predictions), expected, atol=1e-5, rtol=0)
