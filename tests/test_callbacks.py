"""The trackio sink (`logging.trackio`): a run's metrics lines read back by trackio's own CLI
from its local store, a resumed run continuing its trackio run, and nothing sent to the
network even with a Hub token and a Space configured. No model is loaded."""

from __future__ import annotations

import json
import sys
import types

import pytest

from cast_mlx import config as cfg
from cast_mlx.training import callbacks as cb

from helpers import run_cli

# Feeds the sinks of a `logging.trackio: true` recipe metrics lines of steps FIRST..LAST, with
# every socket connection and name lookup refused and recorded; prints the attempts.
SINKS = """
import json, socket, sys
from pathlib import Path

tried = []

def refuse(*args, **kwargs):
    tried.append(repr(args[1:2] or args[:1]))
    raise OSError("no network in this test")

socket.socket.connect = refuse
socket.getaddrinfo = refuse

from cast_mlx import config as cfg
from cast_mlx.training import callbacks as cb

run_dir, first, last = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
recipe = cfg.from_dict({"name": "tracked", "logging": {"trackio": True}})
sinks = cb.CallbackList(cb.sinks(recipe, run_dir, None if first == 1 else first - 1))
assert any(isinstance(s, cb.TrackioLogger) for s in sinks.callbacks)
for step in range(first, last + 1):
    line = {"step": step, "reward": step / 4, "loss": -0.5 * step, "health/drift": False, "label": "text"}
    sinks.on_metrics(line, [])
sinks.on_train_end()
print(json.dumps(tried))
"""


def _trackio(env: dict, *args: str) -> dict:
    proc = run_cli("-m", "trackio.cli", *args, "--json", env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout[proc.stdout.index("{") :])


def test_trackio_sink_logs_locally_and_its_reader_reads_it_back(tmp_path):
    pytest.importorskip("trackio")
    store = tmp_path / "trackio"
    # a token and a Space would make trackio talk to the Hub: the sink uses neither
    env = {"TRACKIO_DIR": str(store), "HF_TOKEN": "hf_not_a_token", "TRACKIO_SPACE_ID": "someone/space"}
    for first, last in ((1, 2), (3, 3)):  # a run, then its resume from step 2
        proc = run_cli("-c", SINKS, str(tmp_path / "run"), str(first), str(last), env=env, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        lines = proc.stdout.strip().splitlines()
        assert json.loads(lines[-1]) == []  # no connection, no name lookup
        assert lines[0].startswith(f"trackio: run tracked in {store} ")  # its own banner left out
    assert (store / f"{cb.TRACKIO_PROJECT}.db").is_file()
    project = ["--project", cb.TRACKIO_PROJECT]
    env = {"TRACKIO_DIR": str(store)}
    assert _trackio(env, "list", "runs", *project)["runs"] == ["tracked"]  # the resume continued it
    metrics = _trackio(env, "list", "metrics", *project, "--run", "tracked")["metrics"]
    assert sorted(metrics) == ["health/drift", "loss", "reward"]  # numbers only; `step` is the x axis
    for name, value in (("reward", lambda s: s / 4), ("loss", lambda s: -0.5 * s)):
        values = _trackio(env, "get", "metric", *project, "--run", "tracked", "--metric", name)["values"]
        assert [(v["step"], v["value"]) for v in values] == [(s, value(s)) for s in (1, 2, 3)]


def test_trackio_not_installed_is_a_warning(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "trackio", None)  # `import trackio` raises ImportError
    recipe = cfg.from_dict({"logging": {"trackio": True}})
    sinks = cb.sinks(recipe, tmp_path, None)
    assert not any(isinstance(s, cb.TrackioLogger) for s in sinks)
    out = capsys.readouterr().out.strip().splitlines()
    assert out == ["warning: logging.trackio is on but trackio is not installed; skipping it (pip install trackio)"]


def test_trackio_that_does_not_start_is_a_warning(monkeypatch, tmp_path, capsys):
    def init(**kwargs):
        raise OSError("database is locked")

    fake = types.SimpleNamespace(Run=type("Run", (), {}), init=init)
    monkeypatch.setitem(sys.modules, "trackio", fake)
    sinks = cb.sinks(cfg.from_dict({"logging": {"trackio": True}}), tmp_path, None)
    assert not any(isinstance(s, cb.TrackioLogger) for s in sinks)
    out = capsys.readouterr().out.strip().splitlines()
    assert out == ["warning: logging.trackio: trackio did not start (OSError: database is locked); skipping it"]
