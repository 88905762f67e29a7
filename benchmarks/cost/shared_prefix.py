"""The cost of the shared-prefix path on SmolLM2-135M, against concatenation and against peft PROMPT_TUNING, on a
grid of prompt lengths P, input lengths L and batch sizes B. `--measure` picks what a run measures:

- `step` (the default): one training step (forward, backward, AdamW step; language-modelling loss over the whole
  sequence). In every cell each method trains on its own copy of the base model twice, with `shared_prefix="on"`
  and `"off"`, next to peft's PROMPT_TUNING with the same prompt length; one step of each runs in turn in each of
  `--rounds` interleaved rounds (`ratios.interleaved_seconds`), and every ratio is the median over rounds of the
  paired per-round ratio with a 95% bootstrap interval (`ratios.ratio_with_interval`).
- `memory`: the peak memory of training the same models, each in a fresh process so that the peak is its own
  (`ratios.measure_memory`: on CPU the growth of the peak resident set over the size after loading and reading the
  weights), with the size of the logits the forward returns (B·(P+L) rows of the vocabulary in float32, the same on
  both paths).
- `scoring`: an evaluation forward with labels, without gradients (how `PromptLibrary.rank` and evaluation loops
  score), of each method shared and concatenated and of its `export_kv_prefix` loaded in stock peft
  (`PeftModel.from_pretrained`, a `PREFIX_TUNING` adapter, which runs only the input's positions), next to peft's
  PROMPT_TUNING.
- `saved`: what a training step's forward keeps for its backward pass, the largest part of its peak: the tensors
  `torch.autograd.graph.saved_tensors_hooks` sees, each storage once and the model's weights left out, in three
  kinds: the rows of vocabulary size the loss reads (`vocabulary`), the attention's keys and values (`attention`,
  `[B, heads, positions, head_dim]`, the rows' over the prompt's positions too) and the rest (`other`). It counts
  bytes, so it does not depend on the machine's load.
- `generate`: greedy `generate` of 16 new tokens (`min_new_tokens` too, so every call decodes 16 steps) after the
  prefill, shared and concatenated, next to PROMPT_TUNING's; the export's too where stock peft's prefix `generate`
  gives the tokens of the plugin's shared path on the versions installed, and otherwise a record that says it does
  not.

Beside the ratios stands the token bound `(U·P + B·L) / (B·(P+L))`, the fraction of the concatenated path's
positions that the shared path runs for U distinct prompts: in training 1 for residual, the tasks present for ComPT
(2), the particles for a Bayesian source (4); in evaluation the Bayesian source uses its posterior mean (U=1). The
export's bound is `L / (P+L)`: its prompt positions are never run.

Cells already in `--output` are kept and skipped, so an interrupted grid resumes where it stopped; each record names
the command that measured it.

    python -m benchmarks cost shared-prefix [--measure step|memory|saved|scoring|generate] [--cells 100,64,8 20,64,8 ...]
                                            [--methods RESIDUAL_PROMPT_TUNING ...] [--rounds 10] [--threads 2]
                                            [--output benchmarks/results/shared_prefix.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile

from benchmarks.cost.ratios import (
    NUM_TASKS,
    OURS,
    _device,
    _inputs,
    _load_base,
    _synchronize,
    in_fresh_process,
    interleaved_seconds,
    measure_memory,
    peft_config,
    ratio_with_interval,
    training,
)

# the grid: P in {10, 20, 100}, L in {32, 64, 128}, B in {8, 32}
DEFAULT_CELLS = tuple(f"{p},{length},{b}" for p in (10, 20, 100) for length in (32, 64, 128) for b in (8, 32))
NUM_PARTICLES = 4  # ratios.peft_config's Bayesian source stage
NEW_TOKENS = 16  # generate: new tokens after the prefill
# each measure's records in --output ("records" is the step's, the first measured)
RECORD_KEYS = {"step": "records", "memory": "memory", "saved": "saved", "scoring": "scoring", "generate": "generate"}
SAVED_KINDS = ("vocabulary", "attention", "other")


def distinct_prompts(method: str, batch_size: int, training: bool = True) -> int:
    """U: how many distinct prompts a batch of the cost benchmark holds for `method` (in evaluation a Bayesian
    source uses its posterior mean)."""
    if method == "COMPT":
        return min(NUM_TASKS, batch_size)
    if method == "BAYESIAN_PROMPT_TUNING" and training:
        return min(NUM_PARTICLES, batch_size)
    return 1


def token_bound(num_distinct: int, num_virtual_tokens: int, length: int, batch_size: int) -> float:
    """The shared path's positions over the concatenated path's: `(U·P + B·L) / (B·(P+L))`."""
    return (num_distinct * num_virtual_tokens + batch_size * length) / (batch_size * (num_virtual_tokens + length))


def parse_cell(cell: str) -> tuple[int, int, int]:
    """`"P,L,B"` as three positive integers."""
    try:
        values = tuple(int(value) for value in cell.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"a cell is P,L,B (three positive integers), got {cell!r}")
    return values


def _cell_args(args, num_virtual_tokens: int, length: int, batch_size: int) -> argparse.Namespace:
    return argparse.Namespace(
        **{**vars(args), "num_virtual_tokens": num_virtual_tokens, "seq_len": length, "batch_size": batch_size}
    )


def _configs(args, cell_args) -> dict:
    """name -> (method, config): peft's PROMPT_TUNING and each method with its prompt shared ("on") and
    concatenated ("off")."""
    configs = {"PROMPT_TUNING": ("PROMPT_TUNING", peft_config("PROMPT_TUNING", cell_args))}
    for method in args.methods:
        for mode in ("on", "off"):
            config = peft_config(method, cell_args)
            config.shared_prefix = mode
            configs[f"{method}/{mode}"] = (method, config)
    return configs


def _cell_record(
    method: str, cell: tuple[int, int, int], training: bool = True, bound_name: str = "token_bound", **values
) -> dict:
    """A record of `method` in the cell `(P, L, B)`, led by the token bound of its distinct prompts there (in training
    or in evaluation), as `bound_name`."""
    num_virtual_tokens, length, batch_size = cell
    bound = token_bound(distinct_prompts(method, batch_size, training), num_virtual_tokens, length, batch_size)
    return {
        "method": method,
        "num_virtual_tokens": num_virtual_tokens,
        "seq_len": length,
        "batch_size": batch_size,
        bound_name: bound,
        **values,
    }


def _timed_ratios(seconds: dict, method: str, reference: str = "PROMPT_TUNING") -> dict:
    """Medians of a method's shared and concatenated calls, and their paired ratios to each other and to peft."""
    shared, concatenated, peft_seconds = seconds[f"{method}/on"], seconds[f"{method}/off"], seconds[reference]
    return {
        "shared_seconds": statistics.median(shared),
        "concatenated_seconds": statistics.median(concatenated),
        "prompt_tuning_seconds": statistics.median(peft_seconds),
        "shared_over_concatenated": ratio_with_interval(shared, concatenated),
        "shared_over_prompt_tuning": ratio_with_interval(shared, peft_seconds),
        "concatenated_over_prompt_tuning": ratio_with_interval(concatenated, peft_seconds),
    }


def measure_cell(args, num_virtual_tokens: int, length: int, batch_size: int) -> list[dict]:
    """The records of one cell: every method's shared and concatenated step against each other and PROMPT_TUNING."""
    import gc

    cell_args = _cell_args(args, num_virtual_tokens, length, batch_size)
    steps = {
        name: training(method, cell_args, config)[1] for name, (method, config) in _configs(args, cell_args).items()
    }
    seconds = interleaved_seconds(steps, args.rounds, args.warmup)
    del steps
    gc.collect()
    return [
        _cell_record(method, (num_virtual_tokens, length, batch_size), **_timed_ratios(seconds, method))
        for method in args.methods
    ]


def memory_cell(args, num_virtual_tokens: int, length: int, batch_size: int) -> list[dict]:
    """The records of one cell: the peak training memory of every method shared and concatenated and of
    PROMPT_TUNING, each measured in a fresh process (`--memory-worker`)."""
    cell_args = _cell_args(args, num_virtual_tokens, length, batch_size)
    peaks = {}
    for name in _configs(args, cell_args):
        options = [
            "benchmarks",
            "cost",
            "shared-prefix",
            "--cells",
            f"{num_virtual_tokens},{length},{batch_size}",
            "--methods",
            *args.methods,
            "--bottleneck-size",
            str(args.bottleneck_size),
            "--warmup",
            str(args.warmup),
            "--threads",
            str(args.threads),
            *(["--cpu"] if args.cpu else []),
            "--memory-worker",
            name,
        ]
        peaks[name] = in_fresh_process(options, name)
    reference = peaks["PROMPT_TUNING"]["peak_training_mb"]
    # the logits the forward returns: B·(P+L) rows of the vocabulary in float32, on either path
    logits_mb = batch_size * (num_virtual_tokens + length) * peaks["PROMPT_TUNING"]["vocab_size"] * 4 / 2**20
    records = _paired_records(
        args,
        (num_virtual_tokens, length, batch_size),
        {name: peak["peak_training_mb"] for name, peak in peaks.items()},
        prompt_tuning_mb=reference,
        logits_mb=logits_mb,
    )
    return [{**record, "shared_over_prompt_tuning": record["shared_mb"] / reference} for record in records]


def _paired_records(args, cell: tuple[int, int, int], measured: dict, total=lambda mb: mb, **values) -> list[dict]:
    """A record per method of `cell`: its shared and concatenated MB (`measured["METHOD/on"]`, `"METHOD/off"`), the
    ratio of their `total`s, and `values`."""
    records = []
    for method in args.methods:
        shared, concatenated = measured[f"{method}/on"], measured[f"{method}/off"]
        records.append(
            _cell_record(
                method,
                cell,
                shared_mb=shared,
                concatenated_mb=concatenated,
                **values,
                shared_over_concatenated=total(shared) / total(concatenated),
            )
        )
    return records


def saved_for_backward(model, inputs: dict) -> dict[str, float]:
    """MB of the tensors one training forward of `model` keeps for its backward pass, by kind (`SAVED_KINDS`), each
    storage counted once and the model's parameters left out."""
    import torch

    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    parameters = {parameter.untyped_storage().data_ptr() for parameter in model.parameters()}
    kinds: dict[int, tuple[str, int]] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            if tensor.dim() and tensor.shape[-1] == config.vocab_size:
                kind = "vocabulary"
            elif tensor.dim() == 4 and tensor.shape[-1] == head_dim:
                kind = "attention"
            else:
                kind = "other"
            kinds.setdefault(storage.data_ptr(), (kind, storage.nbytes()))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(**inputs).loss
    loss.backward()
    return {kind: sum(n for k, n in kinds.values() if k == kind) / 2**20 for kind in SAVED_KINDS}


def saved_cell(args, num_virtual_tokens: int, length: int, batch_size: int) -> list[dict]:
    """The records of one cell: the tensors every method's training forward keeps for backward, shared and
    concatenated (one model at a time)."""
    cell_args = _cell_args(args, num_virtual_tokens, length, batch_size)
    device = _device(cell_args)
    saved = {}
    for name, (method, config) in _configs(args, cell_args).items():
        if name != "PROMPT_TUNING":
            model = training(method, cell_args, config)[0]
            saved[name] = saved_for_backward(model, _inputs(method, cell_args, model.config.vocab_size, device))
            del model
    return _paired_records(
        args, (num_virtual_tokens, length, batch_size), saved, total=lambda kinds: sum(kinds.values())
    )


def _inference_models(args, cell_args, folder: str) -> dict:
    """name -> (model in eval mode, its inputs): PROMPT_TUNING, each method shared and concatenated, and each
    method's `export_kv_prefix` (its first task for ComPT) loaded in stock peft, as `name/exported`."""
    from peft import PeftModel

    import peft_prompt_transfer as ppt

    device = _device(cell_args)
    models = {}
    for name, (method, config) in _configs(args, cell_args).items():
        model = training(method, cell_args, config)[0].eval()
        models[name] = (model, _inputs(method, cell_args, model.config.vocab_size, device))
        if name.endswith("/on"):
            path = os.path.join(folder, method)
            ppt.export_kv_prefix(model, path, task=0 if method == "COMPT" else None)
            exported = PeftModel.from_pretrained(_load_base(cell_args), path).to(device).eval()
            inputs = {k: v for k, v in models[name][1].items() if k != "task_ids"}  # one task's prompt
            models[f"{method}/exported"] = (exported, inputs)
    return models


def scoring_cell(args, num_virtual_tokens: int, length: int, batch_size: int) -> list[dict]:
    """The records of one cell: an evaluation forward with labels, without gradients, of every method shared,
    concatenated and exported, against PROMPT_TUNING's."""
    import torch

    cell_args = _cell_args(args, num_virtual_tokens, length, batch_size)
    device = _device(cell_args)
    with tempfile.TemporaryDirectory() as folder:
        models = _inference_models(args, cell_args, folder)

        def scoring(model, inputs):
            def score():
                with torch.no_grad():
                    model(**inputs)
                _synchronize(device)

            return score

        seconds = interleaved_seconds(
            {name: scoring(model, inputs) for name, (model, inputs) in models.items()}, args.rounds, args.warmup
        )
    return [
        _cell_record(
            method,
            (num_virtual_tokens, length, batch_size),
            training=False,
            exported_token_bound=length / (num_virtual_tokens + length),
            **_timed_ratios(seconds, method),
            exported_seconds=statistics.median(seconds[f"{method}/exported"]),
            exported_over_prompt_tuning=ratio_with_interval(seconds[f"{method}/exported"], seconds["PROMPT_TUNING"]),
        )
        for method in args.methods
    ]


def generate_cell(args, num_virtual_tokens: int, length: int, batch_size: int) -> list[dict]:
    """The records of one cell: greedy `generate` of `NEW_TOKENS` tokens of every method shared and concatenated
    against PROMPT_TUNING's, and of the export where stock peft generates the shared path's tokens."""
    import torch

    cell_args = _cell_args(args, num_virtual_tokens, length, batch_size)
    device = _device(cell_args)
    with tempfile.TemporaryDirectory() as folder:
        models = _inference_models(args, cell_args, folder)

        def generation(model, inputs):
            inputs = {k: v for k, v in inputs.items() if k != "labels"}

            def generate():
                with torch.no_grad():
                    tokens = model.generate(
                        **inputs,
                        max_new_tokens=NEW_TOKENS,
                        min_new_tokens=NEW_TOKENS,
                        do_sample=False,
                        pad_token_id=model.config.eos_token_id,
                    )
                _synchronize(device)
                return tokens[:, -NEW_TOKENS:]

            return generate

        calls = {name: generation(model, inputs) for name, (model, inputs) in models.items()}
        # the export is timed only where stock peft's generate gives the tokens the plugin's shared path gives
        exported_correct = {
            method: torch.equal(calls[f"{method}/exported"](), calls[f"{method}/on"]()) for method in args.methods
        }
        calls = {
            name: call
            for name, call in calls.items()
            if not name.endswith("/exported") or exported_correct[name.split("/")[0]]
        }
        seconds = interleaved_seconds(calls, args.rounds, args.warmup)
    records = []
    for method in args.methods:
        exported = seconds.get(f"{method}/exported")
        records.append(
            _cell_record(
                method,
                (num_virtual_tokens, length, batch_size),
                training=False,
                bound_name="prefill_token_bound",
                new_tokens=NEW_TOKENS,
                **_timed_ratios(seconds, method),
                exported_generates_shared_tokens=exported_correct[method],
                exported_over_prompt_tuning=None
                if exported is None
                else ratio_with_interval(exported, seconds["PROMPT_TUNING"]),
            )
        )
    return records


MEASURE_CELLS = {
    "step": measure_cell,
    "memory": memory_cell,
    "saved": saved_cell,
    "scoring": scoring_cell,
    "generate": generate_cell,
}


def _show(measure: str, record: dict) -> str:
    cell = f"P={record['num_virtual_tokens']} L={record['seq_len']} B={record['batch_size']} {record['method']:<24}"
    ratio = record["shared_over_concatenated"]
    if measure == "saved":
        kinds = ", ".join(
            f"{kind} {record['shared_mb'][kind]:.0f}/{record['concatenated_mb'][kind]:.0f}" for kind in SAVED_KINDS
        )
        return (
            f"{cell} saved for backward shared/concatenated {ratio:.2f} (bound {record['token_bound']:.2f}); MB {kinds}"
        )
    if measure == "memory":
        return (
            f"{cell} peak memory shared/concatenated {ratio:.2f} (bound {record['token_bound']:.2f}), "
            f"shared/PROMPT_TUNING {record['shared_over_prompt_tuning']:.2f}, logits {record['logits_mb']:.0f} MB"
        )
    line = (
        f"{cell} {measure} shared/concatenated {ratio['median']:.2f}x [{ratio['low']:.2f}, {ratio['high']:.2f}], "
        f"shared/PROMPT_TUNING {record['shared_over_prompt_tuning']['median']:.2f}x"
    )
    if record.get("exported_over_prompt_tuning"):
        line += f", exported/PROMPT_TUNING {record['exported_over_prompt_tuning']['median']:.2f}x"
    return line


def main(argv=None) -> list[dict]:
    import torch

    from benchmarks.core.harness import versions

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", choices=("smollm2",))
    parser.add_argument("--measure", default="step", choices=tuple(MEASURE_CELLS))
    parser.add_argument("--cells", nargs="+", type=parse_cell, default=[parse_cell(c) for c in DEFAULT_CELLS])
    parser.add_argument("--methods", nargs="+", default=list(OURS), choices=OURS)
    parser.add_argument("--bottleneck-size", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--cpu", action="store_true", help="stay on the CPU even if CUDA is available")
    parser.add_argument("--output", default=None, help="write the records as JSON here (and resume from it)")
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.memory_worker:  # one model of the first cell, in this process
        cell_args = _cell_args(args, *args.cells[0])
        method, config = _configs(args, cell_args)[args.memory_worker]
        print(json.dumps(measure_memory(method, cell_args, config)))
        return []

    results = {}
    if args.output and os.path.exists(args.output):
        with open(args.output) as f:
            results = json.load(f)
    key = RECORD_KEYS[args.measure]
    records = results.get(key, [])
    done = {(r["method"], r["num_virtual_tokens"], r["seq_len"], r["batch_size"]) for r in records}
    command = "python -m benchmarks cost shared-prefix " + " ".join(argv if argv is not None else [])
    for num_virtual_tokens, length, batch_size in args.cells:
        if all((method, num_virtual_tokens, length, batch_size) in done for method in args.methods):
            continue
        cell = MEASURE_CELLS[args.measure](args, num_virtual_tokens, length, batch_size)
        cell = [{**r, "command": command.strip()} for r in cell]
        records += [r for r in cell if (r["method"], num_virtual_tokens, length, batch_size) not in done]
        for r in cell:
            print(_show(args.measure, r), flush=True)
        if args.output:  # after every cell: a killed grid keeps what it measured
            results = {**results, "versions": versions(), key: records}
            os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
            with open(args.output, "w") as f:
                json.dump(results, f, indent=2)
    return records


if __name__ == "__main__":
    main()
