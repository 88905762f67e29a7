"""PromptLibrary: building from every kind of adapter, ranking, initialising, saving and loading."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from conftest import TINY_MODELS
from peft import PeftModel, PromptTuningConfig, get_peft_model
from safetensors.torch import load_file

from peft_prompt_transfer import (
    CURRENT_PROMPT,
    BayesianPromptConfig,
    ComPTConfig,
    PromptLibrary,
    ResidualPromptConfig,
    export_prompt_tuning,
)
from peft_prompt_transfer.library import ranking

N_TOKENS = 4


def prompt_tuning(tiny, tmp_path, num_virtual_tokens: int = N_TOKENS, seed: int = 0):
    """peft PROMPT_TUNING with the prompt in front of the input only (peft's seq2seq default adds a decoder prompt)."""
    torch.manual_seed(seed)
    config = PromptTuningConfig(
        task_type=tiny.task_type, num_virtual_tokens=num_virtual_tokens, num_transformer_submodules=1
    )
    return get_peft_model(tiny.saved(tmp_path), config)


def examples_with_label(tiny, label: int, count: int = 8, length: int = 6, seed: int = 0) -> list[dict]:
    """Tokenized examples whose scored token is always `label`: a task one trained prompt fits and another does not."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        ids = torch.randint(3, 64, (length,), generator=g).tolist()
        if tiny.kind == "causal":
            rows.append({"input_ids": ids + [label], "labels": [-100] * length + [label]})
        else:
            rows.append({"input_ids": ids, "attention_mask": [1] * length, "labels": [label, label]})
    return rows


def trained_prompt(tiny, tmp_path, label: int, seed: int):
    """A PROMPT_TUNING model trained briefly to make `label` the scored token (its loss falls)."""
    model = prompt_tuning(tiny, tmp_path, seed=seed)
    rows = examples_with_label(tiny, label, count=8, seed=seed + 100)
    batch = PromptLibrary_batch(rows)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    losses = []
    for _ in range(30):
        loss = model(**batch).loss
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < 0.5 * losses[0]
    return model


def PromptLibrary_batch(rows: list[dict]) -> dict:
    return {key: torch.tensor([row[key] for row in rows]) for key in rows[0]}


def reference_score(tiny, tmp_path, prompt: torch.Tensor, rows: list[dict]) -> float:
    """The score by definition: stock peft PROMPT_TUNING with the prompt, the mean loss per label token."""
    model = prompt_tuning(tiny, tmp_path, num_virtual_tokens=prompt.shape[0]).eval()
    model.prompt_encoder["default"].embedding.weight.data.copy_(prompt)
    with torch.no_grad():
        return model(**PromptLibrary_batch(rows)).loss.item()


def residual_and_compt(tiny, tmp_path) -> tuple[PeftModel, PeftModel]:
    """A residual adapter and a ComPT adapter of tasks "a" and "b" on `tiny`, after `torch.manual_seed(0)`."""
    torch.manual_seed(0)
    residual = get_peft_model(
        tiny.saved(tmp_path), ResidualPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=N_TOKENS)
    )
    compt = get_peft_model(
        tiny.saved(tmp_path),
        ComPTConfig(task_type="CAUSAL_LM", num_virtual_tokens=N_TOKENS, task_names=["a", "b"], num_source_prompts=2),
    )
    return residual, compt


@pytest.fixture(params=["llama", "gpt2", "t5"])
def lm(request):
    return TINY_MODELS[request.param]


def test_the_source_that_fits_ranks_first_on_a_constructed_task(lm, tmp_path):
    fives, sevens = trained_prompt(lm, tmp_path, 5, seed=1), trained_prompt(lm, tmp_path, 7, seed=2)
    base = lm.saved(tmp_path)
    library = PromptLibrary.from_adapters(base, {"fives": fives, "sevens": sevens})
    target = prompt_tuning(lm, tmp_path, seed=3)
    rows = examples_with_label(lm, 5, seed=7)  # new inputs, the first source's label
    ranking = library.rank(target, rows, progress=False)
    assert ranking[0][0] == "fives"
    assert dict(ranking)["sevens"] > dict(ranking)["fives"] + 1.0  # a prompt for another label fits far worse
    assert {name for name, _ in ranking} == {"fives", "sevens", CURRENT_PROMPT}
    scores = dict(ranking)
    for name in ("fives", "sevens"):
        expected = reference_score(lm, tmp_path, library[name].prompt, rows)
        assert scores[name] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("kind", ["llama", "t5"])  # the base model run directly; a scorer PeftModel around it
def test_rank_leaves_the_model_as_it_was(kind, tmp_path):
    tiny = TINY_MODELS[kind]
    model = get_peft_model(
        tiny.saved(tmp_path), ResidualPromptConfig(task_type=tiny.task_type, num_virtual_tokens=N_TOKENS)
    )
    model.train()
    batch = PromptLibrary_batch(examples_with_label(tiny, 5))
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    with torch.no_grad():
        before = model.eval()(**batch).logits
    model.train()
    library = PromptLibrary.from_adapters(tiny.saved(tmp_path), {"mine": model})
    ranking = library.rank(model, examples_with_label(tiny, 5), progress=False)
    # the model's own prompt and the same prompt as an entry score the same
    assert dict(ranking)["mine"] == pytest.approx(dict(ranking)[CURRENT_PROMPT], rel=1e-6)
    assert model.training and {name: p.requires_grad for name, p in model.named_parameters()} == flags
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**batch).logits, before, rtol=0, atol=0)


def test_initialize_copies_a_prompt_tuning_prompt_exactly(tmp_path):
    tiny = TINY_MODELS["llama"]
    source = trained_prompt(tiny, tmp_path, 5, seed=1)
    library = PromptLibrary.from_adapters(tiny.saved(tmp_path), {"fives": source})
    target = prompt_tuning(tiny, tmp_path, seed=9)
    written = library.initialize(target, "fives")
    weight = target.prompt_encoder["default"].embedding.weight
    assert torch.equal(weight.detach(), source.prompt_encoder["default"].embedding.weight.detach())
    assert torch.equal(written, weight.detach())
    batch = PromptLibrary_batch(examples_with_label(tiny, 5))
    with torch.no_grad():
        torch.testing.assert_close(target.eval()(**batch).logits, source.eval()(**batch).logits, rtol=0, atol=0)


def test_a_list_starts_from_the_mean_at_the_entries_token_norm(tmp_path):
    tiny = TINY_MODELS["llama"]
    library = PromptLibrary(tiny.saved(tmp_path))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randn(N_TOKENS, 32, generator=g) * scale for scale in (1.0, 2.0, 3.0)]
    for index, prompt in enumerate(prompts):
        library.add(f"p{index}", prompt)
    target = prompt_tuning(tiny, tmp_path)
    written = library.initialize(target, ["p0", "p1", "p2"])
    mean = torch.stack(prompts).mean(0)
    # the mean's direction, token by token, at the entries' mean token norm
    assert torch.allclose(torch.nn.functional.cosine_similarity(written, mean, dim=-1), torch.ones(N_TOKENS))
    assert written.norm(dim=-1).mean() == pytest.approx(torch.stack(prompts).norm(dim=-1).mean().item(), rel=1e-5)
    assert torch.equal(target.prompt_encoder["default"].embedding.weight.detach(), written)


def test_an_entry_of_another_length_is_tiled_or_cut_with_a_warning(tmp_path):
    tiny = TINY_MODELS["llama"]
    library = PromptLibrary(tiny.saved(tmp_path))
    short = torch.randn(3, 32)
    library.add("short", short)
    target = prompt_tuning(tiny, tmp_path, num_virtual_tokens=7)
    with pytest.warns(UserWarning, match=r"The adapter's prompts have 7 tokens, but \{'short': 3\}"):
        written = library.initialize(target, "short")
    assert torch.equal(written, torch.cat([short, short, short[:1]]))
    target = prompt_tuning(tiny, tmp_path, num_virtual_tokens=2)
    with pytest.warns(UserWarning, match="cut to their first tokens"):
        assert torch.equal(library.initialize(target, "short"), short[:2])


def test_every_kind_of_adapter_gives_its_prompts_saved_or_live(tmp_path):
    tiny = TINY_MODELS["llama"]
    base = lambda: tiny.saved(tmp_path)  # noqa: E731
    residual, compt = residual_and_compt(tiny, tmp_path)
    source = get_peft_model(
        base(), BayesianPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=N_TOKENS, num_particles=3)
    )
    source.save_pretrained(tmp_path / "source")
    target = get_peft_model(
        base(),
        BayesianPromptConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=N_TOKENS, stage="target", posterior=str(tmp_path / "source")
        ),
    )
    peft_prompt = prompt_tuning(tiny, tmp_path, seed=4)
    models = {"residual": residual, "compt": compt, "source": source, "target": target, "peft": peft_prompt}
    for name, model in models.items():
        model.save_pretrained(tmp_path / name)
    export_prompt_tuning(compt, tmp_path / "exported", task="b")
    expected = {
        "residual": residual.prompt_encoder["default"].inference_prompt(),
        "compt/a": compt.prompt_encoder["default"].inference_prompt("a"),
        "compt/b": compt.prompt_encoder["default"].inference_prompt("b"),
        **{f"source/particle-{i}": source.prompt_encoder["default"].particles[i] for i in range(3)},
        "target": target.prompt_encoder["default"].inference_prompt(),
        "peft": peft_prompt.prompt_encoder["default"].embedding.weight,
        "exported": compt.prompt_encoder["default"].inference_prompt("b"),
    }
    saved = PromptLibrary.from_adapters(base(), {name: tmp_path / name for name in [*models, "exported"]})
    live = PromptLibrary.from_adapters(base(), models)
    assert saved.names == list(expected)
    assert live.names == [name for name in expected if name != "exported"]
    for library in (saved, live):
        for name in library.names:
            torch.testing.assert_close(library[name].prompt, expected[name].detach().float(), rtol=0, atol=1e-6)
    assert saved["compt/b"].origin == {"source": str(tmp_path / "compt"), "peft_type": "COMPT", "task": "b"}
    assert saved["source/particle-2"].origin["particle"] == 2
    assert saved["exported"].origin["peft_type"] == "PROMPT_TUNING"
    assert all(entry.task_type == "CAUSAL_LM" and entry.num_virtual_tokens == N_TOKENS for entry in saved)


def test_a_round_trip_is_lossless(tmp_path):
    tiny = TINY_MODELS["gpt2"]
    library = PromptLibrary.from_adapters(
        tiny.saved(tmp_path),
        {"a": prompt_tuning(tiny, tmp_path, seed=1), "b": prompt_tuning(tiny, tmp_path, num_virtual_tokens=6, seed=2)},
        metadata={"a": {"template": "Review: {text}\nSentiment:", "label_words": [" negative", " positive"]}},
    )
    library.save_pretrained(tmp_path / "library")
    assert sorted(p.name for p in (tmp_path / "library").iterdir()) == [
        "README.md",
        "prompt_library.json",
        "prompt_library.safetensors",
    ]
    loaded = PromptLibrary.from_pretrained(tmp_path / "library")
    assert loaded.names == library.names
    assert loaded.base_model_record == library.base_model_record
    for entry in library:
        assert torch.equal(loaded[entry.name].prompt, entry.prompt)
        assert loaded[entry.name].metadata() == entry.metadata()
    assert loaded["a"].label_words == [" negative", " positive"] and loaded["b"].template is None
    target = prompt_tuning(tiny, tmp_path, seed=3)
    rows = examples_with_label(tiny, 5)
    with pytest.warns(UserWarning, match=r"\{'b': 6\}"):
        assert loaded.rank(target, rows, progress=False) == library.rank(target, rows, progress=False)


def test_another_embedding_size_is_refused_with_the_model_it_was_made_for(tmp_path):
    tiny = TINY_MODELS["llama"]
    library = PromptLibrary.from_adapters(tiny.saved(tmp_path), {"a": prompt_tuning(tiny, tmp_path)})
    wider = get_peft_model(
        tiny.saved(tmp_path, hidden=48), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N_TOKENS)
    )
    made_for = re.escape(str(tmp_path / "base-llama-32"))
    message = rf"This prompt library was made for '{made_for}', whose embeddings have hidden size 32, but this model's have 48"
    with pytest.raises(ValueError, match=message):
        library.rank(wider, examples_with_label(tiny, 5), progress=False)
    with pytest.raises(ValueError, match=message):
        library.initialize(wider, "a")
    with pytest.raises(ValueError, match=r"a prompt is \[num_virtual_tokens, 32\] for this library's base model"):
        library.add("wide", torch.zeros(N_TOKENS, 48))


def test_another_checkpoint_or_vocabulary_warns(tmp_path):
    tiny = TINY_MODELS["llama"]
    library = PromptLibrary.from_adapters(tiny.saved(tmp_path), {"a": prompt_tuning(tiny, tmp_path)})
    same = prompt_tuning(tiny, tmp_path)
    same.get_base_model().to(torch.bfloat16)  # the same checkpoint in another dtype is the same model
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        library.initialize(same, "a")
    tuned = prompt_tuning(tiny, tmp_path)
    with torch.no_grad():  # what fine-tuning does to the embeddings (5% of their RMS)
        weight = tuned.get_input_embeddings().weight
        weight.add_(0.05 * weight.pow(2).mean().sqrt() * torch.randn_like(weight))
    with pytest.warns(UserWarning, match="this model's input embeddings differ from that model's"):
        library.initialize(tuned, "a")
    bigger = prompt_tuning(tiny, tmp_path)
    bigger.get_base_model().resize_token_embeddings(80)
    with pytest.warns(UserWarning, match="with a vocabulary of 64 tokens, but this model has 80"):
        library.initialize(bigger, "a")


def test_each_method_starts_where_it_keeps_its_prompt(tmp_path):
    tiny = TINY_MODELS["llama"]
    library = PromptLibrary(tiny.saved(tmp_path))
    g = torch.Generator().manual_seed(0)
    for name in ("p0", "p1", "p2"):
        library.add(name, torch.randn(N_TOKENS, 32, generator=g), task_type="CAUSAL_LM")
    residual = get_peft_model(
        tiny.saved(tmp_path), ResidualPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=N_TOKENS)
    )
    library.initialize(residual, "p1")  # the MLP's input, as the paper initialises it
    assert torch.equal(residual.prompt_encoder["default"].embedding.weight.detach(), library["p1"].prompt)
    compt = get_peft_model(
        tiny.saved(tmp_path),
        ComPTConfig(task_type="CAUSAL_LM", num_virtual_tokens=N_TOKENS, task_names=["t"], num_source_prompts=3),
    )
    library.initialize(compt, ["p2", "p0"])  # the top entries become its first source prompts, in order
    sources = compt.prompt_encoder["default"].embedding.weight.detach().view(3, N_TOKENS, 32)
    assert torch.equal(sources[0], library["p2"].prompt) and torch.equal(sources[1], library["p0"].prompt)
    with pytest.raises(ValueError, match="4 entries for a ComPT adapter with num_source_prompts=3"):
        library.initialize(compt, ["p0", "p1", "p2", "p0"])
    posterior = library.save_as_posterior(["p0", "p1", "p2"], tmp_path / "posterior")
    target = get_peft_model(
        tiny.saved(tmp_path),
        BayesianPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=N_TOKENS, stage="target", posterior=posterior),
    )
    encoder = target.prompt_encoder["default"]
    mean = torch.stack([library[n].prompt for n in ("p0", "p1", "p2")]).mean(0)
    torch.testing.assert_close(encoder.embedding.weight.detach(), mean)  # a posterior of entries starts at their mean
    library.initialize(target, "p2")  # the best particle: the start moves, the anchor stays the posterior's mean
    assert torch.equal(encoder.embedding.weight.detach(), library["p2"].prompt)
    torch.testing.assert_close(encoder.mean(), mean)
    loaded = PeftModel.from_pretrained(tiny.saved(tmp_path), posterior)  # the posterior is a loadable adapter too
    torch.testing.assert_close(
        loaded.prompt_encoder["default"].particles.detach(),
        torch.stack([library[n].prompt for n in ("p0", "p1", "p2")]),
    )
    source = get_peft_model(
        tiny.saved(tmp_path), BayesianPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=N_TOKENS, num_particles=3)
    )
    library.initialize(source, ["p0", "p1", "p2"])
    assert torch.equal(source.prompt_encoder["default"].particles.detach()[2], library["p2"].prompt)
    with pytest.raises(ValueError, match="2 entries for a Bayesian source with num_particles=3"):
        library.initialize(source, ["p0", "p1"])


def test_a_bayesian_target_starts_from_the_particle_that_fits(tmp_path):
    """The recipe of docs/methods/bayesian.md#start-from-the-best-particle, on a saved posterior: the particle that
    fits the target ranks first, the target starts there and its anchor stays the posterior mean."""
    tiny = TINY_MODELS["llama"]
    fives, sevens = trained_prompt(tiny, tmp_path, 5, seed=1), trained_prompt(tiny, tmp_path, 7, seed=2)
    entries = PromptLibrary.from_adapters(
        tiny.saved(tmp_path), {"fives": fives, "sevens": sevens, "fresh": prompt_tuning(tiny, tmp_path, seed=3)}
    )
    posterior = entries.save_as_posterior(["fives", "sevens", "fresh"], tmp_path / "posterior")
    base = tiny.saved(tmp_path)
    target = get_peft_model(
        base,
        BayesianPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=N_TOKENS, stage="target", posterior=posterior),
    )
    particles = PromptLibrary.from_adapters(base, {"posterior": posterior})
    rows = examples_with_label(tiny, 7, seed=7)
    ranking = particles.rank(target, rows, include_current=False, progress=False)
    assert [name for name, _ in ranking][0] == "posterior/particle-1"
    particles.initialize(target, ranking[0][0])
    encoder = target.prompt_encoder["default"]
    assert torch.equal(encoder.embedding.weight.detach(), entries["sevens"].prompt)
    mean = torch.stack([entries[name].prompt for name in ("fives", "sevens", "fresh")]).mean(0)
    torch.testing.assert_close(encoder.mean(), mean)
    with torch.no_grad():  # the start is the particle's: the target's loss is the particle's score
        loss = target(**PromptLibrary_batch(rows)).loss.item()
    assert loss == pytest.approx(ranking[0][1], rel=1e-5)


def test_bad_input_gets_a_clear_error(tmp_path):
    tiny = TINY_MODELS["llama"]
    library = PromptLibrary.from_adapters(tiny.saved(tmp_path), {"a": prompt_tuning(tiny, tmp_path)})
    target = prompt_tuning(tiny, tmp_path)
    with pytest.raises(ValueError, match="Example 0 has no input_ids and labels"):
        library.rank(target, [{"input_ids": [3, 4]}], progress=False)
    with pytest.raises(ValueError, match="Example 0 has labels=1, a class index"):
        library.rank(target, [{"input_ids": [3, 4], "labels": 1}], progress=False)
    with pytest.raises(ValueError, match="holds no prompt of its own to rank"):
        library.rank(tiny.saved(tmp_path), examples_with_label(tiny, 5), progress=False)
    assert (
        len(library.rank(tiny.saved(tmp_path), examples_with_label(tiny, 5), include_current=False, progress=False))
        == 1
    )
    with pytest.raises(KeyError, match=r"No entry named 'b'; the library has \['a'\]"):
        library.initialize(target, "b")
    with pytest.raises(ValueError, match="already has an entry named 'a'"):
        library.add("a", torch.zeros(N_TOKENS, 32))
    cls = TINY_MODELS["bert"]
    classifier = get_peft_model(cls.saved(tmp_path), PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=2))
    cls_library = PromptLibrary(cls.saved(tmp_path))
    with pytest.raises(ValueError, match="A classifier's head is new.*Encoder models .* cannot be ranked"):
        cls_library.rank(classifier, [{"input_ids": [3, 4], "labels": [5, 6]}], progress=False)
    with pytest.raises(FileNotFoundError, match="has no prompt_library.json"):
        PromptLibrary.from_pretrained(tmp_path)
    lora_like = tmp_path / "not-a-prompt"
    from peft import LoraConfig

    get_peft_model(tiny.saved(tmp_path), LoraConfig(target_modules=["q_proj"])).save_pretrained(lora_like)
    with pytest.raises(ValueError, match="Adapter 'lora' is a LORA adapter; a prompt library takes"):
        PromptLibrary.from_adapters(tiny.saved(tmp_path), {"lora": lora_like})
    library.save_pretrained(tmp_path / "damaged")
    weights = load_file(tmp_path / "damaged" / "prompt_library.safetensors")
    from safetensors.torch import save_file

    save_file({"other": weights["a"]}, tmp_path / "damaged" / "prompt_library.safetensors")
    with pytest.raises(ValueError, match="is damaged: prompt_library.json names \\['a'\\]"):
        PromptLibrary.from_pretrained(tmp_path / "damaged")
    (tmp_path / "damaged" / "prompt_library.json").write_text('{"format": "peft-prompt')
    with pytest.raises(ValueError, match="is damaged: prompt_library.json is not valid JSON"):
        PromptLibrary.from_pretrained(tmp_path / "damaged")
    library.save_pretrained(tmp_path / "truncated")
    weights_file = tmp_path / "truncated" / "prompt_library.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:40])
    with pytest.raises(ValueError, match="is damaged: prompt_library.safetensors cannot be read"):
        PromptLibrary.from_pretrained(tmp_path / "truncated")
    with pytest.raises(ValueError, match="Example 0 has 3 input_ids but 1 labels"):
        library.rank(target, [{"input_ids": [3, 4, 5], "labels": [5]}], progress=False)
    from transformers import AutoModelForMaskedLM, BertConfig

    masked = AutoModelForMaskedLM.from_config(
        BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    )
    with pytest.raises(ValueError, match="this one is a BertForMaskedLM model"):
        PromptLibrary(masked).rank(masked, examples_with_label(tiny, 5), include_current=False, progress=False)


def test_entries_are_the_librarys_own_copies(tmp_path):
    """Training the source on, or changing what initialize returned, leaves the library's entries as they were."""
    tiny = TINY_MODELS["llama"]
    source = get_peft_model(
        tiny.saved(tmp_path), BayesianPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=N_TOKENS, num_particles=2)
    )
    library = PromptLibrary.from_adapters(tiny.saved(tmp_path), {"s": source})
    kept = library["s/particle-0"].prompt.clone()
    with torch.no_grad():
        source.prompt_encoder["default"].embedding.weight.mul_(0)
    prompt = torch.ones(N_TOKENS, 32)
    library.add("mine", prompt)
    prompt.mul_(0)
    written = library.initialize(prompt_tuning(tiny, tmp_path), "s/particle-0")
    written.mul_(0)
    assert torch.equal(library["s/particle-0"].prompt, kept)
    assert torch.equal(library["mine"].prompt, torch.ones(N_TOKENS, 32))


def test_rank_pads_examples_of_any_length_and_scores_each_label_token(lm, tmp_path):
    """Examples of different lengths, batched with padding, score what each example scores alone (the mean over
    every label token of all examples)."""
    library = PromptLibrary(lm.saved(tmp_path))
    library.add("p", torch.randn(N_TOKENS, 32, generator=torch.Generator().manual_seed(0)))
    g = torch.Generator().manual_seed(1)
    rows = []
    for length in (3, 9, 5, 6, 4):
        ids = torch.randint(3, 64, (length,), generator=g).tolist()
        if lm.kind == "causal":
            # one example also scores its first token, which the prompt's last position predicts
            rows.append(
                {"input_ids": ids, "labels": [ids[0] if length == 5 else -100] + [-100] * (length - 3) + ids[-2:]}
            )
        else:
            rows.append({"input_ids": ids, "attention_mask": [1] * length, "labels": ids[: length % 3 + 1]})
    model = prompt_tuning(lm, tmp_path)
    score = dict(library.rank(model, rows, include_current=False, batch_size=2, progress=False))["p"]
    tokens = [sum(label != -100 for label in row["labels"]) for row in rows]
    alone = [reference_score(lm, tmp_path, library["p"].prompt, [row]) for row in rows]
    assert score == pytest.approx(sum(s * n for s, n in zip(alone, tokens)) / sum(tokens), rel=1e-5)


def test_rank_runs_each_prompt_once_for_every_batch_and_scores_as_concatenation(tmp_path, monkeypatch):
    """On a decoder-only model each prompt runs once, alone, and every batch runs after its keys and values with
    logits only where a label token is predicted, the base model run directly (no second PeftModel is wrapped around
    it); the score is stock peft's concatenating PROMPT_TUNING's."""

    def no_scorer(self, num_virtual_tokens):
        raise AssertionError("a scorer PeftModel was built on a decoder that shares the prompt")

    monkeypatch.setattr(ranking.PromptScorer, "_scorer", no_scorer)
    tiny = TINY_MODELS["llama"]
    library = PromptLibrary(tiny.saved(tmp_path))
    for name, seed in (("p", 0), ("q", 1)):
        library.add(name, torch.randn(20, 32, generator=torch.Generator().manual_seed(seed)))
    rows = examples_with_label(tiny, 5, count=24)
    rows[3]["labels"][0] = rows[3]["input_ids"][0]  # a label on the first token: the prompt's last position predicts it
    model = prompt_tuning(tiny, tmp_path, num_virtual_tokens=20)
    base = model.get_base_model()
    calls, projected = [], []
    base.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(
            (kwargs["inputs_embeds"] if kwargs.get("inputs_embeds") is not None else kwargs["input_ids"]).shape[:2]
        ),
        with_kwargs=True,
    )
    base.lm_head.register_forward_pre_hook(lambda module, args: projected.append(tuple(args[0].shape[:2])))
    scores = dict(library.rank(model, rows, include_current=False, batch_size=8, progress=False))
    # per prompt: the prompt alone, then three batches of 8 rows of 7 tokens
    assert calls == [(1, 20), (8, 7), (8, 7), (8, 7)] * 2
    assert projected == [(1, 1), (8, 1), (8, 1), (8, 1)] * 2  # the prompt's last position; each row's label position
    for name in ("p", "q"):
        assert scores[name] == pytest.approx(reference_score(tiny, tmp_path, library[name].prompt, rows), rel=1e-5)


@pytest.mark.parametrize("kind", ["llama", "t5"])  # the base model run directly; a scorer PeftModel around it
def test_rank_restores_every_module_mode_and_adds_no_hooks_under_gradient_checkpointing(kind, tmp_path):
    tiny = TINY_MODELS[kind]
    model = prompt_tuning(tiny, tmp_path)
    base = model.get_base_model()
    base.gradient_checkpointing_enable()
    model.enable_input_require_grads()
    model.train()
    list(base.children())[-1].eval()  # a model partly in eval mode comes back as it was
    modes = {name: module.training for name, module in base.named_modules()}
    hooks = len(base.get_input_embeddings()._forward_hooks)
    library = PromptLibrary.from_adapters(tiny.saved(tmp_path), {"a": prompt_tuning(tiny, tmp_path, seed=4)})
    for _ in range(3):
        library.rank(model, examples_with_label(tiny, 5), progress=False)
    assert {name: module.training for name, module in base.named_modules()} == modes
    assert len(base.get_input_embeddings()._forward_hooks) == hooks


def test_compt_concat_ranks_and_initializes_its_source_prompts_length(tmp_path):
    tiny = TINY_MODELS["llama"]
    library = PromptLibrary(tiny.saved(tmp_path))
    library.add("p", torch.randn(8, 32))
    compt = get_peft_model(
        tiny.saved(tmp_path),
        ComPTConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=8, task_names=["t"], num_source_prompts=2, composition="concat"
        ),
    )
    # the source prompts have 4 tokens: rank scores, and initialize writes, the entry's first 4
    with pytest.warns(UserWarning, match=r"The adapter's prompts have 4 tokens, but \{'p': 8\}"):
        library.rank(compt, examples_with_label(tiny, 5), task="t", progress=False)
    with pytest.warns(UserWarning, match="have 4 tokens"):
        written = library.initialize(compt, "p")
    assert torch.equal(written, library["p"].prompt[:4])
    sources = compt.prompt_encoder["default"].embedding.weight.detach().view(2, 4, 32)
    assert torch.equal(sources[0], library["p"].prompt[:4])


def test_a_decomposed_bayesian_target_starts_from_the_entry(tmp_path):
    """initialize sets S and puts U V back to ones: the prompt the model sees is the entry, even after training."""
    tiny = TINY_MODELS["llama"]
    library = PromptLibrary(tiny.saved(tmp_path))
    for name in ("p0", "p1"):
        library.add(name, torch.randn(N_TOKENS, 32), task_type="CAUSAL_LM")
    posterior = library.save_as_posterior(["p0", "p1"], tmp_path / "posterior")
    target = get_peft_model(
        tiny.saved(tmp_path),
        BayesianPromptConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=N_TOKENS,
            stage="target",
            posterior=posterior,
            target_prompt="decomposed",
            decomposition_rank=2,
        ),
    )
    encoder = target.prompt_encoder["default"]
    with torch.no_grad():  # as training would leave them
        encoder.task_cols.add_(0.3)
        encoder.task_rows.add_(0.2)
    library.initialize(target, "p1")
    torch.testing.assert_close(encoder.inference_prompt(), library["p1"].prompt)


def test_metadata_goes_to_the_adapters_entries_and_an_entrys_own_wins(tmp_path):
    tiny = TINY_MODELS["llama"]
    compt = get_peft_model(
        tiny.saved(tmp_path),
        ComPTConfig(task_type="CAUSAL_LM", num_virtual_tokens=N_TOKENS, task_names=["a", "b"], num_source_prompts=2),
    )
    library = PromptLibrary.from_adapters(
        tiny.saved(tmp_path),
        {"compt": compt},
        metadata={"compt": {"template": "T: {text}"}, "compt/b": {"template": "B: {text}", "label_words": [" x"]}},
    )
    assert library["compt/a"].template == "T: {text}" and library["compt/a"].label_words is None
    assert library["compt/b"].template == "B: {text}" and library["compt/b"].label_words == [" x"]
    with pytest.raises(ValueError, match=r"metadata\['compt'\] has \['labels'\]; an entry records"):
        PromptLibrary.from_adapters(tiny.saved(tmp_path), {"compt": compt}, metadata={"compt": {"labels": [1]}})
    with pytest.raises(ValueError, match=r"metadata names \['other'\], which are neither adapters"):
        PromptLibrary.from_adapters(tiny.saved(tmp_path), {"compt": compt}, metadata={"other": {"template": "x"}})


def test_prompt_gives_an_entry_or_the_rescaled_mean_fitted_to_a_length(tmp_path):
    tiny = TINY_MODELS["llama"]
    library = PromptLibrary(tiny.saved(tmp_path))
    g = torch.Generator().manual_seed(0)
    library.add("a", torch.randn(3, 32, generator=g))
    library.add("b", 2 * torch.randn(3, 32, generator=g))
    assert torch.equal(library.prompt("a"), library["a"].prompt)
    assert torch.equal(library.prompt("a", num_virtual_tokens=5), torch.cat([library["a"].prompt] * 2)[:5])
    mean = library.prompt(["a", "b"])
    expected_norm = torch.stack([library["a"].prompt, library["b"].prompt]).norm(dim=-1).mean()
    assert mean.norm(dim=-1).mean() == pytest.approx(expected_norm.item(), rel=1e-5)


def test_rank_takes_tensors_arrays_and_rows_with_a_batch_dimension(tmp_path):
    """A Dataset in numpy or torch format, numpy rows and rows a tokenizer returned with return_tensors="pt" ([1, L])
    score as the same rows as lists; a class index, text and a batch of rows get a clear error."""
    import numpy as np
    from datasets import Dataset

    tiny = TINY_MODELS["llama"]
    library = PromptLibrary.from_adapters(tiny.saved(tmp_path), {"a": prompt_tuning(tiny, tmp_path, seed=1)})
    target = prompt_tuning(tiny, tmp_path)
    rows = examples_with_label(tiny, 5)
    expected = library.rank(target, rows, progress=False)
    dataset = Dataset.from_list([dict(row, text="unused") for row in rows])
    formats = {
        "numpy Dataset": dataset.with_format("numpy"),
        "torch Dataset": dataset.with_format("torch"),
        "numpy rows": [{key: np.array(value) for key, value in row.items()} for row in rows],
        "[1, L] tensors": [{key: torch.tensor([value]) for key, value in row.items()} for row in rows],
        "lists of one row tensor": [{key: [torch.tensor(value)] for key, value in row.items()} for row in rows],
        "lists of numpy scalars": [{key: list(np.array(value)) for key, value in row.items()} for row in rows],
        "bool masks": [dict(row, attention_mask=torch.ones(len(row["input_ids"]), dtype=torch.bool)) for row in rows],
    }
    for name, examples in formats.items():
        assert library.rank(target, examples, progress=False) == expected, name
    with pytest.raises(ValueError, match=r"Example 0 has labels=1, a class index"):
        library.rank(target, [{"input_ids": torch.tensor([3, 4]), "labels": torch.tensor(1)}], progress=False)
    with pytest.raises(ValueError, match=r"Example 0 has labels=' positive', text; rank takes tokenized examples"):
        library.rank(target, [{"input_ids": [3, 4], "labels": " positive"}], progress=False)
    with pytest.raises(
        ValueError, match=r"Example 0 has input_ids=\[\[3, 4\], \[5, 6\]\]; rank takes one example per row"
    ):
        library.rank(target, [{"input_ids": torch.tensor([[3, 4], [5, 6]]), "labels": [5, 6]}], progress=False)
    with pytest.raises(ValueError, match=r"Example 0 has input_ids holding 3.5, which is not a token id"):
        library.rank(target, [{"input_ids": torch.tensor([3.5, 4.0]), "labels": [5, 6]}], progress=False)
    with pytest.raises(ValueError, match=r"Example 0 has 2 input_ids but an attention_mask of 3"):
        library.rank(target, [{"input_ids": [3, 4], "attention_mask": [1, 1, 1], "labels": [5, 6]}], progress=False)
    with pytest.raises(ValueError, match=r"Example 0 has an attention_mask holding 2; a mask is 1 for a token"):
        library.rank(target, [{"input_ids": [3, 4], "attention_mask": [1, 2], "labels": [5, 6]}], progress=False)


def test_the_current_prompt_is_not_an_entry_and_the_top_entries_skip_it(tmp_path):
    tiny = TINY_MODELS["llama"]
    library = PromptLibrary(tiny.saved(tmp_path))
    for name, seed in (("p", 0), ("q", 1)):
        library.add(name, torch.randn(N_TOKENS, 32, generator=torch.Generator().manual_seed(seed)))
    target = prompt_tuning(tiny, tmp_path)
    ranking = library.rank(target, examples_with_label(tiny, 5), progress=False)
    with pytest.raises(ValueError, match=r"'<current prompt>' is the model's own start.*leave the prompt as it is"):
        library.initialize(target, [name for name, _ in ranking[:2]] + [CURRENT_PROMPT])
    top = [name for name, _ in ranking if name != CURRENT_PROMPT][:2]  # the recipe the message gives
    assert sorted(top) == ["p", "q"]
    torch.testing.assert_close(library.initialize(target, top), library.prompt(top))


def test_seq2seq_prompt_tuning_with_peft_defaults_gets_the_fix_in_every_message(tmp_path):
    """peft puts a seq2seq PROMPT_TUNING prompt on the decoder too by default; the library takes encoder prompts,
    and says so as a source, as the model ranked, and as the model initialised."""
    tiny = TINY_MODELS["t5"]
    default = get_peft_model(tiny.saved(tmp_path), PromptTuningConfig(task_type=tiny.task_type, num_virtual_tokens=2))
    assert default.peft_config["default"].num_transformer_submodules == 2
    both = (
        r"puts a prompt on both the encoder and the decoder \(num_transformer_submodules=2, peft's default for seq2seq"
    )
    with pytest.raises(ValueError, match=rf"Adapter 'a' {both}.*num_transformer_submodules=1\)"):
        PromptLibrary.from_adapters(tiny.saved(tmp_path), {"a": default})
    library = PromptLibrary(tiny.saved(tmp_path))
    library.add("p", torch.randn(2, 32))
    rows = examples_with_label(tiny, 5)
    with pytest.raises(ValueError, match=rf"The model's own PROMPT_TUNING adapter {both}.*include_current=False"):
        library.rank(default, rows, progress=False)
    assert [name for name, _ in library.rank(default, rows, include_current=False, progress=False)] == ["p"]
    with pytest.raises(ValueError, match=rf"This PROMPT_TUNING adapter {both}.*num_transformer_submodules=1\)"):
        library.initialize(default, "p")


@pytest.mark.parametrize(
    "kind, method", [("llama", "P_TUNING"), ("llama", "MULTITASK_PROMPT_TUNING"), ("t5", "P_TUNING")]
)
def test_other_peft_prompt_adapters_are_refused_with_a_fix_that_works(kind, method, tmp_path):
    """The message gives the code that adds the input's part of the prompt such an adapter gives the model: copied
    into stock PROMPT_TUNING it gives that adapter's logits (on a seq2seq model peft's P-tuning also prompts the
    decoder, which the entry leaves out)."""
    from peft import MultitaskPromptTuningConfig, PromptEncoderConfig

    tiny = TINY_MODELS[kind]
    multitask = method == "MULTITASK_PROMPT_TUNING"
    config = (
        MultitaskPromptTuningConfig(task_type=tiny.task_type, num_virtual_tokens=N_TOKENS, num_tasks=2)
        if multitask
        else PromptEncoderConfig(task_type=tiny.task_type, num_virtual_tokens=N_TOKENS)
    )
    other = get_peft_model(tiny.saved(tmp_path), config).eval()
    task = ", task_ids=torch.tensor([task])" if multitask else ""
    fix = f"library.add(name, model.eval().get_prompt(batch_size=1{task})[0, :{N_TOKENS}])"
    with pytest.raises(ValueError, match=re.escape(f"Adapter 'other' is a {method} adapter") + ".*" + re.escape(fix)):
        PromptLibrary.from_adapters(tiny.saved(tmp_path), {"other": other})
    library = PromptLibrary(tiny.saved(tmp_path))
    task_ids = {"task_ids": torch.tensor([1])} if multitask else {}
    library.add("other", other.get_prompt(batch_size=1, **task_ids)[0, :N_TOKENS])  # the fix, task 1
    target = prompt_tuning(tiny, tmp_path)
    library.initialize(target, "other")
    with pytest.raises(ValueError, match=f"The model's own adapter is a {method} adapter.*include_current=False"):
        library.rank(other, examples_with_label(tiny, 5), progress=False)
    if tiny.kind == "causal":
        batch = PromptLibrary_batch(examples_with_label(tiny, 5))
        batch_task_ids = {"task_ids": torch.ones(len(batch["input_ids"]), dtype=torch.long)} if multitask else {}
        with torch.no_grad():
            torch.testing.assert_close(target.eval()(**batch).logits, other(**batch, **batch_task_ids).logits)


def test_adapters_made_for_another_model_warn_when_the_library_is_built(tmp_path):
    tiny = TINY_MODELS["llama"]
    other = prompt_tuning(tiny, tmp_path)
    with torch.no_grad():  # a checkpoint whose training moved the input embeddings
        weight = other.get_input_embeddings().weight
        weight.add_(0.05 * weight.pow(2).mean().sqrt() * torch.randn_like(weight))
    with pytest.warns(UserWarning, match="Adapter 'other' is live on a model whose input embeddings are not those of"):
        PromptLibrary.from_adapters(tiny.saved(tmp_path), {"other": other})
    same = prompt_tuning(tiny, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        PromptLibrary.from_adapters(tiny.saved(tmp_path), {"same": same})
    bigger = tiny.saved(tmp_path)
    bigger.resize_token_embeddings(80)
    get_peft_model(bigger, ResidualPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=N_TOKENS)).save_pretrained(
        tmp_path / "residual-80"
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PromptLibrary.from_adapters(tiny.saved(tmp_path), {"res": tmp_path / "residual-80"})
    vocabulary = [str(w.message) for w in caught if "vocabulary" in str(w.message)]
    assert len(vocabulary) == 1, vocabulary  # said once, with the adapter's name, not again by its encoder
    assert "Adapter 'res' at" in vocabulary[0]
    assert "was made for a base model with a vocabulary of 80 tokens, but base_model" in vocabulary[0]


def test_names_and_metadata_that_would_not_save_are_refused(tmp_path):
    tiny = TINY_MODELS["llama"]
    library = PromptLibrary(tiny.saved(tmp_path))
    with pytest.raises(ValueError, match="is not '__metadata__', got '__metadata__'"):
        library.add("__metadata__", torch.zeros(N_TOKENS, 32))
    with pytest.raises(ValueError, match=re.escape("label_words is a list of words, one per label, got the string")):
        library.add("a", torch.zeros(N_TOKENS, 32), label_words=" positive")
    assert library.names == []


def test_a_model_on_the_meta_device_gets_a_clear_error():
    from transformers import AutoModelForCausalLM

    tiny = TINY_MODELS["llama"]
    with torch.device("meta"):
        empty = AutoModelForCausalLM.from_config(tiny.build().config)
    with pytest.raises(ValueError, match="input embeddings are on the meta device.*load or materialise the weights"):
        PromptLibrary(empty)


def test_initialize_returns_what_it_wrote_in_the_adapters_dtype(tmp_path):
    tiny = TINY_MODELS["llama"]
    library = PromptLibrary(tiny.saved(tmp_path))
    library.add("p", torch.randn(N_TOKENS, 32, generator=torch.Generator().manual_seed(0)))
    target = prompt_tuning(tiny, tmp_path).to(torch.bfloat16)
    written = library.initialize(target, "p")
    assert written.dtype == torch.bfloat16
    assert torch.equal(written, target.prompt_encoder["default"].embedding.weight.detach())


def test_libraries_and_adapters_load_from_a_subfolder_and_hub_options_are_checked(tmp_path):
    tiny = TINY_MODELS["llama"]
    source = prompt_tuning(tiny, tmp_path, seed=1)
    source.save_pretrained(tmp_path / "repo" / "adapters" / "a")
    library = PromptLibrary.from_adapters(tiny.saved(tmp_path), {"a": tmp_path / "repo"}, subfolder="adapters/a")
    assert torch.equal(library["a"].prompt, source.prompt_encoder["default"].embedding.weight.detach())
    assert library["a"].origin["subfolder"] == "adapters/a"
    library.save_pretrained(tmp_path / "repo" / "library")
    loaded = PromptLibrary.from_pretrained(tmp_path / "repo", subfolder="library")
    assert torch.equal(loaded["a"].prompt, library["a"].prompt)
    with pytest.raises(
        FileNotFoundError, match="The prompt library directory .*repo/other' has no prompt_library.json"
    ):
        PromptLibrary.from_pretrained(tmp_path / "repo", subfolder="other")
    with pytest.raises(TypeError, match=r"Unexpected keyword argument\(s\) \['revison'\]. The Hub options are"):
        PromptLibrary.from_pretrained(tmp_path / "repo", revison="v1")
    with pytest.raises(TypeError, match=r"Unexpected keyword argument\(s\) \['tokens'\]"):
        PromptLibrary.from_adapters(tiny.saved(tmp_path), {"a": tmp_path / "repo"}, tokens="x")
    with pytest.raises(TypeError, match=r"Unexpected keyword argument\(s\) \['dry_run'\]"):  # it returns no file
        PromptLibrary.from_pretrained(tmp_path / "repo", dry_run=True)


def test_an_entry_in_a_prompt_tuning_model_gives_what_its_adapter_gives(tmp_path):
    """What each kind of adapter gives a library is the prompt its model sees: copied into stock peft PROMPT_TUNING,
    the entry gives the adapter's own logits (a ComPT task's through its task_ids)."""
    tiny = TINY_MODELS["llama"]
    base = lambda: tiny.saved(tmp_path)  # noqa: E731
    residual, compt = residual_and_compt(tiny, tmp_path)
    for model in (residual, compt):  # away from their initialisation, so that each part of the prompt matters
        with torch.no_grad():
            for parameter in model.prompt_encoder["default"].parameters():
                parameter.add_(0.3 * torch.randn_like(parameter))
    batch = PromptLibrary_batch(examples_with_label(tiny, 5, count=4))
    library = PromptLibrary.from_adapters(base(), {"residual": residual, "compt": compt})
    expected = {"residual": residual.eval()(**batch).logits}
    for index, task in enumerate(["a", "b"]):
        expected[f"compt/{task}"] = compt.eval()(**batch, task_ids=torch.full((4,), index)).logits
    assert not torch.allclose(expected["compt/a"], expected["compt/b"])  # each task's own composition matters
    raw = prompt_tuning(tiny, tmp_path)
    with torch.no_grad():  # residual's MLP input alone is not what its model sees
        raw.prompt_encoder["default"].embedding.weight.copy_(residual.prompt_encoder["default"].embedding.weight)
        assert not torch.allclose(raw.eval()(**batch).logits, expected["residual"])
    for name, logits in expected.items():
        target = prompt_tuning(tiny, tmp_path)
        library.initialize(target, name)
        with torch.no_grad():
            torch.testing.assert_close(target.eval()(**batch).logits, logits.detach(), msg=name)


def test_hub_options_reach_every_download(tmp_path, monkeypatch):
    """token= (and the other Hub options) go to each file's download and to the revision lookup, for a library and
    for an adapter given by repo id."""
    from types import SimpleNamespace

    import huggingface_hub
    import peft.config

    tiny = TINY_MODELS["llama"]
    prompt_tuning(tiny, tmp_path, seed=1).save_pretrained(tmp_path / "adapter")
    PromptLibrary.from_adapters(tiny.saved(tmp_path), {"a": tmp_path / "adapter"}).save_pretrained(tmp_path / "lib")
    repos = {"org/library": tmp_path / "lib", "org/adapter": tmp_path / "adapter"}
    downloads, lookups = [], []

    def download(repo_id, filename, subfolder=None, revision=None, token=None, cache_dir=None, user_agent=None):
        downloads.append((repo_id, filename, token, cache_dir))
        return str(repos[repo_id] / filename)

    def model_info(api, repo_id, revision=None):
        lookups.append((repo_id, api.token))
        return SimpleNamespace(sha="0" * 40)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(peft.config, "hf_hub_download", download)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.chdir(tmp_path / "lib")  # no folder named like the repo ids
    options = {"token": "hf_secret", "cache_dir": str(tmp_path / "cache")}
    library = PromptLibrary.from_pretrained("org/library", **options)
    PromptLibrary.from_adapters(tiny.saved(tmp_path), {"a": "org/adapter"}, **options)
    assert library.names == ["a"]
    assert lookups == [("org/library", "hf_secret")]
    assert {(repo, name) for repo, name, _, _ in downloads} == {
        ("org/library", "prompt_library.json"),
        ("org/library", "prompt_library.safetensors"),
        ("org/adapter", "adapter_config.json"),
        ("org/adapter", "adapter_model.safetensors"),
    }
    assert all(downloaded[2:] == ("hf_secret", str(tmp_path / "cache")) for downloaded in downloads), downloads
