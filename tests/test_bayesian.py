"""Bayesian multi-task prompt transfer: SVGD on analytic targets, then both stages on tiny models."""

from __future__ import annotations

import json
import math

import datasets
import pytest
import torch
from conftest import TINY_MODELS, ListDataset, logits, make_batch, make_trainer, stack_collator, train_losses
from peft import PeftConfig, PeftModel, PromptTuningConfig, get_peft_model
from safetensors.torch import load_file, save_file

from peft_prompt_transfer import _compat, combine_tasks, export_prompt_tuning
from peft_prompt_transfer.bayesian import (
    BayesianPromptConfig,
    ParticleReplicationCollator,
    assign_particles,
    bayesian_parameter_groups,
    ensemble_predict,
    expand_for_particles,
    load_posterior,
    median_bandwidth,
    rbf_kernel,
    register_pre_step_gradient_transform,
    stein_direction,
    svgd_gradient,
)

# idempotent; the package __init__ will do this once the method is registered there

N_TOKENS = 4


def source_config(tiny, **overrides) -> BayesianPromptConfig:
    kwargs = dict(task_type=tiny.task_type, num_virtual_tokens=N_TOKENS, num_particles=3)
    kwargs.update(overrides)
    return BayesianPromptConfig(**kwargs)


def target_config(tiny, posterior, **overrides) -> BayesianPromptConfig:
    kwargs = dict(task_type=tiny.task_type, num_virtual_tokens=N_TOKENS, stage="target", posterior=str(posterior))
    kwargs.update(overrides)
    return BayesianPromptConfig(**kwargs)


def saved_posterior(tiny, directory, **overrides):
    """An (untrained) source-stage model saved to `directory`; returns the model."""
    torch.manual_seed(1)
    model = get_peft_model(tiny.build(), source_config(tiny, **overrides))
    model.save_pretrained(directory)
    return model


def plain_prompt_config(tiny) -> PromptTuningConfig:
    """peft's PROMPT_TUNING with our prompt's shape (on the encoder only, as export_prompt_tuning writes it)."""
    return _compat.prompt_tuning_config_like(source_config(tiny))


def pairwise_distances(particles: torch.Tensor) -> torch.Tensor:
    return torch.pdist(particles.detach().flatten(1))


# ---------------------------------------------------------------------------------------------
# SVGD on analytic targets (pure torch)
# ---------------------------------------------------------------------------------------------


def run_svgd(log_prob, particles: torch.Tensor, steps: int, lr: float, **svgd_kwargs) -> torch.Tensor:
    """Move particles with a stock torch optimizer whose gradient is transformed before each step."""
    x = torch.nn.Parameter(particles.clone())
    register_pre_step_gradient_transform(x, lambda grad: svgd_gradient(x, grad, **svgd_kwargs))
    optimizer = torch.optim.Adagrad([x], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        (-log_prob(x).mean()).backward()  # the mean over particles, as a minibatch loss shared out among them
        optimizer.step()
    return x.detach()


def test_svgd_matches_a_2d_gaussian():
    mean = torch.tensor([1.0, -2.0], dtype=torch.float64)
    cov = torch.tensor([[1.0, 0.6], [0.6, 2.0]], dtype=torch.float64)
    target = torch.distributions.MultivariateNormal(mean, cov)
    torch.manual_seed(0)
    start = 0.3 * torch.randn(200, 2, dtype=torch.float64) + torch.tensor([-2.0, 2.0], dtype=torch.float64)
    x = run_svgd(target.log_prob, start, steps=600, lr=0.3)
    torch.testing.assert_close(x.mean(0), mean, atol=0.1, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), cov, atol=0.25, rtol=0)


def test_svgd_covers_both_modes_of_a_mixture():
    modes = torch.tensor([[-3.0, 0.0], [3.0, 0.0]], dtype=torch.float64)
    mixture = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(torch.tensor([0.5, 0.5], dtype=torch.float64)),
        torch.distributions.Independent(torch.distributions.Normal(modes, 0.7), 1),
    )
    torch.manual_seed(0)
    x = run_svgd(mixture.log_prob, torch.randn(100, 2, dtype=torch.float64), steps=500, lr=0.3)
    near = torch.cdist(x, modes).argmin(dim=1)
    left = (near == 0).float().mean().item()
    assert 0.3 < left < 0.7, left  # about half the particles on each mode
    assert torch.cdist(x, modes).min(dim=1).values.max() < 2.5  # none stranded between the modes
    for k in range(2):  # and the repulsion spreads them over each mode (std 0.7) instead of stacking them on it
        assert x[near == k, 1].std() > 0.4


def test_one_particle_is_gradient_descent_on_the_log_posterior():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 5, requires_grad=True)
    loss = (x.sin() * torch.arange(15.0).view(1, 3, 5)).sum()
    grad = torch.autograd.grad(loss, x, retain_graph=True)[0]
    expected = torch.autograd.grad(2.5 * loss + x.pow(2).sum() / (2 * 4.0**2), x)[0]
    torch.testing.assert_close(svgd_gradient(x, grad, likelihood_scale=2.5, prior_scale=4.0), expected)


def test_stein_direction_matches_autograd_of_the_kernel():
    torch.manual_seed(0)
    x = torch.randn(5, 7, dtype=torch.float64)
    scores = torch.randn(5, 7, dtype=torch.float64)
    h = 3.0
    expected = torch.zeros_like(x)
    for i in range(5):
        for j in range(5):
            xj = x[j].clone().requires_grad_(True)
            k = torch.exp(-(xj - x[i]).pow(2).sum() / h)
            (grad_k,) = torch.autograd.grad(k, xj)
            expected[i] += k.detach() * scores[j] + grad_k
    torch.testing.assert_close(stein_direction(x, scores, bandwidth=h), expected / 5)


def test_median_heuristic_bandwidth():
    x = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])  # squared distances 9, 16, 25
    kernel, h = rbf_kernel(x)
    torch.testing.assert_close(h, torch.tensor(16.0 / math.log(4)))
    torch.testing.assert_close(kernel[0, 1], torch.exp(torch.tensor(-9.0) / h))
    assert torch.equal(kernel.diagonal(), torch.ones(3))


@pytest.mark.parametrize("coincide", [4, 3])
def test_identical_particles_give_no_nan(coincide):
    """Zero distances make the median 0: the bandwidth must stay positive and the update finite."""
    torch.manual_seed(0)
    x = torch.randn(1, 6).repeat(4, 1)
    x[coincide:] += 1.0  # `coincide` of the 4 particles are identical
    grad = torch.randn(4, 6)
    assert median_bandwidth(torch.cdist(x, x).pow(2)) > 0
    out = svgd_gradient(x, grad, prior_scale=10.0)
    assert torch.isfinite(out).all()
    if coincide == 4:  # every kernel value is 1 and there is no repulsion: each particle gets the mean score
        scores = -4 * grad - x / 100.0
        torch.testing.assert_close(out, -scores.mean(0, keepdim=True).expand(4, -1))


def test_transform_runs_once_per_optimizer_step_even_through_a_wrapper_optimizer():
    class Wrapper(torch.optim.Optimizer):  # e.g. a lookahead-style optimizer that steps an inner one
        def __init__(self, inner):
            super().__init__(inner.param_groups, {})
            self.inner = inner

        def step(self, closure=None):
            self.inner.step()

    x = torch.nn.Parameter(torch.zeros(3))
    calls = []
    register_pre_step_gradient_transform(x, lambda grad: calls.append(1) or 2 * grad)
    optimizer = Wrapper(torch.optim.SGD([x], lr=1.0))
    x.sum().backward()
    optimizer.step()
    assert len(calls) == 1 and torch.equal(x.detach(), torch.full((3,), -2.0))
    optimizer.zero_grad()
    x.sum().backward()
    optimizer.step()  # a new gradient is transformed again
    assert len(calls) == 2 and torch.equal(x.detach(), torch.full((3,), -4.0))


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"stage": "pretrain"}, "stage must be one of"),
        ({"num_particles": 0}, "num_particles must be a positive integer"),
        ({"num_particles": True}, "num_particles must be a positive integer"),
        ({"kernel_bandwidth": "mean"}, "kernel_bandwidth must be 'median'"),
        ({"kernel_bandwidth": -1.0}, "kernel_bandwidth must be 'median'"),
        ({"prior_scale": 0}, "prior_scale must be a positive finite number"),
        ({"prior_scale": float("inf")}, "prior_scale must be a positive finite number"),
        ({"likelihood_scale": "big"}, "likelihood_scale must be a positive finite number"),
        ({"particle_assignment": "random"}, "particle_assignment must be one of"),
        ({"source_tasks": ["a", "a"]}, "source_tasks must be a non-empty list of distinct task names"),
        ({"source_tasks": "ab"}, "source_tasks must be a non-empty list"),
        ({"posterior": "dir"}, r"\['posterior'\] is not used with stage='source'"),
        ({"regularization_weight": 0.1}, r"\['regularization_weight'\] is not used with stage='source'"),
        (
            {
                "prompt_tuning_init": "TEXT",
                "prompt_tuning_init_text": "a",
                "tokenizer_name_or_path": "t",
                "particle_assignment": "replicated",
            },
            "particles would never separate",
        ),
        ({"stage": "target"}, "stage='target' needs posterior"),
        (
            {"stage": "target", "posterior": "p", "num_particles": 4},
            r"\['num_particles'\] is not used with stage='target'",
        ),
        ({"stage": "target", "posterior": "p", "target_init": "particle:x"}, "target_init must be 'mean', 'sample'"),
        ({"stage": "target", "posterior": "p", "target_prompt": "lowrank"}, "target_prompt must be one of"),
        ({"stage": "target", "posterior": "p", "decomposition_rank": 0}, "decomposition_rank must be a positive"),
        ({"stage": "target", "posterior": "p", "target_init_seed": 1.5}, "target_init_seed must be None or an int"),
        ({"target_init_seed": 0}, r"\['target_init_seed'\] is not used with stage='source'"),
        ({"stage": "target", "posterior": "p", "target_init": "median"}, "target_init must be"),
        ({"stage": "target", "posterior": "p", "regularization_weight": -1}, "regularization_weight must be a finite"),
        ({"stage": "target", "posterior": "p", "prompt_tuning_init": "SAMPLE_VOCAB"}, "initialised from the posterior"),
        ({"num_virtual_tokens": 0}, "num_virtual_tokens must be a positive integer"),
    ],
)
def test_config_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        BayesianPromptConfig(**{"task_type": "CAUSAL_LM", "num_virtual_tokens": 4, **overrides})


def test_config_defaults_and_round_trip(tmp_path):
    source = BayesianPromptConfig(task_type="SEQ_CLS", num_virtual_tokens=3, source_tasks=("rte", "cb"))
    assert (source.num_particles, source.kernel_bandwidth, source.particle_assignment) == (4, "median", "sharded")
    assert source.source_tasks == ["rte", "cb"] and source.target_init is None and source.regularization_weight is None
    target = BayesianPromptConfig(task_type="SEQ_CLS", num_virtual_tokens=3, stage="target", posterior=tmp_path)
    assert target.posterior == str(tmp_path) and target.target_init == "mean" and target.num_particles is None
    assert (target.target_prompt, target.decomposition_rank, target.target_init_seed) == ("plain", 1, None)
    for config in (source, target):
        config.save_pretrained(tmp_path / config.stage)
        loaded = PeftConfig.from_pretrained(tmp_path / config.stage)
        assert isinstance(loaded, BayesianPromptConfig) and loaded.to_dict() == config.to_dict()


# ---------------------------------------------------------------------------------------------
# source stage
# ---------------------------------------------------------------------------------------------


def test_sharded_forward_gives_row_b_particle_b_mod_m():
    tiny = TINY_MODELS["gpt2"]
    model = get_peft_model(tiny.build(), source_config(tiny))
    particles = model.prompt_encoder["default"].particles
    prompts = model.get_prompt(batch_size=7)
    assert assign_particles(7, 3).tolist() == [0, 1, 2, 0, 1, 2, 0]
    for b in range(7):
        assert torch.equal(prompts[b], particles[b % 3])
    assert pairwise_distances(particles).min() > 0  # each particle drew its own initial prompt


def test_uneven_batches_weight_every_particle_equally():
    """With 5 rows and 3 particles, M * dLoss/dP_j is still the mean over particle j's own rows."""
    tiny = TINY_MODELS["gpt2"]
    encoder = get_peft_model(tiny.build(), source_config(tiny)).prompt_encoder["default"]
    weights = torch.randn(5, N_TOKENS, 32)
    prompts = encoder(5)
    (prompts * weights).sum(dim=(1, 2)).mean().backward()  # a per-row loss, averaged over the batch
    rows = assign_particles(5, 3)
    for j in range(3):
        torch.testing.assert_close(3 * encoder.particles.grad[j], weights[rows == j].mean(0))


def two_task_dataset(tiny, size: int = 8):
    """Two tasks on a tiny causal LM: continue with token 5, or with token 6."""
    tasks = {}
    for name, token, seed in (("fives", 5, 0), ("sixes", 6, 1)):
        batch = make_batch(tiny, batch_size=size, seed=seed)
        batch["labels"] = torch.full_like(batch["input_ids"], token).masked_fill(batch["attention_mask"] == 0, -100)
        tasks[name] = datasets.Dataset.from_dict({k: v.tolist() for k, v in batch.items()})
    return combine_tasks(tasks, sampling="equal", seed=0).with_format("torch")


def test_source_stage_with_the_trainer_on_mixed_tasks(tmp_path):
    tiny = TINY_MODELS["gpt2"]
    torch.manual_seed(0)
    config = source_config(tiny, num_particles=4, source_tasks=["fives", "sixes"], prompt_tuning_init="SAMPLE_VOCAB")
    model = get_peft_model(tiny.build(), config)
    particles = model.prompt_encoder["default"].particles
    start = particles.detach().clone()
    data = two_task_dataset(tiny)
    assert set(data.with_format(None)["task_ids"]) == {0, 1}
    trainer = make_trainer(
        model, tmp_path, data, max_steps=30, per_device_train_batch_size=8, remove_unused_columns=False
    )
    trainer.train()
    losses = train_losses(trainer)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
    assert not torch.equal(particles.detach(), start)
    # the particles stay distinct: the repulsion keeps them at least as far apart as they started
    assert pairwise_distances(particles).min() > 0.5 * pairwise_distances(start).min()


def test_task_ids_are_checked_against_source_tasks():
    tiny = TINY_MODELS["gpt2"]
    batch = make_batch(tiny)
    unnamed = get_peft_model(tiny.build(), source_config(tiny))
    with pytest.raises(ValueError, match="no source_tasks to check them against"):
        unnamed(**batch, task_ids=torch.zeros(4, dtype=torch.long))
    named = get_peft_model(tiny.build(), source_config(tiny, source_tasks=["a", "b"]))
    with pytest.raises(ValueError, match=r"task_ids \[2\] are out of range"):
        named(**batch, task_ids=torch.tensor([0, 1, 2, 0]))
    named(**batch, task_ids=torch.tensor([0, 1, 1, 0]))  # valid ids are accepted (and change nothing)


def test_gradient_accumulation_gives_the_same_update_as_one_big_batch(tmp_path):
    # GPT-2: the Trainer normalises its loss by the token count of the whole accumulated batch (the tiny BERT's
    # classification loss ignores that count, so its accumulated gradient is twice the big batch's, without any prompt)
    tiny = TINY_MODELS["gpt2"]
    data = ListDataset(make_batch(tiny, batch_size=8))

    def one_step(batch_size, accumulation):
        base = tiny.build()
        for module in base.modules():  # dropout masks would differ between the two batch layouts
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        torch.manual_seed(0)
        # a strong prior, so that counting the prior and repulsion once per micro-batch would show
        model = get_peft_model(base, source_config(tiny, num_particles=4, prior_scale=0.5))
        start = model.prompt_encoder["default"].particles.detach().clone()
        trainer = make_trainer(
            model,
            tmp_path / f"{batch_size}",
            data,
            max_steps=1,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            optim="sgd",
            learning_rate=0.5,
            max_grad_norm=0.0,
        )
        trainer.train()
        return start, model.prompt_encoder["default"].particles.detach()

    start, big = one_step(8, 1)
    start_acc, accumulated = one_step(4, 2)
    assert torch.equal(start, start_acc)
    torch.testing.assert_close(accumulated, big, atol=1e-6, rtol=1e-5)
    assert (big - start).abs().max() > 0.1  # the step moved the particles


def test_replicated_mode_trains_every_particle_on_every_example(tmp_path):
    tiny = TINY_MODELS["bert"]
    batch = make_batch(tiny)
    expanded = expand_for_particles(batch, 3)
    assert expanded["input_ids"].shape[0] == 12 and torch.equal(expanded["labels"][3:6], batch["labels"][1].repeat(3))
    model = get_peft_model(tiny.build(), source_config(tiny, particle_assignment="replicated"))
    encoder = model.prompt_encoder["default"]
    start = encoder.particles.detach().clone()
    with pytest.raises(ValueError, match=r"data_collator=ParticleReplicationCollator\(3, your_collator\)"):
        model(**batch)
    # every particle's gradient is the gradient of its own mean loss over the whole batch (divided by M)
    model(**expanded).loss.backward()
    for m in range(3):
        single = get_peft_model(tiny.build(), plain_prompt_config(tiny))
        with torch.no_grad():
            single.prompt_encoder["default"].embedding.weight.copy_(start[m])
        single(**batch).loss.backward()
        torch.testing.assert_close(
            3 * encoder.particles.grad[m], single.prompt_encoder["default"].embedding.weight.grad
        )
    encoder.particles.grad = None
    trainer = make_trainer(model, tmp_path, ListDataset(batch, repeat=2), max_steps=10)
    trainer.data_collator = ParticleReplicationCollator(3, stack_collator)
    trainer.train()
    losses = train_losses(trainer)
    assert losses[-1] < losses[0], losses
    assert all((encoder.particles[m] - start[m]).abs().max() > 0 for m in range(3))


def test_one_particle_works_end_to_end(tmp_path):
    tiny = TINY_MODELS["gpt2"]
    model = get_peft_model(tiny.build(), source_config(tiny, num_particles=1))
    trainer = make_trainer(model, tmp_path, ListDataset(make_batch(tiny)), max_steps=15)
    trainer.train()
    losses = train_losses(trainer)
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3]), losses
    model.save_pretrained(tmp_path / "posterior")
    assert load_file(tmp_path / "posterior" / "adapter_model.safetensors")["particles"].shape == (1, N_TOKENS, 32)
    target = get_peft_model(tiny.build(), target_config(tiny, tmp_path / "posterior", target_init="sample"))
    # one particle: the posterior is a point, so a sample is the particle itself
    torch.testing.assert_close(
        target.prompt_encoder["default"].embedding.weight, model.prompt_encoder["default"].particles[0]
    )
    prediction = ensemble_predict(model.eval(), make_batch(tiny))
    assert torch.allclose(prediction.mutual_information, torch.zeros(4), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# the posterior adapter
# ---------------------------------------------------------------------------------------------


def test_posterior_saves_and_loads_exactly(tmp_path):
    tiny = TINY_MODELS["gpt2"]
    model = get_peft_model(tiny.saved(tmp_path), source_config(tiny, num_particles=5, source_tasks=["fives", "sixes"]))
    trainer = make_trainer(model, tmp_path / "train", two_task_dataset(tiny), max_steps=3, remove_unused_columns=False)
    trainer.train()
    particles = model.prompt_encoder["default"].particles.detach()
    model.save_pretrained(tmp_path / "posterior")

    weights = load_file(tmp_path / "posterior" / "adapter_model.safetensors")
    assert set(weights) == {"particles", "prompt_embeddings"}
    assert weights["particles"].shape == (5, N_TOKENS, 32) and torch.equal(weights["particles"], particles)
    torch.testing.assert_close(weights["prompt_embeddings"], particles.mean(0))
    saved_config = json.loads((tmp_path / "posterior" / "adapter_config.json").read_text())
    assert saved_config["num_particles"] == 5 and saved_config["kernel_bandwidth"] == "median"
    assert saved_config["source_tasks"] == ["fives", "sixes"] and saved_config["stage"] == "source"

    loaded = PeftModel.from_pretrained(tiny.saved(tmp_path), tmp_path / "posterior")
    encoder = loaded.prompt_encoder["default"]
    assert torch.equal(encoder.particles, particles)
    torch.testing.assert_close(encoder.mean(), particles.mean(0))
    posterior = load_posterior(tmp_path / "posterior")
    assert torch.equal(posterior.particles, particles) and posterior.config.source_tasks == ["fives", "sixes"]


@pytest.mark.parametrize("name", ["gpt2", "bert", "t5"])
def test_ensemble_prediction_averages_the_particles(name):
    tiny = TINY_MODELS[name]
    torch.manual_seed(0)
    model = get_peft_model(tiny.build(), source_config(tiny, num_particles=3)).eval()
    particles = model.prompt_encoder["default"].particles.detach()
    batch = make_batch(tiny, batch_size=3, seed=4)
    if tiny.kind == "causal":
        batch["attention_mask"][1, -2:] = 0  # a right-padded row: its next token follows position -3
    prediction = ensemble_predict(model, batch)

    last = {"causal": [-1, -3, -1], "cls": None, "seq2seq": [-1, -1, -1]}[tiny.kind]
    separate = []
    for m in range(3):  # the reference: one plain prompt-tuning model per particle, one forward each
        single = get_peft_model(tiny.build(), plain_prompt_config(tiny))
        with torch.no_grad():
            single.prompt_encoder["default"].embedding.weight.copy_(particles[m])
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        if tiny.kind == "seq2seq":
            inputs["decoder_input_ids"] = torch.full((3, 1), tiny.build().config.decoder_start_token_id)
        with torch.no_grad():
            out = single.eval()(**inputs).logits
        out = out if last is None else out[torch.arange(3), torch.tensor(last)]
        separate.append(out.softmax(-1))
    separate = torch.stack(separate, dim=1)
    classes = 2 if tiny.kind == "cls" else 64
    assert prediction.particle_probs.shape == (3, 3, classes) and prediction.probs.shape == (3, classes)
    torch.testing.assert_close(prediction.particle_probs, separate, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(prediction.probs, separate.mean(1), atol=1e-5, rtol=1e-4)
    entropy = -(prediction.probs * prediction.probs.log()).sum(-1)
    torch.testing.assert_close(prediction.entropy, entropy)
    expected_mi = entropy + (separate * separate.log()).sum(-1).mean(1)
    torch.testing.assert_close(prediction.mutual_information, expected_mi, atol=1e-5, rtol=1e-4)
    assert (prediction.mutual_information > 0).all()  # the particles disagree


def _rows(batch: dict, start: int, stop: int) -> dict:
    return {key: value[start:stop] for key, value in batch.items()}


@pytest.mark.parametrize("name", ["bert", "gpt2", "t5"])
def test_a_loaded_posterior_predicts_with_its_mean_whatever_the_batch(name, tmp_path):
    """At inference every row gets the posterior mean: repeated rows agree, and neither the batch size nor a row's
    position changes its logits (in training, row b would use particle b mod M)."""
    tiny = TINY_MODELS[name]
    saved_posterior(tiny, tmp_path / "posterior")
    model = PeftModel.from_pretrained(tiny.saved(tmp_path), tmp_path / "posterior").eval()
    batch = make_batch(tiny, batch_size=8, seed=5)
    repeated = logits(model, {key: value[:1].repeat_interleave(4, dim=0) for key, value in batch.items()})
    for row in repeated[1:]:
        torch.testing.assert_close(row, repeated[0], atol=1e-6, rtol=0)
    full = logits(model, batch)
    for size in (1, 3):
        in_pieces = torch.cat([logits(model, _rows(batch, start, start + size)) for start in range(0, 8, size)])
        torch.testing.assert_close(in_pieces, full, atol=1e-5, rtol=1e-5)
    # ... and they are the logits of the exported posterior mean, as plain PROMPT_TUNING
    export_prompt_tuning(model, tmp_path / "mean")
    torch.testing.assert_close(logits(PeftModel.from_pretrained(tiny.build(), tmp_path / "mean"), batch), full)
    # the particles still differ, and ensemble_predict still shows every example to each of them
    assert (ensemble_predict(model, _rows(batch, 0, 2)).mutual_information > 0).all()


def test_trainer_evaluate_of_a_posterior_does_not_depend_on_the_eval_batch_size(tmp_path):
    tiny = TINY_MODELS["bert"]
    saved_posterior(tiny, tmp_path / "posterior")
    model = PeftModel.from_pretrained(tiny.saved(tmp_path), tmp_path / "posterior")
    data = ListDataset(make_batch(tiny, batch_size=8, seed=6))
    losses = [
        make_trainer(
            model, tmp_path / f"eval-{size}", data, eval_dataset=data, per_device_eval_batch_size=size
        ).evaluate()["eval_loss"]
        for size in (1, 3, 8)
    ]
    assert losses[0] == pytest.approx(losses[1], abs=1e-6) and losses[0] == pytest.approx(losses[2], abs=1e-6)


def test_ensemble_prediction_needs_a_posterior(tmp_path):
    tiny = TINY_MODELS["bert"]
    saved_posterior(tiny, tmp_path / "posterior")
    target = get_peft_model(tiny.build(), target_config(tiny, tmp_path / "posterior"))
    with pytest.raises(ValueError, match="needs a source-stage BAYESIAN_PROMPT_TUNING adapter.*of stage 'target'"):
        ensemble_predict(target, make_batch(tiny))


# ---------------------------------------------------------------------------------------------
# target stage
# ---------------------------------------------------------------------------------------------


def test_target_initialisation_from_the_posterior(tmp_path):
    tiny = TINY_MODELS["gpt2"]
    particles = saved_posterior(tiny, tmp_path / "posterior").prompt_encoder["default"].particles.detach()

    def initial(**overrides):
        model = get_peft_model(tiny.build(), target_config(tiny, tmp_path / "posterior", **overrides))
        encoder = model.prompt_encoder["default"]
        torch.testing.assert_close(encoder.mean(), particles.mean(0))  # the regulariser's anchor
        return encoder.embedding.weight.detach()

    torch.testing.assert_close(initial(), particles.mean(0))
    assert torch.equal(initial(target_init="particle:2"), particles[2])
    # a sample: mean + std * z with z standard normal entries, a different draw each time
    z = (initial(target_init="sample") - particles.mean(0)) / particles.std(0)
    assert abs(z.mean()) < 0.3 and 0.75 < z.std() < 1.25
    with pytest.raises(
        ValueError, match=r"target_init='particle:3', but the posterior .* has 3 particles \(indices 0..2\)"
    ):
        initial(target_init="particle:3")


def test_random_target_inits_are_seeded(tmp_path):
    tiny = TINY_MODELS["gpt2"]
    particles = saved_posterior(tiny, tmp_path / "posterior").prompt_encoder["default"].particles.detach()

    def initial(**overrides):
        model = get_peft_model(tiny.build(), target_config(tiny, tmp_path / "posterior", **overrides))
        return model.prompt_encoder["default"].embedding.weight.detach()

    drawn = [initial(target_init="particle:random", target_init_seed=seed) for seed in range(8)]
    indices = [next(k for k in range(3) if torch.equal(d, particles[k])) for d in drawn]  # each draw is a particle
    assert indices == [int(torch.randint(3, (), generator=torch.Generator().manual_seed(s))) for s in range(8)]
    assert len(set(indices)) > 1
    assert torch.equal(
        initial(target_init="sample", target_init_seed=5), initial(target_init="sample", target_init_seed=5)
    )
    assert not torch.equal(
        initial(target_init="sample", target_init_seed=5), initial(target_init="sample", target_init_seed=6)
    )


def decomposed_target(tiny, posterior, **overrides):
    return get_peft_model(tiny.build(), target_config(tiny, posterior, target_prompt="decomposed", **overrides))


def test_decomposed_target_starts_as_its_initial_prompt(tmp_path):
    tiny = TINY_MODELS["gpt2"]
    particles = saved_posterior(tiny, tmp_path / "posterior").prompt_encoder["default"].particles.detach()
    for rank in (1, 3):
        encoder = decomposed_target(tiny, tmp_path / "posterior", decomposition_rank=rank).prompt_encoder["default"]
        token_dim = particles.shape[-1]
        assert encoder.task_cols.shape == (N_TOKENS, rank) and encoder.task_rows.shape == (rank, token_dim)
        torch.testing.assert_close(encoder.task_cols @ encoder.task_rows, torch.ones(N_TOKENS, token_dim))
        torch.testing.assert_close(encoder(batch_size=2)[1], particles.mean(0))
        torch.testing.assert_close(encoder.inference_prompt(), particles.mean(0))
    assert encoder.task_cols[:, 1:].abs().max() > 0  # the extra ranks differ, so they get different gradients


def test_decomposed_regulariser_gradients_are_those_of_half_lambda_squared_distance_of_the_product(tmp_path):
    tiny = TINY_MODELS["gpt2"]
    posterior = saved_posterior(tiny, tmp_path / "posterior").prompt_encoder["default"].particles.detach()
    model = decomposed_target(
        tiny, tmp_path / "posterior", target_init="particle:0", regularization_weight=0.3, decomposition_rank=2
    )
    encoder = model.prompt_encoder["default"]
    with torch.no_grad():  # move U and V off their start, so that every term of the gradient shows
        encoder.task_cols.add_(0.1 * torch.randn(encoder.task_cols.shape))
        encoder.task_rows.add_(0.1 * torch.randn(encoder.task_rows.shape))
    parameters = [encoder.embedding.weight, encoder.task_cols, encoder.task_rows]
    batch = make_batch(tiny)
    # the reference, by hand: autograd of loss + 0.3/2 ||S ⊙ (U V) - mean||^2
    shared, cols, rows = (p.detach().clone().requires_grad_() for p in parameters)
    plain = get_peft_model(tiny.build(), plain_prompt_config(tiny))
    plain.prompt_encoder["default"].embedding.weight.requires_grad_(False)
    prompt = shared * (cols @ rows)
    plain.prompt_encoder["default"].embedding.forward = lambda indices: prompt.unsqueeze(0).expand(len(indices), -1, -1)
    total = plain(**batch).loss + 0.3 / 2 * (prompt - posterior.mean(0)).pow(2).sum()
    expected = torch.autograd.grad(total, [shared, cols, rows])

    before = [p.detach().clone() for p in parameters]
    optimizer = torch.optim.SGD(parameters, lr=1.0)
    model(**batch).loss.backward()
    optimizer.step()  # the regulariser's gradients are added right before the step
    for old, new, grad in zip(before, parameters, expected):
        torch.testing.assert_close(old - new.detach(), grad, atol=1e-6, rtol=1e-5)


def test_bayesian_parameter_groups_give_each_part_its_learning_rate(tmp_path):
    tiny = TINY_MODELS["bert"]
    saved_posterior(tiny, tmp_path / "posterior")
    model = decomposed_target(tiny, tmp_path / "posterior")
    encoder = model.prompt_encoder["default"]
    groups = {g["name"]: g for g in bayesian_parameter_groups(model, shared_lr=0.3, task_lr=1e-3, other_lr=1e-2)}
    assert {n: g["lr"] for n, g in groups.items()} == {"shared": 0.3, "task": 1e-3, "other": 1e-2}
    assert groups["shared"]["params"] == [encoder.embedding.weight]
    assert groups["task"]["params"] == [encoder.task_cols, encoder.task_rows]
    assert groups["other"]["params"] and all(
        "classifier" in n
        for n, p in model.named_parameters()
        if p.requires_grad and any(p is q for q in groups["other"]["params"])
    )
    with pytest.raises(ValueError, match="needs a BayesianPromptConfig adapter"):
        bayesian_parameter_groups(get_peft_model(tiny.build(), plain_prompt_config(tiny)), 0.1, 0.1)


def test_regulariser_gradient_is_that_of_half_lambda_squared_distance(tmp_path):
    tiny = TINY_MODELS["gpt2"]
    posterior = saved_posterior(tiny, tmp_path / "posterior").prompt_encoder["default"].particles.detach()
    model = get_peft_model(
        tiny.build(), target_config(tiny, tmp_path / "posterior", target_init="particle:0", regularization_weight=0.3)
    )
    prompt = model.prompt_encoder["default"].embedding.weight
    batch = make_batch(tiny)
    # the reference: autograd of loss + 0.3/2 ||P - mean||^2 on a plain prompt-tuning model with the same prompt
    plain = get_peft_model(tiny.build(), plain_prompt_config(tiny))
    reference = plain.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        reference.copy_(prompt)
    total = plain(**batch).loss + 0.3 / 2 * (reference - posterior.mean(0)).pow(2).sum()
    (expected,) = torch.autograd.grad(total, reference)

    before = prompt.detach().clone()
    optimizer = torch.optim.SGD([prompt], lr=1.0)
    model(**batch).loss.backward()
    optimizer.step()  # the regulariser's gradient is added right before the step
    torch.testing.assert_close(before - prompt.detach(), expected, atol=1e-6, rtol=1e-5)
    assert (before - posterior.mean(0)).abs().max() > 0.1  # particle 0 is away from the mean: the term is not zero


@pytest.mark.parametrize(
    "name, target_prompt", [("gpt2", "plain"), ("t5", "plain"), ("bert", "plain"), ("gpt2", "decomposed")]
)
def test_target_training_save_load_and_export(name, target_prompt, tmp_path):
    tiny = TINY_MODELS[name]
    saved_posterior(tiny, tmp_path / "posterior")
    model = get_peft_model(
        tiny.saved(tmp_path), target_config(tiny, tmp_path / "posterior", target_prompt=target_prompt)
    )
    trainer = make_trainer(model, tmp_path / "train", ListDataset(make_batch(tiny)), max_steps=15)
    trainer.train()
    losses = train_losses(trainer)
    assert sum(losses[-3:]) < 0.95 * sum(losses[:3]), losses
    model.eval()
    batch = make_batch(tiny, seed=3)
    expected = logits(model, batch)

    model.save_pretrained(tmp_path / "target")
    saved_config = json.loads((tmp_path / "target" / "adapter_config.json").read_text())
    assert saved_config["posterior"] == str(tmp_path / "posterior") and saved_config["stage"] == "target"
    assert set(load_file(tmp_path / "target" / "adapter_model.safetensors")) >= {"prompt_embeddings", "posterior_mean"}
    loaded = PeftModel.from_pretrained(tiny.saved(tmp_path), tmp_path / "target")
    torch.testing.assert_close(logits(loaded, batch), expected, atol=1e-5, rtol=0)

    export_prompt_tuning(model, tmp_path / "exported")
    assert PeftConfig.from_pretrained(tmp_path / "exported").peft_type == "PROMPT_TUNING"
    exported = PeftModel.from_pretrained(tiny.saved(tmp_path), tmp_path / "exported")
    torch.testing.assert_close(logits(exported, batch), expected, atol=1e-5, rtol=0)

    trainable = PeftModel.from_pretrained(tiny.saved(tmp_path), tmp_path / "target", is_trainable=True).eval()
    for key, value in model.prompt_encoder["default"].state_dict().items():
        torch.testing.assert_close(trainable.prompt_encoder["default"].state_dict()[key], value, atol=0, rtol=0)
    torch.testing.assert_close(logits(trainable, batch), expected, atol=1e-5, rtol=0)


def test_a_plain_target_does_not_load_as_a_decomposed_one(tmp_path):
    tiny = TINY_MODELS["gpt2"]
    saved_posterior(tiny, tmp_path / "posterior")
    get_peft_model(tiny.build(), target_config(tiny, tmp_path / "posterior")).save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="target_prompt='decomposed', but the adapter weights have no"):
        decomposed_target(tiny, tmp_path / "posterior").load_adapter(tmp_path / "plain", "default", is_trainable=True)


def test_loading_a_target_for_inference_does_not_need_its_posterior(tmp_path):
    tiny = TINY_MODELS["gpt2"]
    saved_posterior(tiny, tmp_path / "posterior")
    model = get_peft_model(tiny.build(), target_config(tiny, tmp_path / "posterior")).eval()
    model.save_pretrained(tmp_path / "target")
    (tmp_path / "posterior" / "adapter_model.safetensors").unlink()
    loaded = PeftModel.from_pretrained(tiny.build(), tmp_path / "target")
    batch = make_batch(tiny)
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), atol=1e-5, rtol=0)
    config = PeftConfig.from_pretrained(tmp_path / "target")
    config.inference_mode = False
    with pytest.raises(FileNotFoundError, match="has no adapter_model.safetensors"):  # training does need it
        get_peft_model(tiny.build(), config)


def test_source_posterior_exports_its_mean(tmp_path):
    tiny = TINY_MODELS["t5"]
    model = get_peft_model(tiny.build(), source_config(tiny)).eval()
    export_prompt_tuning(model, tmp_path / "exported")
    exported = PeftModel.from_pretrained(tiny.build(), tmp_path / "exported")
    torch.testing.assert_close(
        exported.prompt_encoder["default"].embedding.weight, model.prompt_encoder["default"].particles.mean(0)
    )


@pytest.mark.parametrize("stage", ["source", "target", "decomposed target"])
def test_resume_from_checkpoint_matches_uninterrupted_training(stage, tmp_path):
    tiny = TINY_MODELS["gpt2"]
    if stage != "source":
        saved_posterior(tiny, tmp_path / "posterior")
    data = ListDataset(make_batch(tiny), repeat=4)
    # the decomposed target: its own learning rates, under a schedule and gradient accumulation
    accumulation = 2 if stage == "decomposed target" else 1
    overrides = dict(
        max_steps=8,
        save_strategy="steps",
        save_steps=4,
        per_device_train_batch_size=4 // accumulation,
        gradient_accumulation_steps=accumulation,
        lr_scheduler_type="linear",
        warmup_steps=2,
    )

    def run(output_dir, resume=None):
        torch.manual_seed(0)
        if stage == "source":
            config = source_config(tiny)
        else:
            target_prompt = "decomposed" if stage == "decomposed target" else "plain"
            config = target_config(tiny, tmp_path / "posterior", target_prompt=target_prompt)
        model = get_peft_model(tiny.build(), config)
        optimizers = (None, None)
        if stage == "decomposed target":
            optimizers = (torch.optim.AdamW(bayesian_parameter_groups(model, shared_lr=0.1, task_lr=0.01)), None)
        trainer = make_trainer(model, output_dir, data, optimizers=optimizers, **overrides)
        trainer.train(resume_from_checkpoint=resume)
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}, trainer

    full, _ = run(tmp_path / "full")
    resumed, trainer = run(tmp_path / "resumed", resume=str(tmp_path / "full" / "checkpoint-4"))
    assert trainer.state.global_step == 8
    assert full.keys() == resumed.keys()
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], atol=1e-6, rtol=0, msg=key)


def test_target_rejects_task_ids(tmp_path):
    tiny = TINY_MODELS["gpt2"]
    saved_posterior(tiny, tmp_path / "posterior")
    model = get_peft_model(tiny.build(), target_config(tiny, tmp_path / "posterior"))
    with pytest.raises(ValueError, match="single prompt and takes no task_ids"):
        model(**make_batch(tiny), task_ids=torch.zeros(4, dtype=torch.long))


# ---------------------------------------------------------------------------------------------
# bad posteriors
# ---------------------------------------------------------------------------------------------


def test_missing_posterior_says_what_was_tried(tmp_path):
    tiny = TINY_MODELS["gpt2"]
    with pytest.raises(
        FileNotFoundError,
        match=r"not a local directory, and downloading adapter_config.json from the "
        r"Hugging Face Hub repo 'nobody/no-such-posterior' failed",
    ):
        get_peft_model(tiny.build(), target_config(tiny, "nobody/no-such-posterior"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no adapter_config.json. Save the source-stage model there"):
        get_peft_model(tiny.build(), target_config(tiny, tmp_path / "empty"))


def test_posterior_from_the_hub(tmp_path, monkeypatch):
    """A repo id goes to huggingface_hub.hf_hub_download, with the revision."""
    import shutil

    import huggingface_hub

    tiny = TINY_MODELS["gpt2"]
    particles = saved_posterior(tiny, tmp_path / "posterior").prompt_encoder["default"].particles.detach()
    requests = []

    def fake_download(repo_id, filename, revision=None):
        requests.append((repo_id, filename, revision))
        (tmp_path / "cache").mkdir(exist_ok=True)
        return shutil.copy(tmp_path / "posterior" / filename, tmp_path / "cache" / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    model = get_peft_model(tiny.build(), target_config(tiny, "someone/posterior", posterior_revision="v1"))
    torch.testing.assert_close(model.prompt_encoder["default"].embedding.weight, particles.mean(0))
    assert requests == [
        ("someone/posterior", "adapter_config.json", "v1"),
        ("someone/posterior", "adapter_model.safetensors", "v1"),
    ]


def test_posterior_with_the_wrong_number_of_particles(tmp_path):
    tiny = TINY_MODELS["gpt2"]
    saved_posterior(tiny, tmp_path / "posterior")
    weights_file = tmp_path / "posterior" / "adapter_model.safetensors"
    weights = load_file(weights_file)
    save_file({**weights, "particles": weights["particles"][:2].contiguous()}, weights_file)
    with pytest.raises(
        ValueError,
        match=r"particles of shape \[2, 4, 32\], but its adapter_config.json describes "
        r"\[3, 4, 32\].*Save the source-stage model again",
    ):
        get_peft_model(tiny.build(), target_config(tiny, tmp_path / "posterior"))
    with pytest.raises(ValueError, match="holds 2 particles but this config has num_particles=3"):
        PeftModel.from_pretrained(tiny.build(), tmp_path / "posterior")
    save_file({"prompt_embeddings": weights["prompt_embeddings"]}, weights_file)
    with pytest.raises(ValueError, match="has no 'particles' tensor"):
        load_posterior(tmp_path / "posterior")


def test_posterior_for_another_hidden_size_or_prompt_length(tmp_path):
    tiny = TINY_MODELS["gpt2"]
    saved_posterior(tiny, tmp_path / "posterior")  # hidden size 32, 4 tokens
    with pytest.raises(ValueError, match=r"prompts of shape \[4, 32\].*this target needs \[4, 48\].*hidden size 32"):
        get_peft_model(tiny.build(hidden=48), target_config(tiny, tmp_path / "posterior"))
    with pytest.raises(ValueError, match=r"this target needs \[6, 32\]. Set num_virtual_tokens=4"):
        get_peft_model(tiny.build(), target_config(tiny, tmp_path / "posterior", num_virtual_tokens=6))


def test_posterior_that_is_not_a_source_stage_adapter(tmp_path):
    tiny = TINY_MODELS["gpt2"]
    saved_posterior(tiny, tmp_path / "posterior")
    get_peft_model(tiny.build(), target_config(tiny, tmp_path / "posterior")).save_pretrained(tmp_path / "target")
    with pytest.raises(
        ValueError, match="holds a BAYESIAN_PROMPT_TUNING adapter of stage 'target', not a source-stage"
    ):
        get_peft_model(tiny.build(), target_config(tiny, tmp_path / "target"))
    get_peft_model(tiny.build(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).save_pretrained(
        tmp_path / "plain"
    )
    with pytest.raises(ValueError, match="holds a PROMPT_TUNING adapter, not a source-stage"):
        load_posterior(tmp_path / "plain")
