"""Tiny randomly initialised models built from configs, and helpers shared by the tests."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    BartConfig,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    OPTConfig,
    Qwen2Config,
    RobertaConfig,
    T5Config,
    Trainer,
    TrainingArguments,
)

import peft_prompt_transfer  # noqa: F401  (registers the methods)

# Tiny models run fastest on one thread, and one thread keeps timings steady when other work shares the cores.
torch.set_num_threads(1)

VOCAB = 64
HIDDEN = 32


@dataclass
class TinyModel:
    name: str
    task_type: str
    auto_cls: type
    make_config: Callable[[int], object]

    @property
    def kind(self) -> str:
        return {"CAUSAL_LM": "causal", "SEQ_2_SEQ_LM": "seq2seq", "SEQ_CLS": "cls"}[self.task_type]

    @property
    def auto_peft_cls(self) -> type:
        import peft

        return {
            "causal": peft.AutoPeftModelForCausalLM,
            "seq2seq": peft.AutoPeftModelForSeq2SeqLM,
            "cls": peft.AutoPeftModelForSequenceClassification,
        }[self.kind]

    def build(self, hidden: int = HIDDEN, seed: int = 0):
        torch.manual_seed(seed)
        return self.auto_cls.from_config(self.make_config(hidden)).eval()

    def saved(self, directory, hidden: int = HIDDEN, seed: int = 0):
        """Build, save and reload, so that `name_or_path` (and the adapter's base_model_name_or_path) is a real
        folder that AutoPeftModel can load the base model from."""
        path = os.path.join(str(directory), f"base-{self.name}-{hidden}")
        if not os.path.exists(os.path.join(path, "config.json")):
            self.build(hidden, seed).save_pretrained(path)
        return self.auto_cls.from_pretrained(path).eval()


# At the default initializer_range=0.02 a tiny random model barely reacts to its input (a tiny encoder
# maps all inputs to nearly the same vector), so no prompt can move the loss; the tiny models use 0.2.
_ENCODER_INIT = dict(initializer_range=0.2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)

TINY_MODELS = {
    "gpt2": TinyModel(
        "gpt2",
        "CAUSAL_LM",
        AutoModelForCausalLM,
        lambda h: GPT2Config(
            vocab_size=VOCAB,
            n_embd=h,
            n_layer=2,
            n_head=2,
            n_positions=64,
            bos_token_id=1,
            eos_token_id=2,
            initializer_range=0.2,
        ),
    ),
    "llama": TinyModel(
        "llama",
        "CAUSAL_LM",
        AutoModelForCausalLM,
        lambda h: LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=h,
            intermediate_size=2 * h,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            initializer_range=0.2,
        ),
    ),
    "t5": TinyModel(
        "t5",
        "SEQ_2_SEQ_LM",
        AutoModelForSeq2SeqLM,
        lambda h: T5Config(
            vocab_size=VOCAB,
            d_model=h,
            d_ff=2 * h,
            d_kv=8,
            num_layers=2,
            num_heads=4,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
            dropout_rate=0.0,
        ),
    ),
    "bart": TinyModel(
        "bart",
        "SEQ_2_SEQ_LM",
        AutoModelForSeq2SeqLM,
        lambda h: BartConfig(
            vocab_size=VOCAB,
            d_model=h,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=2 * h,
            decoder_ffn_dim=2 * h,
            max_position_embeddings=64,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=2,
            forced_eos_token_id=None,
            init_std=0.3,
            dropout=0.0,  # at BART's default init_std=0.02 a tiny decoder ignores its encoder
        ),
    ),
    "bert": TinyModel(
        "bert",
        "SEQ_CLS",
        AutoModelForSequenceClassification,
        lambda h: BertConfig(
            vocab_size=VOCAB,
            hidden_size=h,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=2 * h,
            max_position_embeddings=64,
            num_labels=2,
            **_ENCODER_INIT,
        ),
    ),
    "roberta": TinyModel(
        "roberta",
        "SEQ_CLS",
        AutoModelForSequenceClassification,
        lambda h: RobertaConfig(
            vocab_size=VOCAB,
            hidden_size=h,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=2 * h,
            max_position_embeddings=72,
            num_labels=2,
            pad_token_id=1,
            **_ENCODER_INIT,
        ),
    ),
}

# The generation tests' models: two more decoder families (not every test needs six causal LMs), Qwen2 (grouped
# attention with biases on q/k/v, tied embeddings) and OPT (learned positions offset by 2), and a T5 whose decoder
# listens to its encoder.
GENERATIVE_MODELS = {
    **{name: TINY_MODELS[name] for name in ("gpt2", "llama", "bart")},
    # at T5's default initializer_factor=1 a tiny random T5 decodes the pad token whatever its input (and so a
    # cached and an uncached decode agree trivially); at 3 its output depends on the encoder input
    "t5": TinyModel(
        "t5",
        "SEQ_2_SEQ_LM",
        AutoModelForSeq2SeqLM,
        lambda h: T5Config(
            vocab_size=VOCAB,
            d_model=h,
            d_ff=2 * h,
            d_kv=8,
            num_layers=2,
            num_heads=4,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
            dropout_rate=0.0,
            initializer_factor=3.0,
        ),
    ),
    "qwen2": TinyModel(
        "qwen2",
        "CAUSAL_LM",
        AutoModelForCausalLM,
        lambda h: Qwen2Config(
            vocab_size=VOCAB,
            hidden_size=h,
            intermediate_size=2 * h,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            initializer_range=0.2,
            tie_word_embeddings=True,
        ),
    ),
    "opt": TinyModel(
        "opt",
        "CAUSAL_LM",
        AutoModelForCausalLM,
        lambda h: OPTConfig(
            vocab_size=VOCAB,
            hidden_size=h,
            ffn_dim=2 * h,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=64,
            word_embed_proj_dim=h,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            init_std=0.2,
            dropout=0.0,
            attention_dropout=0.0,
        ),
    ),
}


@pytest.fixture(params=sorted(TINY_MODELS))
def tiny(request) -> TinyModel:
    return TINY_MODELS[request.param]


def make_batch(tiny: TinyModel, batch_size: int = 4, seq_len: int = 6, seed: int = 0) -> dict:
    """A fixed batch with a learnable target for each kind of model (ids avoid the special tokens 0-2)."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch_size, seq_len), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :2] = 0 if tiny.kind == "causal" else 1  # one left-padded row for causal models
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if tiny.kind == "causal":
        # a continuation the prompt can teach: every next token is 5
        batch["labels"] = torch.full_like(input_ids, 5).masked_fill(attention_mask == 0, -100)
    elif tiny.kind == "seq2seq":
        batch["labels"] = torch.tensor([[5, 6, 7]] * batch_size)
    else:
        batch["labels"] = torch.arange(batch_size) % 2
    return batch


class ListDataset(torch.utils.data.Dataset):
    """Rows of a batch as a map-style dataset the Trainer can iterate."""

    def __init__(self, batch: dict, repeat: int = 1):
        self.rows = [{k: v[i] for k, v in batch.items()} for i in range(len(batch["input_ids"]))] * repeat

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def stack_collator(rows):
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def make_trainer(model, output_dir, dataset, optimizers=(None, None), eval_dataset=None, **overrides) -> Trainer:
    args = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        learning_rate=3e-2,
        max_steps=20,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        disable_tqdm=False,  # True would print every log line to stdout
        lr_scheduler_type="constant",
    )
    args.update(overrides)
    return Trainer(
        model=model,
        args=TrainingArguments(**args),
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        data_collator=stack_collator,
        optimizers=optimizers,
    )


def tiny_tokenizer(directory):
    """A word-level tokenizer for the tiny models' vocabulary (`<pad>`, `<unk>`, `w0` ... `w61`), saved under
    `directory/tok`; its path, as a string."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = os.path.join(str(directory), "tok")
    words = ["<pad>", "<unk>"] + [f"w{i}" for i in range(VOCAB - 2)]
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=raw, unk_token="<unk>", pad_token="<pad>", eos_token="<unk>"
    ).save_pretrained(path)
    return path


def train_losses(trainer: Trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def logits(model, batch: dict) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if "decoder_input_ids" not in inputs and getattr(model.config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = torch.tensor(
            [[model.config.decoder_start_token_id, 5, 7]] * len(batch["input_ids"])
        )
    with torch.no_grad():
        return model(**inputs).logits


def greedy_reference(model, batch, steps, **forward_kwargs):
    """Greedy decoding with full forward passes (no cache), the reference for generate(min_new_tokens=steps),
    which never picks the end-of-sequence token."""
    input_ids, mask = batch["input_ids"], batch["attention_mask"]
    eos = model.config.eos_token_id
    if model.config.is_encoder_decoder:
        out = torch.full((len(input_ids), 1), model.config.decoder_start_token_id)
        for _ in range(steps):
            with torch.no_grad():
                step = model(input_ids=input_ids, attention_mask=mask, decoder_input_ids=out, **forward_kwargs).logits[
                    :, -1
                ]
            step[:, eos] = float("-inf")
            out = torch.cat([out, step.argmax(-1, keepdim=True)], dim=1)
        return out[:, 1:]
    out = input_ids
    for _ in range(steps):
        with torch.no_grad():
            step = model(input_ids=out, attention_mask=mask, **forward_kwargs).logits[:, -1]
        step[:, eos] = float("-inf")
        out = torch.cat([out, step.argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return out[:, input_ids.shape[1] :]
