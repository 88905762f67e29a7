"""Train one method with the stock Trainer, in one process or as one rank of a torchrun / accelerate launch.

Used by tests/test_distributed.py: the same global batch (4 examples per step) is either one process's batch or
2 processes x 2 examples (DDP or, with --fsdp fsdp2 or fsdp2-sharded, FSDP2; gloo backend on the CPU). Rank 0 writes
the losses, the trained adapter state (state.safetensors) and the package it imported (run.json); every rank takes
part in `save_pretrained` into DIR/adapter and in `Trainer.save_model` into DIR/trainer. With --save-steps N the
Trainer also writes its checkpoints (DIR/checkpoint-N, ...), and --resume-from DIR/checkpoint-N continues such a run
in a fresh launch, with `trainer.train(resume_from_checkpoint=...)`. With --library begin|end every rank also builds a
prompt library from the model, ranks it and initialises the adapter from it (`library_steps`), when training begins
(sharded, before any forward) or after it ends; rank 0 saves the library (DIR/library), the ranking (run.json) and
the adapter state after `initialize` (DIR/initialized.safetensors).

    python tests/ddp_worker.py --method compt --out DIR --per-device-batch 4
    torchrun --nproc_per_node 2 tests/ddp_worker.py --method compt --out DIR --per-device-batch 2 [--fsdp fsdp2]
    torchrun ... --fsdp fsdp2-sharded --save-steps 2 --out DIR
    torchrun ... --fsdp fsdp2-sharded --save-steps 2 --out DIR2 --resume-from DIR/checkpoint-2
    torchrun ... --fsdp fsdp2 --library begin --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from accelerate import PartialState  # noqa: E402
from accelerate.utils import DistributedType  # noqa: E402
from conftest import TINY_MODELS, ListDataset, stack_collator  # noqa: E402
from peft import get_peft_model  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

import peft_prompt_transfer  # noqa: E402
from peft_prompt_transfer import BayesianPromptConfig, ComPTConfig, PromptLibrary, ResidualPromptConfig  # noqa: E402

# shared_prefix="on": the batches are too small for "auto" to share, and the shared path must survive DDP and FSDP2
CONFIGS = {
    "residual": lambda: ResidualPromptConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=4, bottleneck_size=8, shared_prefix="on"
    ),
    "compt": lambda: ComPTConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=4,
        task_names=["a", "b", "c"],
        num_source_prompts=2,
        normalization="sparsemax",
        shared_prefix="on",
    ),
    "bayesian": lambda: BayesianPromptConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=4, num_particles=2, shared_prefix="on"
    ),
}


# the Trainer's FSDP settings (what an accelerate config's fsdp_config says): each GPT-2 block is a unit, the
# PeftModel (with the prompt encoder, the embeddings and the head) the root
FSDP_CONFIGS = {
    "fsdp2": {"version": 2, "transformer_layer_cls_to_wrap": ["GPT2Block"], "reshard_after_forward": True},
}
# the same, with checkpoints written as sharded (torch.distributed.checkpoint) instead of full state dicts
FSDP_CONFIGS["fsdp2-sharded"] = {**FSDP_CONFIGS["fsdp2"], "state_dict_type": "SHARDED_STATE_DICT"}


class CountSteps(TrainerCallback):
    """Counts the optimizer steps this launch takes (a resumed run takes only those after the checkpoint)."""

    def __init__(self):
        self.count = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.count += 1


def dataset(method: str) -> ListDataset:
    """4 examples of equal length (so a mean over 4 equals the mean of two means over 2).

    The Trainer shuffles differently with one and with two processes, so every step must see all 4 examples;
    for the SVGD source stage, where row b of a batch goes to particle b mod M, the 4 examples are identical so
    that the pairing of examples with particles cannot depend on the order either.
    """
    generator = torch.Generator().manual_seed(0)
    if method == "bayesian":
        input_ids = torch.randint(3, 64, (1, 6), generator=generator).repeat(4, 1)
    else:
        input_ids = torch.randint(3, 64, (4, 6), generator=generator)
    batch = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": torch.full_like(input_ids, 5),
    }
    if method == "compt":
        batch["task_ids"] = torch.tensor([0, 2, 1, 2])  # batches mix tasks
    return ListDataset(batch)


# what `library_steps` initialises each method from: one entry, or one per source prompt or particle
INITIAL_ENTRIES = {
    "residual": ["trained"],
    "compt": ["trained/c", "trained/a"],
    "bayesian": ["trained/particle-1", "trained/particle-0"],
}


def library_steps(model, method: str, out: str, is_main: bool) -> dict:
    """On every rank of a (possibly FSDP2-sharded) model: build a prompt library from it, rank the library on the
    training examples, and initialise the adapter from entries. Rank 0 saves the library to OUT/library; returns the
    ranking and the adapter state after `initialize`."""
    library = PromptLibrary.from_adapters(model, {"trained": model})
    if is_main:
        library.save_pretrained(os.path.join(out, "library"))
    examples = [{key: value.tolist() for key, value in row.items() if key != "task_ids"} for row in dataset(method)]
    ranking = library.rank(model, examples, task=0 if method == "compt" else None, batch_size=2, progress=False)
    library.initialize(model, INITIAL_ENTRIES[method])
    state = {k: v.contiguous() for k, v in model.prompt_encoder["default"].whole_adapter_state_dict().items()}
    return {"ranking": ranking, "initialized": state}


class LibraryAtTrainBegin(TrainerCallback):
    """`library_steps` when training begins: under FSDP2 the model is sharded then and has not run forward yet."""

    def __init__(self, method: str, out: str):
        self.method, self.out, self.result = method, out, None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.result = library_steps(model, self.method, self.out, state.is_world_process_zero)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", choices=sorted(CONFIGS), required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--per-device-batch", type=int, required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--fsdp", choices=sorted(FSDP_CONFIGS), help="shard the model with FSDP2 instead of DDP")
    parser.add_argument("--save-steps", type=int, help="write a Trainer checkpoint every this many steps")
    parser.add_argument("--resume-from", help="a Trainer checkpoint to resume from (resume_from_checkpoint)")
    parser.add_argument(
        "--library", choices=("begin", "end"), help="run `library_steps` on the model when training begins or ends"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)

    base = TINY_MODELS["gpt2"].build()
    for module in base.modules():  # dropout masks differ between 1 and 2 processes; nothing else may
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model = get_peft_model(base, CONFIGS[args.method]())
    training_args = TrainingArguments(
        output_dir=args.out,
        per_device_train_batch_size=args.per_device_batch,
        max_steps=args.steps,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,  # 500: the default, unused without saving
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        remove_unused_columns=False,
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        ddp_find_unused_parameters=False,
        fsdp="full_shard" if args.fsdp else None,
        fsdp_config=FSDP_CONFIGS.get(args.fsdp),
    )
    if args.fsdp and training_args.world_size > 1:
        # accelerate turns FSDP on only for accelerator devices (GPU, XPU, NPU, ...), and on the CPU silently trains
        # with DDP instead; presenting the CPU process group as a GPU one makes it shard, on the CPU, with gloo
        PartialState().distributed_type = DistributedType.MULTI_GPU
    steps_taken = CountSteps()
    library_at_begin = LibraryAtTrainBegin(args.method, args.out)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=dataset(args.method),
        data_collator=stack_collator,
        callbacks=[steps_taken] + ([library_at_begin] if args.library == "begin" else []),
    )
    trainer.train(resume_from_checkpoint=args.resume_from)
    # every rank takes part: under FSDP2 the adapter's parameters are sharded and saving gathers them
    state = {k: v.contiguous() for k, v in model.prompt_encoder["default"].whole_adapter_state_dict().items()}
    model.save_pretrained(os.path.join(args.out, "adapter"), is_main_process=trainer.is_world_process_zero())
    # under FSDP2: a full state dict, saved by rank 0 only (with SHARDED_STATE_DICT the Trainer writes no model here)
    trainer.save_model(os.path.join(args.out, "trainer"))
    library = library_at_begin.result
    if args.library == "end":
        library = library_steps(model, args.method, args.out, trainer.is_world_process_zero())
    if trainer.is_world_process_zero():
        save_file(state, os.path.join(args.out, "state.safetensors"))
        if library:
            save_file(library["initialized"], os.path.join(args.out, "initialized.safetensors"))
        # a resumed run's history starts with the checkpoint's: `steps` says which step each loss was logged at
        logged = [entry for entry in trainer.state.log_history if "loss" in entry]
        with open(os.path.join(args.out, "run.json"), "w") as f:
            run = {
                "losses": [entry["loss"] for entry in logged],
                "steps": [entry["step"] for entry in logged],
                "steps_taken": steps_taken.count,
                "world_size": trainer.args.world_size,
                "package": peft_prompt_transfer.__file__,
                "ranking": library and library["ranking"],
            }
            json.dump(run, f)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # rank 0 has written its files
    # Exit without running destructors: tearing down DDP's gloo process group at interpreter exit can deadlock
    # (the Reducer's destructor joins a gloo thread that waits for the GIL) or abort ("terminate called without
    # an active exception"), a torch shutdown issue unrelated to training.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
