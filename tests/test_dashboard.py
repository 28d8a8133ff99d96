"""The live view renders every metric the trainer writes; the plain view is one line a step."""

from __future__ import annotations

import dataclasses
import io
import re
import time

from rich.console import Console

from cast_mlx.training.dashboard import PlainView, RichView, hms, make_view, remaining_evals

METRICS = {
    "step": 3,
    "reward": 0.375,
    "accuracy/strict": 0.0,
    "accuracy/lenient": 0.375,
    "cast/groups/mixed": 0.5,
    "cast/groups/all_correct": 0.25,
    "cast/groups/all_wrong": 0.25,
    "cast/gap/correct_neg/share": 0.41,
    "cast/gap/correct_neg/abs_mean": 0.123,
    "cast/gap/correct_neg/flipped": 0.41,
    "cast/flip/down_share": 0.2,
    "cast/flip/up_share": 0.1,
    "cast/eos/neg_gap_share": 0.97,
    "cast/adv/mean": 0.01,
    "cast/adv/min": -1.2,
    "cast/adv/max": 1.05,
    "cast/adv/at_a_max_share": 0.02,
    "loss": 0.1234,
    "grad_norm": 0.5,
    "learning_rate": 5e-5,
    "clip_ratio/low_mean": 0.0,
    "clip_ratio/high_mean": 0.0,
    "entropy": 1.5,
    "completions/mean_length": 40.0,
    "completions/clipped_ratio": 0.125,
    "tokens_per_s/generate": 120.0,
    "tokens_per_s/train": 900.0,
    "time/step": 12.5,
    "time/sample": 8.0,
    "time/verify": 0.1,
    "time/teacher": 1.4,
    "time/update": 3.0,
    "memory/peak_gb": 1.25,
    "memory/rss_gb": 2.5,
}
SAMPLE = [{"problem": "Compute 2 + 2.", "completion": "2 + 2 = 4", "reward": 1.0, "gold": "4", "finish": "eos"}]
INFO = {"run": "t", "blas": "MKL (x)"}


def test_rich_view_renders_all_sections():
    buf = io.StringIO()
    view = RichView(10, console=Console(file=buf, force_terminal=True, width=160))
    view.on_train_begin(INFO)
    view.on_metrics(METRICS, SAMPLE)
    view.on_train_end()
    text = buf.getvalue()
    for needle in (
        "CAST gap table",
        "correct teacher -",
        "0.41",
        "rewards",
        "optimisation",
        "2 + 2 = 4",
        "EOS g<0",
        "0.97",
        "reward 1",
        "MKL (x)",
        "3/10",
    ):
        assert needle in text, needle


def test_plain_view_and_fallback():
    buf = io.StringIO()
    view = PlainView(10, stream=buf)
    view.on_train_begin(INFO)
    view.on_metrics(METRICS, SAMPLE)
    view.on_metrics({"step": 0, "eval/accuracy": 0.25, "eval/n": 200}, [])  # the step-0 eval line
    view.on_train_end()
    lines = buf.getvalue().splitlines()
    assert lines[0] == "run: t | blas: MKL (x)"
    assert lines[1].startswith("step 3/10 | reward 0.375 | acc 0.38 | mixed 0.50 | loss 0.1234")
    assert lines[2] == "step 0 eval accuracy 0.250 (n=200)"
    assert isinstance(make_view(10, live=True), PlainView)  # pytest's stdout is no TTY


# ---------------------------------------------------------------- phases, ETA, panels (issue #18)

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def step_line(step: int, **extra) -> dict:
    return {**METRICS, "step": step, "time/step": 10.0, **extra}


def eval_line(step: int, acc: float, seconds: float = 20.0) -> dict:
    return {"eval/accuracy": acc, "eval/n": 200, "time/eval": seconds, "step": step}


def fake_run(view, algorithm: str, steps: int, eval_every: int, samples=SAMPLE) -> None:
    """What the trainer calls: the step-0 eval, then per step its phases (sampling in two
    waves), the eval at multiples of eval_every and the last step, the line, a checkpoint."""
    view.on_train_begin({**INFO, "algorithm": algorithm})
    if eval_every:
        for done in range(0, 201, 40):
            view.on_phase("eval", done, 200)
        view.on_metrics({"step": 0, **eval_line(0, 0.25)}, [])
    for step in range(1, steps + 1):
        for _wave in range(2):
            for t in range(0, 97, 8):
                view.on_phase("sampling", t, 96, f"{t // 3}/32 streams done")
        view.on_phase("verifying", 0, 1)
        if algorithm != "grpo":
            view.on_phase("teacher", 0, 1)
        for mb in range(9):
            view.on_phase("update", mb, 8)
        line = step_line(step)
        if eval_every and (step % eval_every == 0 or step == steps):
            for done in range(0, 201, 40):
                view.on_phase("eval", done, 200)
            line |= eval_line(step, 0.3 + step / 100)
        view.on_metrics(line, samples)
        view.on_phase("checkpoint", 0, 1)
    view.on_message(f"done: {steps} steps")
    view.on_train_end()


def test_remaining_evals_and_clock_format():
    assert remaining_evals(3, 10, 5) == 2  # 5 and 10
    assert remaining_evals(3, 10, 4) == 3  # 4, 8 and the last step
    assert remaining_evals(8, 10, 4) == 1 and remaining_evals(10, 10, 4) == 0
    assert remaining_evals(3, 10, 0) == 0
    assert hms(None) == "-:--:--" and hms(70) == "0:01:10" and hms(3725.4) == "1:02:05"


def test_plain_view_phases_eta_and_last_eval():
    buf = io.StringIO()
    fake_run(PlainView(10, stream=buf, eval_every=5), "cast", steps=10, eval_every=5)
    out = buf.getvalue()
    assert "\x1b" not in out  # no control codes at all
    lines = out.splitlines()
    # one line per phase start, for the long phases only; the second sampling wave adds none
    assert lines[1] == "step 0: eval (200 problems)"
    assert lines[2] == "step 0 eval accuracy 0.250 (n=200)"
    assert lines[3:7] == [
        "step 1: sampling (up to 96 tokens)",
        "step 1: teacher",
        "step 1: update (8 micro-batches)",
        lines[6],
    ]
    for step in range(1, 11):
        for phase in ("sampling", "teacher", "update"):
            assert sum(line.startswith(f"step {step}: {phase}") for line in lines) == 1
    assert [line for line in lines if ": eval" in line] == [
        "step 0: eval (200 problems)",
        "step 5: eval (200 problems)",
        "step 10: eval (200 problems)",
    ]
    assert not any("verifying" in line or "checkpoint" in line for line in lines)
    steps = {int(line.split("/")[0].split()[1]): line for line in lines if re.match(r"step \d+/10 \|", line)}
    assert sorted(steps) == list(range(1, 11))
    # 3 steps of 10 s done, 7 left, and the evals of steps 5 and 10 at 20 s (the step-0 eval's)
    assert "| eta 0:01:50 |" in steps[3]
    assert "| eta 0:01:00 |" in steps[6]  # 4 steps of 10 s + the last eval (20 s)
    assert "eta 0:00:00" in steps[10]
    # the last eval stays, with its step, until the next one
    assert steps[1].endswith("| eval 0.250 @ step 0") and steps[4].endswith("| eval 0.250 @ step 0")
    assert steps[5].endswith("| eval 0.350 @ step 5") and steps[9].endswith("| eval 0.350 @ step 5")
    assert steps[10].endswith("| eval 0.400 @ step 10")
    assert lines[-1] == "done: 10 steps"


def test_plain_view_eta_without_an_eval_time_names_the_evals():
    buf = io.StringIO()
    view = PlainView(10, stream=buf, eval_every=4)
    view.on_train_begin(INFO)
    view.on_metrics({"step": 0, **eval_line(0, 0.25, 0.0), "eval/cached": True}, [])  # a cached base eval
    view.on_phase("sampling", 0, 96, "0/32 streams done")
    for step in (1, 2, 3):
        view.on_metrics(step_line(step), SAMPLE)
    lines = buf.getvalue().splitlines()
    assert lines[2] == "step 1: sampling (up to 96 tokens)"
    assert "| eta 0:01:10 + 3 evals |" in lines[-1]  # 7 steps left; evals at 4, 8 and 10 untimed
    plain = PlainView(10, stream=io.StringIO())  # no evals: the steps alone
    plain.on_train_begin(INFO)
    for step in (1, 2, 3):
        plain.on_metrics(step_line(step), SAMPLE)
    assert plain.stream.getvalue().splitlines()[-1].endswith("| 10.0s | eta 0:01:10")


def test_plain_view_phase_of_a_resumed_run():
    buf = io.StringIO()
    view = PlainView(10, stream=buf)
    view.on_train_begin(INFO)
    view.on_message("resumed from /tmp/x/checkpoints/step_000004 at step 4")
    view.on_phase("sampling", 0, 96)
    assert buf.getvalue().splitlines()[-1] == "step 5: sampling (up to 96 tokens)"


def rich_view(clock=None, **kw) -> tuple[RichView, io.StringIO]:
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=150)
    if clock is None:
        return RichView(10, console=console, **kw), buf
    return RichView(10, console=console, clock=clock, **kw), buf


def text_since(buf: io.StringIO, pos: int) -> str:
    return ANSI.sub("", buf.getvalue()[pos:])


def test_rich_view_phase_progress_eta_and_eval():
    clock = FakeClock()
    view, buf = rich_view(clock, eval_every=5)
    view.on_train_begin({**INFO, "algorithm": "cast"})
    assert "eta -:--:--" in text_since(buf, 0)
    view.on_metrics({"step": 0, **eval_line(0, 0.25)}, [])
    for step in (1, 2, 3):
        view.on_phase("sampling", 0, 96, "0/32 streams done")
        clock.t += 10
        view.on_metrics(step_line(step), SAMPLE)
    text = text_since(buf, 0)
    assert "3/10" in text and "eta 0:01:50" in text and "eval 0.250 @ step 0" in text

    pos = len(buf.getvalue())
    view.on_phase("sampling", 0, 96, "0/32 streams done")  # a start: drawn at once
    assert "step 4 · sampling" in text_since(buf, pos) and "0/96 tokens" in text_since(buf, pos)
    pos = len(buf.getvalue())
    view.on_phase("sampling", 40, 96, "11/32 streams done")  # within the refresh interval: not drawn
    assert text_since(buf, pos) == ""
    clock.t += 1
    view.on_phase("sampling", 41, 96, "12/32 streams done")
    text = text_since(buf, pos)
    assert "step 4 · sampling" in text and "41/96 tokens · 12/32 streams done" in text
    assert "eta 0:01:49" in text  # the live ETA counts down from the last line's
    pos = len(buf.getvalue())
    view.on_phase("update", 0, 8)
    clock.t += 1
    view.on_phase("update", 3, 8)
    assert "step 4 · update" in text_since(buf, pos) and "3/8 micro-batches" in text_since(buf, pos)
    pos = len(buf.getvalue())
    view.on_phase("eval", 0, 200)
    clock.t += 1
    view.on_phase("eval", 120, 200)
    assert "step 4 · eval" in text_since(buf, pos) and "120/200 problems" in text_since(buf, pos)
    view.on_metrics(step_line(4) | eval_line(4, 0.315), SAMPLE)
    pos = len(buf.getvalue())
    view.on_phase("checkpoint", 0, 1)
    text = text_since(buf, pos)
    assert "step 4 · checkpoint" in text and "eval 0.315 @ step 4" in text
    view.on_train_end()


def test_rich_view_panels_follow_the_algorithm():
    for algorithm in ("cast", "cast-verl", "rlsd", "grpo"):
        view, buf = rich_view()
        fake_run(view, algorithm, steps=2, eval_every=0)
        text = ANSI.sub("", buf.getvalue())
        assert "\x1b" in buf.getvalue()  # a live terminal view
        if algorithm == "grpo":
            assert "CAST gap table" not in text and "GRPO signal" in text
            for needle in ("groups mixed", "adv mean/min/max", "0.01 / -1.20 / 1.05", "clip low/high", "rows skipped"):
                assert needle in text, needle
        else:
            assert "CAST gap table" in text and "GRPO signal" not in text
            assert "correct teacher -" in text and "EOS g<0" in text and "rows skipped" in text
            # only CAST's own rule flips and clips: the port (cast-verl) and RLSD do neither
            assert ("flip down/up" in text) == (algorithm == "cast")
            assert ("flipped" in text) == (algorithm == "cast")
            assert ("at ±a_max" in text) == (algorithm == "cast")
            assert ("EOS adv all-correct/all-wrong" in text) == (algorithm in ("cast", "cast-verl"))


def test_rich_view_sample_alternates_correct_and_wrong():
    clock = FakeClock()
    view, buf = rich_view(clock, sample_period=5.0)
    right = {"problem": "Compute 2 + 2.", "completion": "so 4", "reward": 1.0, "gold": "4", "finish": "eos"}
    wrong = {"problem": "Compute 3 + 3.", "completion": "so 7", "reward": 0.25, "gold": "6", "finish": "length"}
    view.on_train_begin({**INFO, "algorithm": "grpo"})
    view.on_metrics(step_line(1), [wrong, right, wrong])
    shown = []
    for _ in range(4):
        pos = len(buf.getvalue())
        clock.t += 5
        view.on_phase("sampling", 7, 96)
        text = text_since(buf, pos)
        assert ("so 4" in text) != ("so 7" in text)
        shown.append("correct" if "so 4" in text else "wrong")
    assert shown == ["wrong", "correct", "wrong", "correct"]
    assert "sample (wrong 2/2)" in text_since(buf, 0) and "reward 0.25" in text_since(buf, 0)
    pos = len(buf.getvalue())
    view.on_metrics(step_line(2), [right])  # only correct ones: no alternation
    clock.t += 5
    view.on_phase("sampling", 8, 96)
    assert "sample (correct)" in text_since(buf, pos) and "so 7" not in text_since(buf, pos)
    view.on_train_end()


def test_rich_view_on_phase_is_cheap():
    view, buf = rich_view()
    drawn = []
    render = view._render
    view._render = lambda: drawn.append(1) or render()  # type: ignore[method-assign]
    view.on_train_begin({**INFO, "algorithm": "cast"})
    view.on_metrics(step_line(1), SAMPLE)
    start = time.perf_counter()
    view.on_phase("sampling", 0, 10_000)
    for t in range(1, 10_000):
        view.on_phase("sampling", t, 10_000, f"{t // 500}/32 streams done")
    seconds = time.perf_counter() - start
    view.on_train_end()
    assert seconds < 1.0, seconds
    assert len(drawn) <= 3 + 4 * seconds + 1, len(drawn)  # begin, line, the start, 4 a second


def test_make_view_keeps_its_signature():
    assert isinstance(make_view(10, True), PlainView)
    view = make_view(10, live=False, force_terminal=False, eval_every=5)
    assert isinstance(view, PlainView) and view.state.eval_every == 5
    rich = make_view(10, live=True, force_terminal=True, eval_every=5)
    assert isinstance(rich, RichView) and rich.state.eval_every == 5


def panel_text(algorithm: str) -> str:
    """The algorithm's panel after one step line, rendered to plain text."""
    view, _ = rich_view()
    view.state.begin({"algorithm": algorithm})
    view.on_metrics(step_line(1), SAMPLE)
    panel = view._grpo_panel() if view._teacherless() else view._cast_panel()
    out = Console(file=io.StringIO(), width=150, color_system=None)
    out.print(panel)
    return out.file.getvalue()


def test_the_panel_rows_are_the_declared_facts():
    """cast-verl neither flips nor clips at a_max, so its panel has no flip rows and no ±a_max
    share; CAST's has both (with their values). The rows follow the facts of the registry,
    not the name: a declared algorithm that flips without clipping gets the flip rows only."""
    from cast_mlx.algorithm.facts import ALGORITHMS, declare

    cast, verl = panel_text("cast"), panel_text("cast-verl")
    assert "flip down/up" in cast and "0.20" in cast and "0.10" in cast  # down / up shares
    row = {name: text.split("correct teacher -")[1].split("\n")[0] for name, text in (("cast", cast), ("verl", verl))}
    assert "flipped" in cast and row["cast"].split() == ["0.41", "0.123", "0.41"]  # share, |g|, flipped
    assert row["verl"].split() == ["0.41", "0.123"]
    assert "at ±a_max" in cast and "0.02" in cast
    for row in ("flip down/up", "flipped", "at ±a_max", "0.02"):
        assert row not in verl, row
    assert "adv mean/min/max" in verl and "EOS adv all-correct/all-wrong" in verl

    declare(
        dataclasses.replace(
            ALGORITHMS["cast"], name="flip-only", clips_at_a_max=False, zero_var_base=False, summary="a test's"
        )
    )
    declare(dataclasses.replace(ALGORITHMS["grpo"], name="no-teacher", summary="a test's"))
    try:
        flip_only = panel_text("flip-only")
        assert "flip down/up" in flip_only and "flipped" in flip_only
        assert "at ±a_max" not in flip_only and "EOS adv all-correct/all-wrong" not in flip_only
        assert "GRPO signal" in panel_text("no-teacher")
    finally:
        ALGORITHMS.pop("flip-only")
        ALGORITHMS.pop("no-teacher")
    unknown = panel_text("not-declared")  # an unknown name shows every row
    assert "flip down/up" in unknown and "at ±a_max" in unknown and "EOS adv all-correct/all-wrong" in unknown


# ---------------------------------------------------------------- what a terminal shows (issue #30)

TERMINAL = re.compile(r"\x1b\[([0-9;?]*)([A-Za-z])|\r\n|\r|\n|[^\x1b\r\n]+")
TITLE = "─ cast-mlx ─"  # the top border of a frame
SUMMARY = ["summary: step 2 of 2, 0:20 in this run", "  last checkpoint: /tmp/x/checkpoints/step_000002"]


def screen(raw: str) -> list[str]:
    """The lines a terminal shows after `raw`, with the controls rich's live display uses
    applied (carriage return, erase line, cursor up); colours and the cursor's visibility
    change nothing. Another control is an error: this terminal would not know it."""
    lines, row, col = [""], 0, 0
    for m in TERMINAL.finditer(raw):
        token, (arg, code) = m.group(0), m.groups()
        if token in ("\n", "\r\n"):
            row, col = row + 1, 0
            lines += [""] * (row + 1 - len(lines))
        elif token == "\r":
            col = 0
        elif code == "A":
            row = max(row - int(arg or 1), 0)
        elif code == "K" and arg == "2":
            lines[row] = ""
        elif code in ("m", "h", "l"):
            pass
        elif code:
            raise AssertionError(f"a control this terminal does not know: {token!r}")
        else:
            lines[row] = lines[row][:col].ljust(col) + token + lines[row][col + len(token) :]
            col += len(token)
    return lines[:-1] if lines[-1] == "" else lines


def terminal_view(total: int = 2, **kw) -> tuple[RichView, io.StringIO]:
    buf = io.StringIO()
    return RichView(total, console=Console(file=buf, force_terminal=True, width=150, height=80), **kw), buf


def end_of_run(view, steps: int) -> None:
    """What trainer.fit sends after its loop: the last line, the summary, then the end."""
    view.on_message(f"done: {steps} steps; adapters in /tmp/x/checkpoints/step_{steps:06d}")
    for line in SUMMARY:
        view.on_message(line)
    view.on_train_end()


def frames(lines: list[str]) -> list[int]:
    return [i for i, line in enumerate(lines) if TITLE in line]


def test_the_final_frame_comes_once_before_the_summary():
    """Issue #30: the summary went above the live frame, and the frame stayed below it."""
    view, buf = terminal_view()
    view.on_train_begin({**INFO, "algorithm": "cast", "step": 0})
    for step in (1, 2):
        view.on_phase("sampling", 0, 96)
        view.on_metrics(step_line(step), SAMPLE)
        view.on_phase("checkpoint", 0, 1)
    end_of_run(view, 2)
    lines = screen(buf.getvalue())
    assert len(frames(lines)) == 1, "\n".join(lines)
    assert lines[-len(SUMMARY) :] == SUMMARY  # nothing after the summary
    assert lines[-len(SUMMARY) - 1].startswith("done: 2 steps")
    assert lines[-len(SUMMARY) - 2].startswith("╰")  # the frame's bottom right above them
    frame = "\n".join(lines[frames(lines)[0] :])
    assert "step 2/2" in frame and "2 · checkpoint" in frame  # the final frame, not an earlier one
    view.on_message("late note")  # after the end: a plain line, no frame drawn again
    assert screen(buf.getvalue())[-1] == "late note" and len(frames(screen(buf.getvalue()))) == 1


def test_a_message_mid_run_goes_below_its_frame_and_the_run_goes_on():
    view, buf = terminal_view(total=3)
    view.on_train_begin({**INFO, "algorithm": "grpo", "step": 1})
    view.on_message("resumed from /tmp/x/checkpoints/step_000001 at step 1")  # above the live frame
    view.on_metrics(step_line(2), SAMPLE)
    view.on_message("warning: length drift at step 2")
    view.on_phase("sampling", 0, 96)  # a new live frame below the warning
    view.on_metrics(step_line(3), SAMPLE)
    end_of_run(view, 3)
    lines = screen(buf.getvalue())
    first, last = frames(lines)
    assert lines[0].startswith("resumed from") and first == 1
    assert "step 2/3 (resumed at 1)" in "\n".join(lines[first:last])
    assert lines[last - 1] == "warning: length drift at step 2"
    assert "step 3/3 (resumed at 1)" in "\n".join(lines[last:]) and lines[-len(SUMMARY) :] == SUMMARY


def header_of(buf: io.StringIO) -> str:
    """The header of the frame on the screen now (the line after its top border)."""
    lines = screen(buf.getvalue())
    return lines[frames(lines)[-1] + 1]


def test_the_header_shows_the_current_step():
    """Issue #30: the header said `step 0` (info's step: where the invocation started) to the end."""
    view, buf = terminal_view(total=24)
    view.on_train_begin({**INFO, "algorithm": "cast", "step": 0})
    assert "step 0/24" in header_of(buf)
    view.on_metrics({"step": 0, **eval_line(0, 0.25)}, [])
    for step in range(1, 8):
        view.on_phase("sampling", 0, 96)
        view.on_metrics(step_line(step), SAMPLE)
        assert f"step {step}/24" in header_of(buf) and "resumed" not in header_of(buf)
    view.on_train_end()

    view, buf = terminal_view(total=24)  # a resumed run: the step goes on from its checkpoint's
    view.on_train_begin({**INFO, "algorithm": "cast", "step": 16})
    view.on_message("resumed from /tmp/x/checkpoints/step_000016 at step 16")
    assert "step 16/24 (resumed at 16)" in header_of(buf)
    view.on_metrics(step_line(17), SAMPLE)
    assert "step 17/24 (resumed at 16)" in header_of(buf)
    view.on_train_end()


def test_the_cli_dashboard_on_a_terminal(tmp_path, tiny_model_dir):
    """A tiny run through the CLI with its stdout a terminal (a pty): one frame, the final
    one with the last step in its header, then the summary, and no frame after it."""
    import os
    import pty
    import select
    import subprocess
    import sys

    from helpers import ROOT, TINY_SETS

    args = [sys.executable, "-m", "cast_mlx.train", "--recipe", "recipes/smoke.yaml", "--quiet"]
    for s in (f"model.name={tiny_model_dir}", *TINY_SETS, f"logging.out_dir={tmp_path / 'run'}", "schedule.steps=2",
              "logging.dashboard=true"):  # fmt: skip
        args += ["--set", s]
    master, slave = pty.openpty()
    env = {**os.environ, "COLUMNS": "150", "LINES": "80", "TERM": "xterm", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    raw = b""
    try:
        while True:  # read while it runs: a full pty would block it
            if select.select([master], [], [], 1.0)[0]:
                try:
                    chunk = os.read(master, 1 << 16)
                except OSError:  # the other side closed (Linux)
                    break
                if not chunk:
                    break
                raw += chunk
            elif proc.poll() is not None:
                break
        assert proc.wait(timeout=300) == 0, raw.decode(errors="replace")[-3000:]
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    lines = screen(raw.decode("utf-8", errors="replace"))
    shown = "\n".join(lines)
    assert len(frames(lines)) == 1, shown
    top = frames(lines)[0]
    assert "step 2/2" in lines[top + 1], shown
    done = next(i for i, line in enumerate(lines) if line.startswith("done: 2 steps"))
    assert lines[done - 1].startswith("╰") and top < done, shown
    assert lines[done + 1].startswith("summary: step 2 of 2") and lines[-1].startswith("  report: "), shown


# ---------------------------------------------------------------- what "strict" means (issue #30)


def rewards_text(answer_format: str | None) -> str:
    view, buf = terminal_view(answer_format=answer_format)
    fake_run(view, "cast", steps=2, eval_every=0)
    return "\n".join(screen(buf.getvalue()))


def test_strict_accuracy_says_which_format_or_is_left_out():
    """Strict accuracy is the answer in the format the prompt asks for: named after it, and
    left out where the prompt asks for none (answer_format none: strict is lenient)."""
    assert re.search(r"accuracy strict \(#### format\) +0\.000", rewards_text("hash"))
    assert re.search(r"accuracy strict \(\\boxed\{\} format\) +0\.000", rewards_text("boxed"))
    assert "strict" not in rewards_text("none") and "accuracy lenient" in rewards_text("none")
    assert re.search(r"accuracy strict +0\.000", rewards_text(None))  # not told: as before
    view = make_view(10, live=True, force_terminal=True, answer_format="none")
    assert isinstance(view, RichView) and view.strict is None


def test_the_strict_label_follows_the_prompt():
    """The one rule (data.strict_label) reads the prompt's instruction: every task's prompt
    asks for the recipe's format (the default arithmetic recipe's for "####"), none for
    answer_format none."""
    from cast_mlx import config as cfg
    from cast_mlx.tasks import data

    from helpers import ROOT

    problem = data.load_task("arithmetic", "train", n=1)[0]
    for fmt in ("hash", "boxed", "none"):
        label, asked = data.strict_label(fmt), data.user_message(problem, fmt)
        if fmt == "none":
            assert label is None and asked == problem.question
        else:
            mark = label.removeprefix("strict (").removesuffix(" format)")
            assert mark in data.ANSWER_INSTRUCTIONS[fmt] and mark in asked, (fmt, label, asked)
    assert data.strict_label(None) == "strict"
    default = cfg.load_recipe(ROOT / "recipes/smollm2-135m-arith.yaml", [])
    assert default.data.task == "arithmetic" and data.strict_label(default.data.answer_format) == "strict (#### format)"
