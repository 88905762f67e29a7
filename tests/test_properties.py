"""Property-based tests (hypothesis) over config values and input shapes for all three methods."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_MODELS, VOCAB
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import PeftConfig, get_peft_model

from peft_prompt_transfer import BayesianPromptConfig, ComPTConfig, ResidualPromptConfig
from peft_prompt_transfer.bayesian.svgd import svgd_gradient
from peft_prompt_transfer.compt import sparsemax

# derandomized: the same examples on every run, so CI never meets a new failure by chance
FAST = settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

residual_configs = st.builds(
    ResidualPromptConfig,
    task_type=st.sampled_from(["CAUSAL_LM", "SEQ_2_SEQ_LM", "SEQ_CLS"]),
    num_virtual_tokens=st.integers(1, 6),
    bottleneck_size=st.integers(1, 16),
    activation=st.sampled_from(["relu", "gelu", "tanh", "silu", "sigmoid", "identity"]),
    layer_norm=st.booleans(),
    dropout=st.floats(0.0, 0.9),
    shared_mlp=st.booleans(),
    residual=st.booleans(),
)


@st.composite
def compt_configs(draw):
    num_sources = draw(st.integers(1, 4))
    composition = draw(st.sampled_from(["sum", "concat"]))
    length = draw(st.integers(1, 3))
    return ComPTConfig(
        task_type=draw(st.sampled_from(["CAUSAL_LM", "SEQ_2_SEQ_LM", "SEQ_CLS"])),
        num_tasks=draw(st.integers(1, 4)),
        num_source_prompts=num_sources,
        num_virtual_tokens=2 * length if composition == "concat" else length,
        composition=composition,
        private_prompt=True if composition == "concat" else draw(st.booleans()),
        normalization=draw(st.sampled_from(["sigmoid", "softmax", "sparsemax"])),
        top_k=draw(st.none() | st.integers(1, num_sources)),
        learn_gates=draw(st.booleans()),
        relaxed_bernoulli=draw(st.booleans()),
        prompt_mlp_bottleneck_size=draw(st.none() | st.integers(1, 8)),
    )


bayesian_configs = st.builds(
    BayesianPromptConfig,
    task_type=st.sampled_from(["CAUSAL_LM", "SEQ_2_SEQ_LM", "SEQ_CLS"]),
    num_virtual_tokens=st.integers(1, 6),
    num_particles=st.integers(1, 5),
    likelihood_scale=st.floats(1e-3, 1e3),
    prior_scale=st.floats(1e-2, 1e3),
    kernel_bandwidth=st.just("median") | st.floats(1e-3, 1e3),
)

ALL_CONFIGS = st.one_of(residual_configs, compt_configs(), bayesian_configs)


@FAST
@given(config=ALL_CONFIGS)
def test_valid_configs_round_trip_through_json(config, tmp_path_factory):
    folder = tmp_path_factory.mktemp("config")
    config.save_pretrained(folder)
    loaded = PeftConfig.from_pretrained(folder)
    assert type(loaded) is type(config) and loaded.to_dict() == config.to_dict()


@FAST
@given(
    field=st.sampled_from(["num_virtual_tokens", "bottleneck_size"]),
    value=st.integers(-5, 0) | st.floats(allow_nan=True) | st.text(max_size=3) | st.booleans(),
)
def test_invalid_sizes_are_rejected_with_the_field_name(field, value):
    with pytest.raises(ValueError, match=field):
        ResidualPromptConfig(task_type="CAUSAL_LM", **{"num_virtual_tokens": 2, field: value})


def _model(config):
    tiny = {"CAUSAL_LM": "gpt2", "SEQ_2_SEQ_LM": "t5", "SEQ_CLS": "bert"}[config.task_type]
    return TINY_MODELS[tiny], get_peft_model(TINY_MODELS[tiny].build(), config)


@FAST
@given(config=ALL_CONFIGS, batch_size=st.integers(1, 5), seq_len=st.integers(1, 7), data=st.data())
def test_forward_shapes_and_finite_outputs(config, batch_size, seq_len, data):
    tiny, model = _model(config)
    input_ids = torch.randint(3, VOCAB, (batch_size, seq_len))
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if isinstance(config, ComPTConfig):
        inputs["task_ids"] = torch.tensor(
            data.draw(st.lists(st.integers(0, config.num_tasks - 1), min_size=batch_size, max_size=batch_size))
        )
    if tiny.kind == "seq2seq":
        inputs["decoder_input_ids"] = torch.zeros(batch_size, 2, dtype=torch.long)
    model.train(data.draw(st.booleans()))
    out = model(**inputs).logits
    expected = {
        "causal": (batch_size, seq_len + config.num_virtual_tokens, VOCAB),
        "seq2seq": (batch_size, 2, VOCAB),
        "cls": (batch_size, 2),
    }[tiny.kind]
    assert out.shape == expected and torch.isfinite(out).all()
    prompts = model.get_prompt(batch_size, task_ids=inputs.get("task_ids"))
    assert prompts.shape == (batch_size, config.num_virtual_tokens, config.token_dim)


@FAST
@given(
    logits=st.lists(st.floats(-50, 50), min_size=1, max_size=8).map(torch.tensor),
    shift=st.floats(-10, 10),
)
def test_sparsemax_is_a_distribution_and_shift_invariant(logits, shift):
    p = sparsemax(logits)
    assert (p >= 0).all() and float(p.sum()) == pytest.approx(1.0, abs=1e-5)
    assert float(p.max()) > 0 and p.argmax() == logits.argmax()
    torch.testing.assert_close(sparsemax(logits + shift), p, atol=1e-4, rtol=0)


@FAST
@given(
    num_particles=st.integers(1, 6),
    dim=st.integers(1, 5),
    duplicates=st.booleans(),
    scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**16),
)
def test_svgd_gradient_is_finite(num_particles, dim, duplicates, scale, seed):
    generator = torch.Generator().manual_seed(seed)
    particles = torch.randn(num_particles, dim, generator=generator) * scale
    if duplicates:
        particles[:] = particles[0]
    grad = svgd_gradient(particles, torch.randn(num_particles, dim, generator=generator), prior_scale=10.0)
    assert grad.shape == particles.shape and torch.isfinite(grad).all()
