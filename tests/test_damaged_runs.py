"""Every reader of a run folder survives a damaged one (issue #31): `cast_mlx.report`,
`cast_mlx.plot`, `scripts/compare.py --report-only`, `cast_mlx.eval --adapter` and
`cast_mlx.train --resume`, fed binary garbage, random truncations, empty files, files
whose tail a crash left as NUL bytes, and a line replaced by random bytes, in
`metrics.jsonl`, `samples.jsonl`, `eval.jsonl`, `checkpoints/*/state.json` and
`adapter_config.json`. Each either fails with one `error:` line and a documented exit
code, or warns and does its job; none ends in a traceback.

The run folder is made once, by the CLI on the tiny model (2 steps, eval off; an
`eval.jsonl` in the trainer's format is added so that `--resume` has one to read). The
commands run in this process (their `main`), so that a case costs what the command does,
not an interpreter start: an uncaught exception is caught here and reported as the
traceback it would print. The damage is drawn from a seeded generator per case, so a
failure names a case that can be rerun."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import random
import shutil
import traceback
from pathlib import Path

import pytest

from cast_mlx.errors import EXIT_ERROR, EXIT_USAGE

from helpers import ROOT, run_cli, smoke_args

KINDS = ("empty", "garbage", "truncated", "half-written", "garbled line")
RUN_FILES = ("metrics.jsonl", "samples.jsonl", "eval.jsonl")
CKPT_FILES = ("state.json", "adapter_config.json")


def damage(data: bytes, kind: str, rng: random.Random) -> bytes:
    """`data` as a crash, a bad disk or a copy cut short may leave it."""
    if kind == "empty":
        return b""
    if kind == "garbage":
        return rng.randbytes(rng.randrange(1, 3000))
    if kind == "truncated":
        return data[: rng.randrange(len(data))]
    if kind == "half-written":  # the tail of the last block never reached the disk: NULs
        cut = rng.randrange(len(data))
        return data[:cut] + b"\0" * (len(data) - cut)
    if kind == "garbled line":
        lines = data.split(b"\n")
        lines[rng.randrange(len(lines))] = rng.randbytes(rng.randrange(1, 200))
        return b"\n".join(lines)
    raise ValueError(kind)


# --------------------------------------------------------------------------- the run folder


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory, tiny_model_dir) -> Path:
    """A real run of the tiny model through the CLI: 2 steps, a checkpoint each, no eval."""
    run = tmp_path_factory.mktemp("damaged") / "run"
    tiny = [
        f"model.name={tiny_model_dir}",
        "sampling.group_size=4",
        "sampling.max_new_tokens=8",
        "lora.num_layers=1",
        "loss.mask_truncated=false",
        "logging.eval_every=0",
        "schedule.steps=2",
    ]
    proc = run_cli(*smoke_args(run, *(a for s in tiny for a in ("--set", s))), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    evals = [{"step": s, "lenient": [float(i % 2) for i in range(8)], "strict": [0.0] * 8} for s in (0, 1, 2)]
    (run / "eval.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
    for name in (*RUN_FILES, "checkpoints/step_000002/state.json", "checkpoints/step_000002/adapter_config.json"):
        assert (run / name).stat().st_size > 0, name
    return run


def damaged_copy(run: Path, dest: Path, name: str, kind: str, seed: int) -> tuple[Path, str]:
    """A copy of `run` at `dest` with `name` damaged (a checkpoint file: in the newest
    checkpoint or, by the draw, in every one); returns the folder and what was done."""
    rng = random.Random(f"{name}/{kind}/{seed}")
    shutil.copytree(run, dest)
    targets = [dest / name] if name in RUN_FILES else sorted((dest / "checkpoints").glob(f"step_*/{name}"))
    if name not in RUN_FILES and rng.random() < 0.5:
        targets = targets[-1:]  # only the newest: readers fall back to the one before
    for path in targets:
        path.write_bytes(damage(path.read_bytes(), kind, rng))
    return dest, f"{kind} {', '.join(str(p.relative_to(dest)) for p in targets)} (seed {seed})"


# --------------------------------------------------------------------------- the readers


def call(main, argv: list[str]) -> tuple[int, str, str]:
    """`main(argv)` in this process: (exit code, stdout, stderr). An exception that would
    escape the command is written to stderr as the traceback Python would print."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse
            code = exc.code if isinstance(exc.code, int) else 1
        except Exception:  # noqa: BLE001 - what the test looks for
            traceback.print_exc(file=err)
            code = 1
    return int(code or 0), out.getvalue(), err.getvalue()


def compare_main():
    spec = importlib.util.spec_from_file_location("compare_script", ROOT / "scripts" / "compare.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def report(run: Path, work: Path) -> tuple[int, str, str, bool]:
    from cast_mlx.cli.report import main

    out = work / "page.html"
    return (*call(main, [str(run), "--out", str(out)]), out.is_file())


def plot(run: Path, work: Path) -> tuple[int, str, str, bool]:
    from cast_mlx.cli.plot import main

    out = work / "curves.png"
    return (*call(main, [str(run), "-o", str(out)]), out.is_file())


def compare(run: Path, work: Path) -> tuple[int, str, str, bool]:
    folder = work / "cmp"
    folder.mkdir()
    run.rename(folder / "grpo-seed0")
    return (*call(compare_main(), ["--report-only", "--out", str(folder)]), (folder / "report.md").is_file())


def evaluate(run: Path, work: Path) -> tuple[int, str, str, bool]:
    from cast_mlx.cli.eval import main

    out = work / "eval.json"
    argv = ["--adapter", str(run), "--task", "arithmetic", "--n", "2", "--max-new-tokens", "2", "--out", str(out)]
    return (*call(main, argv), out.is_file())


def diagnose(run: Path, work: Path) -> tuple[int, str, str, bool]:
    from cast_mlx.cli.diagnose import main

    out = work / "diagnose.json"
    argv = ["--adapter", str(run), "--n", "1", "--group-size", "2", "--max-new-tokens", "2",
            "--contexts", "question-only", "--out", str(out)]  # fmt: skip
    return (*call(main, argv), out.is_file())


def resume(run: Path, work: Path, steps: int) -> tuple[int, str, str, bool]:
    from cast_mlx.cli.train import main

    code, out, err = call(main, ["--resume", str(run), "--quiet", "--no-dashboard", "--set", f"schedule.steps={steps}"])
    return code, out, err, "nothing to do" in out or f"done: {steps} steps" in out


# (reader, damaged file, codes it may fail with, extra argument). --resume trains a step only
# for the files it reads when it writes (the jsonl files); for the checkpoint files,
# schedule.steps=1 makes a fallback to step 1 "nothing to do", so only the reading is paid.
READERS = {
    "report": (report, ("metrics.jsonl", "samples.jsonl"), {EXIT_USAGE}),
    "plot": (plot, ("metrics.jsonl",), {EXIT_USAGE}),
    "compare": (compare, ("metrics.jsonl",), {EXIT_USAGE}),
    "eval": (evaluate, CKPT_FILES, {EXIT_USAGE, EXIT_ERROR}),
    "diagnose": (diagnose, CKPT_FILES, {EXIT_USAGE, EXIT_ERROR}),
    "resume-checkpoint": (lambda r, w: resume(r, w, 1), CKPT_FILES, {EXIT_USAGE, EXIT_ERROR}),
}


def check(name: str, what: str, result: tuple[int, str, str, bool], codes: set[int], damaged: str) -> None:
    code, _, err, did_its_job = result
    where = f"{name}, {what}:\n{err[-3000:]}"
    assert "Traceback" not in err, where
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    if code == 0:
        assert not errors and did_its_job, where
    else:
        assert code in codes, f"exit {code}; " + where
        assert len(errors) == 1, where
        if name != "compare":  # compare.py says which folder has no runs, not why (see the docs)
            assert damaged in err, where


CASES = [
    (reader, name, kind, seed)
    for reader, (_, names, _) in READERS.items()
    for name in names
    for seed, kind in enumerate(KINDS)
]


@pytest.mark.parametrize("reader, name, kind, seed", CASES)
def test_a_reader_survives_a_damaged_file(run_folder, tmp_path, reader, name, kind, seed):
    fn, _, codes = READERS[reader]
    run, what = damaged_copy(run_folder, tmp_path / "run", name, kind, seed)
    check(reader, what, fn(run, tmp_path), codes, name)


@pytest.mark.parametrize("name", RUN_FILES)
def test_resume_survives_a_damaged_jsonl_file(run_folder, tmp_path, name):
    """--resume reads these when it writes its first line: one real step each, with a kind
    of damage drawn per file."""
    seed = RUN_FILES.index(name)
    kind = random.Random(f"resume/{name}").choice(KINDS)
    run, what = damaged_copy(run_folder, tmp_path / "run", name, kind, seed)
    result = resume(run, tmp_path, 3)
    check("resume", what, result, {EXIT_USAGE, EXIT_ERROR}, name)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 3 and steps == sorted(steps), what


# --------------------------------------------------------------------------- exact messages


def test_binary_garbage_metrics_is_one_error_line_naming_the_file(run_folder, tmp_path):
    run, _ = damaged_copy(run_folder, tmp_path / "run", "metrics.jsonl", "garbage", 0)
    (run / "metrics.jsonl").write_bytes(b"\xff\xfe\x00garbage\n\x80\x81")
    for fn in (report, plot):
        code, _, err, wrote = fn(run, tmp_path)
        assert code == EXIT_USAGE and not wrote
        assert err.strip() == (
            f"error: {run / 'metrics.jsonl'}: no readable metrics line (line 1 is not a JSON object with a step)"
        )


def test_a_garbled_line_is_skipped_with_a_warning_and_the_rest_is_reported(run_folder, tmp_path):
    run, _ = damaged_copy(run_folder, tmp_path / "run", "metrics.jsonl", "empty", 0)
    lines = (run_folder / "metrics.jsonl").read_bytes().split(b"\n")
    (run / "metrics.jsonl").write_bytes(b"\n".join([lines[0], b"\x00\xff{", *lines[1:]]))
    code, _, err, wrote = report(run, tmp_path)
    assert code == 0 and wrote
    assert err.splitlines() == [f"warning: {run / 'metrics.jsonl'}: skipped 1 unreadable line(s) (line 2: "
                                "a torn write or a damaged file?)"]  # fmt: skip
    assert "steps done</th><td>2" in (tmp_path / "page.html").read_text()


def test_a_damaged_newest_checkpoint_is_named_and_the_previous_one_used(run_folder, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_folder, run)
    (run / "checkpoints/step_000002/adapter_config.json").write_bytes(b'{"num_layers": 1,\n "lora')
    code, _, err, wrote = evaluate(run, tmp_path)
    assert code == 0 and wrote, err
    assert "warning: skipping checkpoint" in err and "step_000002: adapter_config.json is not valid JSON (line 2" in err
    assert json.loads((tmp_path / "eval.json").read_text())["settings"]["adapter"].endswith("step_000001")
    (run / "checkpoints/step_000001/state.json").write_text('{"step": 1, "cursor": "x"}')
    code, _, err, _ = resume(run, tmp_path, 3)
    assert code == EXIT_USAGE
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        f"error: --resume {run}: no complete checkpoint found under {run}/checkpoints"
    ]
    assert 'step_000001: state.json: cursor is "x"' in err


def test_an_adapter_config_mlx_lm_cannot_use_is_one_error_line(run_folder, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_folder, run)
    config = run / "checkpoints/step_000002/adapter_config.json"
    for text, expected_code, words in (
        ("[1]\n", EXIT_USAGE, f"{config} is not a JSON object"),
        ("{}\n", EXIT_ERROR, "adapter_config.json has no num_layers or lora_parameters"),  # mlx-lm: AttributeError
    ):
        config.write_text(text)
        code, _, err, wrote = evaluate(run, tmp_path)
        assert code == expected_code and not wrote and "Traceback" not in err, err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and words in errors[0], err
