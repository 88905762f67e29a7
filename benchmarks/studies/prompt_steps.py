"""How far the first optimizer steps move the prompt the model sees, per prompt method, at the same learning rate.

Claim 1 sweeps the same learning rates for plain and residual prompt tuning. AdamW's first step moves every
trainable parameter by about `lr`, so a plainly tuned prompt token moves by `lr * sqrt(hidden)`. A prompt made by
an MLP moves by the combined moves of all the MLP's weights, which can be far more. For the benchmark's prompt
configs (20 tokens, vocab init, bottleneck 400) on a benchmark model, this prints the step-0 prompt's token norm,
its cosine similarity with the vocabulary embeddings it was initialised from, and the mean per-token move of the
prompt in each of the first AdamW steps on one fixed random linear objective (the same for every method), ending
with the cosine similarity between the prompt after those steps and the step-0 prompt.

    python -m benchmarks study prompt-steps --model smollm2 --lr 0.01
"""

from __future__ import annotations

import torch
from peft import PeftModel, PromptTuningConfig, TaskType, get_peft_model

import peft_prompt_transfer as ppt
from benchmarks.core.harness import measurement_parser
from benchmarks.core.specs import RESIDUAL_BOTTLENECK


def prompt_configs(task_type: str, num_virtual_tokens: int = 20, bottleneck_size: int = RESIDUAL_BOTTLENECK) -> dict:
    """The claim-1 configs from the vocab init: plain prompt tuning, residual, residual without LayerNorm, and
    residual with the branch scaled to the word embeddings' RMS."""
    common = dict(task_type=task_type, num_virtual_tokens=num_virtual_tokens, prompt_tuning_init="SAMPLE_VOCAB")
    residual = dict(common, bottleneck_size=bottleneck_size)
    return {
        "prompt_tuning": PromptTuningConfig(**common),
        "residual": ppt.ResidualPromptConfig(**residual),
        "residual_no_layer_norm": ppt.ResidualPromptConfig(**residual, layer_norm=False),
        "residual_embedding_rms": ppt.ResidualPromptConfig(**residual, branch_scale="embedding_rms"),
    }


def first_steps(model: PeftModel, lr: float, steps: int = 5, seed: int = 0) -> dict:
    """Train only the prompt on `<prompt, g>` for a fixed random `g`; report how the prompt moves."""
    model.train()  # the residual MLP is applied while training (folded otherwise)
    encoder = model.prompt_encoder[model.active_adapter]
    vocab_init = encoder.embedding.weight.detach().clone()  # the raw prompt: sampled vocabulary embeddings

    def prompt() -> torch.Tensor:  # what the transformer sees
        return model.get_prompt(batch_size=1)[0]

    start = prompt().detach()
    direction = torch.randn(start.shape, generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.AdamW([p for p in encoder.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    moves, current = [], start
    for _ in range(steps):
        optimizer.zero_grad()
        (prompt() * direction).sum().backward()
        optimizer.step()
        new = prompt().detach()
        moves.append((new - current).norm(dim=-1).mean().item())
        current = new
    cosine = torch.nn.functional.cosine_similarity
    return {
        "step0_norm": start.norm(dim=-1).mean().item(),
        "vocab_norm": vocab_init.norm(dim=-1).mean().item(),
        "step0_cosine_to_vocab_init": cosine(start, vocab_init, dim=-1).mean().item(),
        "moves": moves,
        "cosine_to_step0": cosine(current, start, dim=-1).mean().item(),
    }


def main(argv=None) -> None:
    from benchmarks.core.models import load_causal_lm, load_classifier

    parser = measurement_parser("study prompt-steps", __doc__)
    parser.add_argument("--model", choices=("minilm", "smollm2"), default="smollm2")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)
    causal = args.model == "smollm2"
    task_type = TaskType.CAUSAL_LM if causal else TaskType.SEQ_CLS
    print(f"{args.model}, AdamW lr {args.lr:g}: mean per-token norms and moves of the prompt the model sees")
    print(
        "| method | step-0 norm (vocab init) | step-0 cosine to vocab init | move in steps 1.."
        f"{args.steps} | cosine to step 0 after {args.steps} |"
    )
    print("|---|---:|---:|---|---:|")
    for name, config in prompt_configs(task_type).items():
        torch.manual_seed(13)
        base = load_causal_lm(args.model)[1] if causal else load_classifier(args.model, 2)[1]
        result = first_steps(get_peft_model(base, config), args.lr, args.steps)
        print(
            f"| {name} | {result['step0_norm']:.2f} ({result['vocab_norm']:.2f}) | "
            f"{result['step0_cosine_to_vocab_init']:.2f} | {' '.join(f'{m:.2f}' for m in result['moves'])} | "
            f"{result['cosine_to_step0']:.2f} |"
        )


if __name__ == "__main__":
    main()
