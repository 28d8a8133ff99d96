"""`python -m cast_mlx.publish`: a run's adapter folder and model card handed to a fake
`huggingface_hub.HfApi` (offline), `--private` and `--checkpoint` passed through, and every
bad input one `error:` line with a non-zero exit before anything reaches the Hub."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub.errors import HfHubHTTPError

from cast_mlx.cli import publish
from cast_mlx.engine import models
from cast_mlx.errors import EXIT_ERROR, EXIT_USAGE

from helpers import run_cli, write_run

try:  # the HTTP client huggingface_hub uses (httpx2 in 2.x)
    from httpx2 import Request, Response
except ImportError:
    from httpx import Request, Response  # type: ignore[no-redef]


class FakeHub:
    """Records what `cast_mlx.publish` asks of the Hub; `upload_folder` keeps the folder's
    files (it is a temp dir, gone after the command)."""

    def __init__(self, fail: Exception | None = None):
        self.fail, self.created, self.uploads = fail, [], []

    def __call__(self, *args, **kwargs):  # stands in for the HfApi class
        return self

    def create_repo(self, repo_id, *, private=None, exist_ok=False, repo_type=None):
        if self.fail is not None:
            raise self.fail
        self.created.append({"repo_id": repo_id, "private": private, "exist_ok": exist_ok, "repo_type": repo_type})
        full = repo_id if "/" in repo_id else f"someone/{repo_id}"
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{full}")

    def upload_folder(self, *, repo_id, folder_path, repo_type=None, commit_message=None):
        files = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
        self.uploads.append({"repo_id": repo_id, "repo_type": repo_type, "message": commit_message, "files": files})


@pytest.fixture
def hub(monkeypatch):
    fake = FakeHub()
    monkeypatch.setattr(huggingface_hub, "HfApi", fake)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_not_a_token")
    return fake


def _error(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


@pytest.mark.parametrize("private", [False, True])
def test_publish_uploads_the_adapter_folder_with_its_card(tmp_path, hub, private, capsys):
    run = write_run(tmp_path / "run")
    code = publish.main([str(run), "--repo", "me/arith-demo", *(["--private"] if private else [])])
    assert code == 0, capsys.readouterr().err
    assert hub.created == [{"repo_id": "me/arith-demo", "private": private, "exist_ok": True, "repo_type": "model"}]
    [upload] = hub.uploads
    assert upload["repo_id"] == "me/arith-demo" and upload["repo_type"] == "model"
    files = upload["files"]
    assert sorted(files) == ["README.md", "adapter_config.json", "adapters.safetensors", "recipe.yaml"]
    best = run / "checkpoints" / "step_000002"  # the default: the best checkpoint
    for name in ("adapter_config.json", "adapters.safetensors", "recipe.yaml"):
        assert files[name] == (best / name).read_bytes(), name
    card = files["README.md"].decode()
    assert "| **2** (this adapter) | 0.750 | 0.250 to 1.000 | 0.375 | 4 |" in card
    assert "| checkpoint | step 2 of 4 (the best by eval accuracy of the run) |" in card
    assert "hf download me/arith-demo --local-dir arith-demo" in card
    assert capsys.readouterr().out.strip() == f"published {best} to https://huggingface.co/me/arith-demo"


@pytest.mark.parametrize("which", ["latest", "step_000004", "PATH"])
def test_the_checkpoint_option(tmp_path, hub, which):
    run = write_run(tmp_path / "run")
    last = run / "checkpoints" / "step_000004"
    assert (
        publish.main([str(run), "--repo", "arith-demo", "--checkpoint", str(last) if which == "PATH" else which]) == 0
    )
    [upload] = hub.uploads
    assert upload["repo_id"] == "someone/arith-demo"  # the user's namespace, as the Hub named it
    assert upload["files"]["adapters.safetensors"] == (last / models.ADAPTER_WEIGHTS).read_bytes()
    card = upload["files"]["README.md"].decode()
    assert "| **4** (this adapter) |" in card and "hf download someone/arith-demo " in card


def _break(run: Path, case: str) -> list[str]:
    """Damage the run folder for `case`; the extra arguments it needs."""
    ckpts = run / "checkpoints"
    if case == "no best":
        (ckpts / "best").unlink()
        return ["--checkpoint", "best"]
    if case == "no checkpoint":
        for p in ckpts.glob("step_*"):
            for f in p.iterdir():
                f.unlink()
            p.rmdir()
    if case == "no such checkpoint":
        return ["--checkpoint", "step_000009"]
    if case == "incomplete checkpoint":
        (ckpts / "step_000002" / "optimizer.safetensors").unlink()
    if case == "adapter config":
        (ckpts / "step_000002" / models.ADAPTER_CONFIG).write_text(json.dumps({"rank": 8}))
    if case == "recipe":
        (ckpts / "step_000002" / "recipe.yaml").write_text("algorithm: {name: no-such}\n")
    return []


CASES = {  # what the error line names
    "no run folder": "no such run folder",
    "no best": "no best checkpoint",
    "no checkpoint": "no complete checkpoint",
    "no such checkpoint": "--checkpoint step_000009: no such checkpoint folder",
    "incomplete checkpoint": "optimizer.safetensors is missing",
    "adapter config": "adapter_config.json has no num_layers or lora_parameters",
    "recipe": "recipe.yaml: ConfigError: ",
    "bad repo": "--repo me/arith demo: ",
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_exit_2_and_nothing_reaches_the_hub(tmp_path, hub, case, capsys):
    run = tmp_path / "run"
    extra = []
    if case != "no run folder":
        write_run(run)
        extra = _break(run, case)
    repo = "me/arith demo" if case == "bad repo" else "me/arith-demo"
    assert publish.main([str(run), "--repo", repo, *extra]) == EXIT_USAGE
    assert CASES[case] in _error(capsys)
    assert hub.created == [] and hub.uploads == []


def test_no_token_and_a_hub_error_are_one_line_exit_1(tmp_path, hub, monkeypatch, capsys):
    run = write_run(tmp_path / "run")
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    assert publish.main([str(run), "--repo", "me/arith-demo"]) == EXIT_ERROR
    assert "no Hugging Face token" in _error(capsys) and hub.created == []
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_expired")
    url = "https://huggingface.co/api/repos/create"
    response = Response(401, request=Request("POST", url))
    hub.fail = HfHubHTTPError(f"401 Client Error: Unauthorized for url: {url}\nmore", response=response)
    assert publish.main([str(run), "--repo", "me/arith-demo"]) == EXIT_ERROR
    line = _error(capsys)
    assert (
        line
        == "error: the Hub: HfHubHTTPError: 401 Client Error: Unauthorized for url: https://huggingface.co/api/repos/create"
    )


def test_the_command_and_the_cast_mlx_dispatcher(tmp_path):
    for args in (["-m", "cast_mlx.publish"], ["-m", "cast_mlx.cli", "publish"]):
        proc = run_cli(*args, str(tmp_path / "none"), "--repo", "me/x", timeout=120)
        assert proc.returncode == EXIT_USAGE
        assert proc.stderr.strip() == f"error: {tmp_path / 'none'}: no such run folder"
    proc = run_cli("-m", "cast_mlx.publish", str(tmp_path), timeout=120)  # no --repo
    assert proc.returncode == EXIT_USAGE and "--repo" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
