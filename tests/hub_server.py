"""A real Hugging Face Hub protocol server for the tests, and the client that talks to it.

The server is olah (https://github.com/vtuber-plan/olah), a Hub mirror, run offline on 127.0.0.1: it never
contacts huggingface.co and answers only from local git repositories laid out as
`<mirrors>/models/<org>/<name>`, so `revision=` can be a branch, a tag or a commit id of those repositories.

`huggingface_hub` reads `HF_ENDPOINT` when it is imported, and the test process has imported it already, so the
client side runs in a fresh interpreter: `python hub_server.py SPEC` loads the checks that a test saved to SPEC
with `torch.save`, runs them against the server named by `HF_ENDPOINT` and prints `ok <name>` for each.

Only the standard library is imported at module level, so that the tests can import this module cheaply.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

START_TIMEOUT_S = 60  # olah imports fastapi and uvicorn; a busy 2-core machine needs a few seconds
STOP_TIMEOUT_S = 10
CLIENT_TIMEOUT_S = 180

# A fixed identity and no signing, whatever the machine's git configuration says.
_GIT = [
    "git",
    "-c",
    "user.name=peft-prompt-transfer tests",
    "-c",
    "user.email=tests@localhost",
    "-c",
    "commit.gpgsign=false",
    "-c",
    "tag.gpgsign=false",
    "-c",
    "core.autocrlf=false",
]


def _git(repo: Path, *args: str) -> str:
    result = subprocess.run([*_GIT, *args], cwd=repo, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed in {repo}:\n{result.stdout}{result.stderr}")
    return result.stdout.strip()


def publish(mirrors: Path, repo_id: str, versions: list[Path]) -> list[str]:
    """Create the model repo `repo_id` under `mirrors`, with one commit per folder of `versions` (oldest first).

    Commit i holds exactly the files of `versions[i]` (as `save_pretrained` wrote them) and is tagged `v{i+1}`;
    `main` points at the last one. Returns the commit ids, oldest first.
    """
    repo = mirrors / "models" / repo_id
    repo.mkdir(parents=True)
    _git(repo, "init", "--quiet", "--initial-branch=main")
    commits = []
    for number, folder in enumerate(versions, start=1):
        if commits:
            _git(repo, "rm", "-r", "--quiet", ".")
        for path in folder.iterdir():
            if path.is_dir():  # a subfolder (`subfolder=` on the client)
                shutil.copytree(path, repo / path.name)
            else:
                shutil.copy2(path, repo / path.name)
        _git(repo, "add", "--all")
        _git(repo, "commit", "--quiet", "-m", f"version {number}")
        _git(repo, "tag", f"v{number}")
        commits.append(_git(repo, "rev-parse", "HEAD"))
    return commits


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers(url: str) -> bool:
    """Whether an HTTP server answers at `url` (any status), without any proxy."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True  # an error page is an answer
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def olah_server(mirrors: Path, work_dir: Path) -> Iterator[str]:
    """Run olah offline on 127.0.0.1 with the git repositories under `mirrors`; yield its URL (the HF_ENDPOINT).

    Waits at most START_TIMEOUT_S for the first answer and fails with the server's log if there is none. The
    server is stopped on exit, whatever happened in between.
    """
    port = _free_port()
    netloc = f"127.0.0.1:{port}"
    config = work_dir / "olah.toml"
    config.write_text(
        "[basic]\n"
        f'host = "127.0.0.1"\nport = {port}\n'
        f'repos-path = "{work_dir / "cache"}"\n'  # olah's own download cache, unused offline
        f'mirror-netloc = "{netloc}"\nmirror-lfs-netloc = "{netloc}"\n'
        f'mirrors-path = ["{mirrors}"]\n'
        "[accessibility]\noffline = true\n"
    )
    log_path = work_dir / "olah.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "olah.server", "--config", str(config), "--log-path", str(work_dir / "logs")],
            cwd=work_dir,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    url = f"http://{netloc}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _answers(f"{url}/api/models/none/none/revision/main"):
            if server.poll() is not None:
                raise RuntimeError(
                    f"olah exited with code {server.returncode} before answering on {url}. Its log:\n"
                    f"{log_path.read_text()[-5000:]}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"olah did not answer on {url} within {START_TIMEOUT_S} s. Its log:\n{log_path.read_text()[-5000:]}"
                )
            time.sleep(0.2)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def run_client(endpoint: str, spec_path: Path, work_dir: Path) -> subprocess.CompletedProcess:
    """Run the checks saved in `spec_path` in a fresh interpreter that talks to the Hub at `endpoint`, with the
    Hugging Face cache of `work_dir` (empty on the first run there) and an empty working directory (so a repo id can
    only resolve on the server or from that cache)."""
    home = work_dir / "hf_home"
    cwd = work_dir / "client_cwd"
    cwd.mkdir(exist_ok=True)
    # the client imports the same peft_prompt_transfer as the tests, whether or not it is installed
    package_root = Path(importlib.util.find_spec("peft_prompt_transfer").origin).parents[1]
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(package_root), os.environ.get("PYTHONPATH")])),
        HF_ENDPOINT=endpoint,
        HF_HUB_OFFLINE="0",
        TRANSFORMERS_OFFLINE="0",
        HF_HOME=str(home),
        HF_HUB_CACHE=str(home / "hub"),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_IMPLICIT_TOKEN="1",  # no token of the machine's goes to the test server
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HUB_ETAG_TIMEOUT="10",
        HF_HUB_DOWNLOAD_TIMEOUT="10",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
    )
    return subprocess.run(
        [sys.executable, __file__, str(spec_path)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT_S,
    )


def _client(spec_path: str) -> None:
    """Run each check of the spec, a list of dicts, in order. Each names the base model (`auto_class`, the
    transformers Auto class, and `base`, a local folder) and then either
    - `adapter`, `revision`, `inputs`, `expected_logits`: PeftModel.from_pretrained(base, adapter, revision=revision)
      gives these logits on these inputs; or
    - `target_config` and `expected_prompt`: a Bayesian target built for training with these BayesianPromptConfig
      fields starts from this prompt, which is also its regulariser's anchor; or
    - `target_config` and `expected_error`: building it raises FileNotFoundError matching this regex; or
    - `library`, `revision` and `expected_prompts`: PromptLibrary.from_pretrained(library, revision=revision,
      **hub_options) holds these entries (name -> prompt), in this order, and ranks them on `examples` as
      `expected_ranking` says; or
    - `library_adapters`, `revision` and `expected_prompts`: PromptLibrary.from_adapters(base, library_adapters,
      revision=revision, **hub_options) (entry name -> Hub repo id) holds these entries.
    `hub_options` (optional) are the Hub keywords (`subfolder`, `token`, ...).
    """
    import re

    import torch
    import transformers
    from peft import PeftModel, get_peft_model

    from peft_prompt_transfer import BayesianPromptConfig, PromptLibrary

    for check in torch.load(spec_path):
        base = getattr(transformers, check["auto_class"]).from_pretrained(check["base"]).eval()
        if "library_adapters" in check:
            library = PromptLibrary.from_adapters(
                base, check["library_adapters"], revision=check["revision"], **check.get("hub_options", {})
            )
            assert library.names == list(check["expected_prompts"]), f"{check['name']}: {library.names}"
            for name, prompt in check["expected_prompts"].items():
                torch.testing.assert_close(library[name].prompt, prompt, rtol=0, atol=1e-6)
                assert library[name].origin["source"] == check["library_adapters"][name]
        elif "library" in check:
            library = PromptLibrary.from_pretrained(
                check["library"], revision=check["revision"], **check.get("hub_options", {})
            )
            assert library.names == list(check["expected_prompts"]), f"{check['name']}: {library.names}"
            for name, prompt in check["expected_prompts"].items():
                torch.testing.assert_close(library[name].prompt, prompt, rtol=0, atol=0)
            ranking = library.rank(base, check["examples"], include_current=False, progress=False)
            assert [name for name, _ in ranking] == check["expected_ranking"], f"{check['name']}: {ranking}"
        elif "adapter" in check:
            model = PeftModel.from_pretrained(base, check["adapter"], revision=check["revision"]).eval()
            with torch.no_grad():
                out = model(**check["inputs"]).logits
            torch.testing.assert_close(
                out, check["expected_logits"], atol=1e-5, rtol=0, msg=lambda m: f"{check['name']}: {m}"
            )
        elif "expected_error" in check:
            try:
                get_peft_model(base, BayesianPromptConfig(**check["target_config"]))
            except FileNotFoundError as exc:
                if not re.search(check["expected_error"], str(exc)):
                    raise AssertionError(f"{check['name']}: another message: {exc}") from exc
            else:
                raise AssertionError(f"{check['name']}: no error")
        else:
            encoder = get_peft_model(base, BayesianPromptConfig(**check["target_config"])).prompt_encoder["default"]
            for what, value in (("initial prompt", encoder.embedding.weight.detach()), ("anchor", encoder.mean())):
                torch.testing.assert_close(
                    value, check["expected_prompt"], msg=lambda m: f"{check['name']} {what}: {m}"
                )
        print("ok", check["name"], flush=True)


if __name__ == "__main__":
    _client(sys.argv[1])
