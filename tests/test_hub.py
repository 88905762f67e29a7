"""The Hugging Face Hub: downloads from a real Hub-protocol server, and what push_to_hub uploads.

Downloads: olah (see hub_server.py) serves git repositories, each holding two versions of an adapter as
`save_pretrained` wrote them, offline on 127.0.0.1. A fresh interpreter with `HF_ENDPOINT` pointing at it loads
`PeftModel.from_pretrained(base, "org/name", revision=...)` and must reproduce the logits of the version asked for.

Uploads: no server here accepts them, so push_to_hub runs with `HfApi.create_repo` / `HfApi.create_commit`
intercepted, and what it would upload is compared with what `save_pretrained` writes.
"""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import hub_server
import pytest
import torch
from conftest import TINY_MODELS, logits, make_batch
from huggingface_hub import HfApi, ModelCard, RepoUrl, constants
from peft import get_peft_model

from peft_prompt_transfer import BayesianPromptConfig, ComPTConfig, PromptLibrary, ResidualPromptConfig
from peft_prompt_transfer.bayesian import load_posterior

N_TOKENS = 4


@dataclass
class Hub:
    url: str
    mirrors: Path

    def publish(self, repo_id: str, versions: list[Path]) -> list[str]:
        return hub_server.publish(self.mirrors, repo_id, versions)

    def check(self, checks: list[dict], work_dir: Path, endpoint: Optional[str] = None) -> None:
        """Run `checks` in a fresh interpreter against this Hub (or `endpoint`), with the Hugging Face cache of
        `work_dir`; every one must pass."""
        spec = work_dir / "checks.pt"
        torch.save(checks, spec)
        result = hub_server.run_client(endpoint or self.url, spec, work_dir)
        assert result.returncode == 0, f"the Hub client failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
        done = [line for line in result.stdout.splitlines() if line.startswith("ok ")]
        assert done == [f"ok {check['name']}" for check in checks], result.stdout


@pytest.fixture(scope="session")
def hub(tmp_path_factory) -> Iterator[Hub]:
    if importlib.util.find_spec("olah") is None:
        pytest.skip("olah (the local Hub server) is not installed: pip install -e '.[test]'")
    work_dir = tmp_path_factory.mktemp("hub")
    mirrors = work_dir / "mirrors"
    mirrors.mkdir()
    with hub_server.olah_server(mirrors, work_dir) as url:
        yield Hub(url, mirrors)


def save_versions(tmp_path: Path, name: str, make_model, inputs: dict) -> tuple[list[Path], list[torch.Tensor]]:
    """Versions 1 and 2 of an adapter, `make_model(version)` after `torch.manual_seed(version)` (so their random
    initialisations differ), saved to tmp_path/name-v1 and -v2; returns the folders and their logits on `inputs`."""
    folders, outputs = [], []
    for version in (1, 2):
        torch.manual_seed(version)
        model = make_model(version).eval()
        folder = tmp_path / f"{name}-v{version}"
        model.save_pretrained(folder)
        folders.append(folder)
        outputs.append(logits(model, inputs))
    # otherwise loading the wrong revision would go unnoticed
    assert (outputs[0] - outputs[1]).abs().max() > 1e-2
    return folders, outputs


def client_base(tiny, tmp_path: Path) -> dict:
    """How the client builds the base model: from the folder where tiny.saved(tmp_path) saved it."""
    return dict(auto_class=tiny.auto_cls.__name__, base=tiny.saved(tmp_path).name_or_path)


def inputs_for(tiny, **extra) -> dict:
    inputs = {k: v for k, v in make_batch(tiny, seed=3).items() if k != "labels"}
    if tiny.kind == "seq2seq":  # passed explicitly, so the client's forward gets exactly what logits() used
        inputs["decoder_input_ids"] = torch.tensor([[0, 5, 7]] * len(inputs["input_ids"]))
    return {**inputs, **extra}


# ---------------------------------------------------------------------------------------------
# downloads from the server
# ---------------------------------------------------------------------------------------------


HUB_ADAPTERS = {  # method -> (tiny model, its config, extra inputs)
    "residual": (
        "gpt2",
        lambda tiny: ResidualPromptConfig(task_type=tiny.task_type, num_virtual_tokens=N_TOKENS, bottleneck_size=16),
        {},
    ),
    "compt": (
        "bert",
        lambda tiny: ComPTConfig(
            task_type=tiny.task_type,
            task_names=["alpha", "beta", "gamma"],
            num_source_prompts=3,
            num_virtual_tokens=N_TOKENS,
        ),
        {"task_ids": torch.tensor([0, 1, 2, 1])},
    ),
}


@pytest.mark.parametrize("method", list(HUB_ADAPTERS))
def test_adapter_from_the_hub_at_each_revision(hub, tmp_path, method):
    model_name, make_config, extra_inputs = HUB_ADAPTERS[method]
    tiny = TINY_MODELS[model_name]
    inputs = inputs_for(tiny, **extra_inputs)
    folders, (old, new) = save_versions(
        tmp_path, method, lambda version: get_peft_model(tiny.saved(tmp_path), make_config(tiny)), inputs
    )
    first, _ = hub.publish(f"org/{method}", folders)

    check = dict(client_base(tiny, tmp_path), adapter=f"org/{method}", inputs=inputs)
    # (a commit id is looked up in the client's cache before the server is asked, so it goes first)
    hub.check(
        [
            dict(check, name="commit of v1", revision=first, expected_logits=old),
            dict(check, name="tag v1", revision="v1", expected_logits=old),
            dict(check, name="tag v2", revision="v2", expected_logits=new),
            dict(check, name="main", revision=None, expected_logits=new),
        ],
        tmp_path,
    )


def test_bayesian_posterior_and_target_from_the_hub(hub, tmp_path):
    """The posterior and a target adapter load from the Hub at each revision, and a target built for training
    with posterior="org/posterior" starts from the mean of the posterior at posterior_revision."""
    tiny = TINY_MODELS["t5"]
    inputs = inputs_for(tiny)
    posteriors, (old_posterior, new_posterior) = save_versions(
        tmp_path,
        "posterior",
        lambda version: get_peft_model(
            tiny.saved(tmp_path),
            BayesianPromptConfig(task_type=tiny.task_type, num_virtual_tokens=N_TOKENS, num_particles=3),
        ),
        inputs,
    )
    means = [load_posterior(folder).mean() for folder in posteriors]
    # each target version starts from the posterior version of the same number (saved as a local directory here)
    targets, (old_target, new_target) = save_versions(
        tmp_path,
        "target",
        lambda version: get_peft_model(
            tiny.saved(tmp_path),
            BayesianPromptConfig(
                task_type=tiny.task_type,
                num_virtual_tokens=N_TOKENS,
                stage="target",
                posterior=str(posteriors[version - 1]),
            ),
        ),
        inputs,
    )
    first_posterior, _ = hub.publish("org/posterior", posteriors)
    first_target, _ = hub.publish("org/target", targets)

    model = client_base(tiny, tmp_path)
    target = dict(task_type=tiny.task_type, num_virtual_tokens=N_TOKENS, stage="target", posterior="org/posterior")
    hub.check(
        [
            dict(model, name="new target from the posterior at main", target_config=target, expected_prompt=means[1]),
            dict(
                model,
                name="new target from the posterior at v1",
                target_config=dict(target, posterior_revision=first_posterior),
                expected_prompt=means[0],
            ),
            dict(
                model,
                name="new target from a missing revision",
                target_config=dict(target, posterior_revision="no-such-revision"),
                expected_error=r"Cannot find the posterior 'org/posterior': it is not a local directory, and downloading "
                r"adapter_config.json from the Hugging Face Hub repo 'org/posterior' at revision "
                r"'no-such-revision' failed",
            ),
            dict(
                model,
                name="posterior at main",
                adapter="org/posterior",
                revision=None,
                inputs=inputs,
                expected_logits=new_posterior,
            ),
            dict(
                model,
                name="posterior at v1",
                adapter="org/posterior",
                revision="v1",
                inputs=inputs,
                expected_logits=old_posterior,
            ),
            dict(
                model,
                name="target at v1",
                adapter="org/target",
                revision=first_target,
                inputs=inputs,
                expected_logits=old_target,
            ),
            dict(
                model,
                name="target at main",
                adapter="org/target",
                revision=None,
                inputs=inputs,
                expected_logits=new_target,
            ),
        ],
        tmp_path,
    )


def intercept_pushes(monkeypatch) -> list[tuple[str, dict[str, bytes]]]:
    """Intercept the Hub calls of a push (`HfApi.create_repo`, `HfApi.create_commit`); returns the list that each
    commit is appended to, as (repo id, {path in the repo: bytes})."""
    commits = []

    def create_repo(self, repo_id, **kwargs):
        return RepoUrl(f"{constants.ENDPOINT}/{repo_id}", endpoint=constants.ENDPOINT)

    def create_commit(self, repo_id, operations, **kwargs):
        # the files exist only during the call (push_to_hub writes them to a temporary directory)
        commits.append((repo_id, {op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations}))

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    # Any other Hub request fails instead of leaving the machine. Reading the new repo's model card then finds
    # none, as on a freshly created repo.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return commits


def library_versions(tmp_path: Path) -> tuple[object, list[Path], list[dict[str, torch.Tensor]]]:
    """Versions 1 and 2 of a prompt library of two entries on tiny Llama (random prompts of another seed each),
    saved to tmp_path/library-v1 and -v2; returns the base model, the folders and their prompts."""
    tiny = TINY_MODELS["llama"]
    base = tiny.saved(tmp_path)
    folders, prompts = [], []
    for version in (1, 2):
        g = torch.Generator().manual_seed(version)
        library = PromptLibrary(base)
        for name in ("alpha", "beta"):
            library.add(name, torch.randn(N_TOKENS, base.config.hidden_size, generator=g), task_type="CAUSAL_LM")
        folder = tmp_path / f"library-v{version}"
        library.save_pretrained(folder)
        folders.append(folder)
        prompts.append({entry.name: entry.prompt for entry in library})
    return base, folders, prompts


def test_prompt_library_from_the_hub_at_each_revision(hub, tmp_path):
    """A library pushed in two versions loads from the Hub at each revision with the prompts of that version, and
    ranks on the client as it ranks here."""
    base, folders, prompts = library_versions(tmp_path)
    examples = [
        {"input_ids": [3, 4, 5, 6], "labels": [-100, -100, -100, 6]},
        {"input_ids": [7, 8, 9], "labels": [-100, 9, 9]},
    ]
    rankings = [
        [
            name
            for name, _ in PromptLibrary.from_pretrained(folder).rank(
                base, examples, include_current=False, progress=False
            )
        ]
        for folder in folders
    ]
    first, _ = hub.publish("org/library", folders)
    check = dict(client_base(TINY_MODELS["llama"], tmp_path), library="org/library", examples=examples)
    hub.check(
        [
            dict(
                check,
                name="library commit of v1",
                revision=first,
                expected_prompts=prompts[0],
                expected_ranking=rankings[0],
            ),
            dict(
                check, name="library tag v1", revision="v1", expected_prompts=prompts[0], expected_ranking=rankings[0]
            ),
            dict(check, name="library main", revision=None, expected_prompts=prompts[1], expected_ranking=rankings[1]),
        ],
        tmp_path,
    )


def test_prompt_library_from_adapters_on_the_hub_at_a_revision(hub, tmp_path):
    """from_adapters reads a residual adapter from a Hub repo id at the revision asked for: its folded prompt."""
    tiny = TINY_MODELS["gpt2"]
    prompts = []

    def make_model(version):
        model = get_peft_model(
            tiny.saved(tmp_path),
            ResidualPromptConfig(task_type=tiny.task_type, num_virtual_tokens=N_TOKENS, bottleneck_size=16),
        )
        prompts.append(model.prompt_encoder["default"].inference_prompt())
        return model

    folders, _ = save_versions(tmp_path, "residual-library", make_model, inputs_for(tiny))
    hub.publish("org/residual-library", folders)
    check = dict(client_base(tiny, tmp_path), library_adapters={"res": "org/residual-library"})
    hub.check(
        [
            dict(check, name="library from the adapter at v1", revision="v1", expected_prompts={"res": prompts[0]}),
            dict(check, name="library from the adapter at main", revision=None, expected_prompts={"res": prompts[1]}),
        ],
        tmp_path,
    )


def test_prompt_library_and_its_adapters_from_hub_subfolders_and_then_from_the_cache_alone(hub, tmp_path):
    """One repo holds a library and an adapter in subfolders: from_pretrained and from_adapters read them with
    subfolder=, and then again with local_files_only=True from the cache alone, nothing answering at the endpoint
    (peft's own weight loader would ask the Hub whether the file exists, and look in the subfolder twice)."""
    base, folders, prompts = library_versions(tmp_path)
    tiny = TINY_MODELS["llama"]
    torch.manual_seed(5)
    adapter = get_peft_model(
        tiny.saved(tmp_path), ResidualPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=N_TOKENS)
    )
    nested = tmp_path / "nested"
    shutil.copytree(folders[0], nested / "library")
    adapter.save_pretrained(nested / "adapter")
    hub.publish("org/nested", [nested])
    examples = [{"input_ids": [3, 4, 5, 6], "labels": [-100, -100, -100, 6]}]
    ranking = [
        name
        for name, _ in PromptLibrary.from_pretrained(folders[0]).rank(
            base, examples, include_current=False, progress=False
        )
    ]
    library = dict(
        client_base(tiny, tmp_path),
        revision=None,
        library="org/nested",
        examples=examples,
        expected_prompts=prompts[0],
        expected_ranking=ranking,
    )
    adapters = dict(
        client_base(tiny, tmp_path),
        revision=None,
        library_adapters={"res": "org/nested"},
        expected_prompts={"res": adapter.prompt_encoder["default"].inference_prompt().detach()},
    )
    hub.check(
        [
            dict(library, name="library in a subfolder", hub_options={"subfolder": "library"}),
            dict(adapters, name="adapter in a subfolder", hub_options={"subfolder": "adapter"}),
        ],
        tmp_path,
    )
    cached = {"local_files_only": True}
    hub.check(  # the same cache, and nothing answers at the endpoint
        [
            dict(library, name="library from the cache", hub_options={"subfolder": "library", **cached}),
            dict(adapters, name="adapter from the cache", hub_options={"subfolder": "adapter", **cached}),
        ],
        tmp_path,
        endpoint="http://127.0.0.1:9",
    )


def test_prompt_library_push_to_hub_uploads_what_save_pretrained_writes(tmp_path, monkeypatch):
    _, folders, _ = library_versions(tmp_path)
    library = PromptLibrary.from_pretrained(folders[0])
    commits = intercept_pushes(monkeypatch)
    library.push_to_hub("someone/prompt-library")
    library.save_pretrained(tmp_path / "saved")
    assert [repo_id for repo_id, _ in commits] == ["someone/prompt-library"]  # one commit, to the repo asked for
    saved = {path.name: path.read_bytes() for path in (tmp_path / "saved").iterdir()}
    assert sorted(commits[0][1]) == sorted(saved) == ["README.md", "prompt_library.json", "prompt_library.safetensors"]
    assert commits[0][1] == saved
    card = ModelCard(saved["README.md"].decode())
    assert {"peft-prompt-transfer", "prompt-library"} <= set(card.data.tags)
    assert card.data.base_model == library.base_model_record["name_or_path"]


# ---------------------------------------------------------------------------------------------
# push_to_hub
# ---------------------------------------------------------------------------------------------

PUSH_METHODS = {  # method tag -> (tiny model, config)
    "residual_prompt_tuning": (
        "gpt2",
        lambda tiny: ResidualPromptConfig(task_type=tiny.task_type, num_virtual_tokens=N_TOKENS, bottleneck_size=16),
    ),
    "compt": (
        "bert",
        lambda tiny: ComPTConfig(
            task_type=tiny.task_type, task_names=["alpha", "beta"], num_source_prompts=2, num_virtual_tokens=N_TOKENS
        ),
    ),
    "bayesian_prompt_tuning": (
        "t5",
        lambda tiny: BayesianPromptConfig(task_type=tiny.task_type, num_virtual_tokens=N_TOKENS, num_particles=3),
    ),
}


@dataclass
class Pushed:
    files: dict[str, bytes]  # what push_to_hub would upload, by path in the repo
    saved: Path  # what save_pretrained writes
    base_model: str
    method_tag: str


@pytest.fixture(params=sorted(PUSH_METHODS))
def pushed(request, tmp_path, monkeypatch) -> Pushed:
    """push_to_hub to a new repo, with its two Hub calls intercepted, and save_pretrained of the same model."""
    name, make_config = PUSH_METHODS[request.param]
    tiny = TINY_MODELS[name]
    model = get_peft_model(tiny.saved(tmp_path), make_config(tiny))
    commits = intercept_pushes(monkeypatch)
    model.push_to_hub("someone/pushed-prompt")
    model.save_pretrained(tmp_path / "saved")
    assert [repo_id for repo_id, _ in commits] == ["someone/pushed-prompt"]  # one commit, to the repo asked for
    return Pushed(commits[0][1], tmp_path / "saved", model.base_model.name_or_path, request.param)


def test_push_to_hub_uploads_the_adapter_that_save_pretrained_writes(pushed):
    saved = {path.name: path.read_bytes() for path in pushed.saved.iterdir()}
    assert sorted(pushed.files) == sorted(saved) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert pushed.files[name] == saved[name], name


def test_push_to_hub_uploads_the_model_card_that_save_pretrained_writes(pushed):
    card = ModelCard(pushed.files["README.md"].decode())
    assert card.data.library_name == "peft"
    assert card.data.base_model == pushed.base_model
    assert {"peft-prompt-transfer", pushed.method_tag} <= set(card.data.tags)
    assert "import peft_prompt_transfer" in card.text
    saved = ModelCard.load(pushed.saved / "README.md")
    assert card.data.to_dict() == saved.data.to_dict()
    assert card.text == saved.text
