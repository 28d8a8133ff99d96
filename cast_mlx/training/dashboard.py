"""What a run shows while it trains: a `rich` live dashboard on a terminal, plain lines
elsewhere (CI, pipes, `--no-dashboard`). Both are training callbacks
(`cast_mlx.training.callbacks.TrainingCallback`):

    view = make_view(total_steps, live=True, eval_every=recipe.logging.eval_every)
    view.on_train_begin(info); view.on_phase(phase, done, total, note)
    view.on_metrics(metrics, samples); view.on_train_end()

A metrics line without `reward` is the step-0 eval: it is shown as a message.

Both views show an ETA from the first completed step on: the remaining steps times the mean
`time/step` so far, plus the remaining evals (multiples of `eval_every` and the last step)
times the mean `time/eval` so far (until an eval has been timed, the evals still to come are
named instead). Both keep the last eval result, with its step, until the next one.

- `RichView`: the current phase with its own bar (`on_phase`; re-drawn at most
  `refresh_per_second` times a second, and at once when a new phase starts), the step bar
  with the ETA, the rewards, the algorithm's panel (read from its declared facts,
  `cast_mlx.algorithm.facts`: the teacher's gap table, with the flip, ±a_max and
  zero-variance rows only where they apply, for an algorithm with a teacher; the GRPO
  signal panel for one without), optimisation and timings, and a sample that alternates
  between a correct and a wrong completion of the step.
- `PlainView`: one line per step, and one line when a long phase starts (`PLAIN_PHASES`);
  never a control code.
"""

from __future__ import annotations

import re
import sys
import time
from typing import Callable

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table

from cast_mlx.algorithm.facts import ALGORITHMS, AlgorithmFacts
from cast_mlx.tasks import data
from cast_mlx.training.callbacks import TrainingCallback

UNITS = {"sampling": "tokens", "update": "micro-batches", "eval": "problems"}  # phases with a count
PLAIN_PHASES = ("sampling", "teacher", "update", "eval")  # the phases long enough for a plain line
CORRECT = 0.5  # a sample's reward from which it counts as correct (rewards may be weighted sums)
_RESUMED = re.compile(r"^resumed from .* at step (\d+)$")


def _f(x, spec=".3f") -> str:
    return "-" if x is None else format(x, spec)


def _eval_message(m: dict) -> str:
    return f"step {m['step']} eval accuracy {m['eval/accuracy']:.3f} (n={m['eval/n']})"


def hms(seconds: float | None) -> str:
    """`H:MM:SS`, or `-:--:--` when unknown."""
    if seconds is None:
        return "-:--:--"
    s = max(int(round(seconds)), 0)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def remaining_evals(step: int, total: int, eval_every: int) -> int:
    """The evals after `step`: at the multiples of `eval_every` up to `total`, and at
    `total` itself (the trainer's rule); those of `step` itself are done."""
    if eval_every <= 0 or step >= total:
        return 0
    return total // eval_every - step // eval_every + (1 if total % eval_every else 0)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


class RunState:
    """What both views track between metrics lines: the last completed step, step and eval
    times, the last eval, the current phase."""

    def __init__(self, total: int, eval_every: int, clock: Callable[[], float]):
        self.total, self.eval_every, self.clock = total, eval_every, clock
        self.algorithm = ""
        self.step = 0  # the last completed step (0: none yet, or the step-0 eval)
        self.step_times: list[float] = []
        self.eval_times: list[float] = []
        self.last_eval: tuple[float, int] | None = None  # (accuracy, step)
        self.phase: tuple[str, int, int, str] | None = None  # (phase, done, total, note)
        self.phase_since = 0.0
        self.in_step = False  # a step's sampling started since the last metrics line
        self.line_at: float | None = None  # the clock at the last step line

    def begin(self, info: dict) -> None:
        self.algorithm = str(info.get("algorithm", ""))
        if isinstance(info.get("step"), int):  # a resumed run may say where it starts
            self.step = info["step"]

    def message(self, text: str) -> None:
        if match := _RESUMED.match(text):  # before the first line of a resumed run
            self.step = int(match.group(1))

    def metrics(self, m: dict) -> None:
        if "eval/accuracy" in m:
            self.last_eval = (m["eval/accuracy"], m["step"])
            t = m.get("time/eval")
            if isinstance(t, (int, float)) and t > 0 and not m.get("eval/cached"):
                self.eval_times.append(float(t))
        if "reward" in m:
            if isinstance(m.get("time/step"), (int, float)):
                self.step_times.append(float(m["time/step"]))
            self.line_at = self.clock()
        self.step = m["step"]
        self.phase, self.in_step = None, False

    def on_phase(self, phase: str, done: int, total: int, note: str) -> bool:
        """Record a phase call; True when it starts a phase (a `done == 0` call of another
        phase than the current one: sampling's later waves restart at 0)."""
        started = done == 0 and (self.phase is None or self.phase[0] != phase)
        if started:
            self.phase_since = self.clock()
            if phase == "sampling":
                self.in_step = True
        self.phase = (phase, done, total, note)
        return started

    def phase_step(self) -> int:
        """The step the current phase belongs to: the next one once its sampling started
        (its eval included), else the last one (the step-0 eval, a checkpoint)."""
        return self.step + 1 if self.in_step else self.step

    def eta(self, live: bool = False) -> tuple[float | None, int]:
        """(seconds left, or None before the first step; evals left without a time yet).
        `live`: less the time since the last step line (the running step's share)."""
        if not self.step_times:
            return None, 0
        left = max(self.total - self.step, 0) * _mean(self.step_times)
        evals = remaining_evals(self.step, self.total, self.eval_every)
        if evals and self.eval_times:
            left += evals * _mean(self.eval_times)
            evals = 0
        if live and self.line_at is not None:
            left = max(left - (self.clock() - self.line_at), 0.0)
        return left, evals

    def eta_text(self, live: bool = False) -> str:
        left, evals = self.eta(live)
        return f"eta {hms(left)}" + (f" + {evals} eval{'s' if evals > 1 else ''}" if evals else "")

    def eval_text(self) -> str | None:
        if self.last_eval is None:
            return None
        acc, step = self.last_eval
        return f"{acc:.3f} @ step {step}"


class PlainView(TrainingCallback):
    """One log line per step (stdout), with the ETA and the last eval; one line when a phase
    of `PLAIN_PHASES` starts ("step 3: sampling (up to 96 tokens)"); no control codes."""

    def __init__(self, total: int, stream=None, eval_every: int = 0):
        self.total, self.stream = total, stream or sys.stdout
        self.state = RunState(total, eval_every, time.monotonic)

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def on_train_begin(self, info: dict) -> None:
        self.state.begin(info)
        self._print(" | ".join(f"{k}: {v}" for k, v in info.items()))

    def on_phase(self, phase: str, done: int, total: int, note: str = "") -> None:
        if self.state.on_phase(phase, done, total, note) and phase in PLAIN_PHASES:
            unit = UNITS.get(phase)
            what = "" if unit is None else f" ({'up to ' if phase == 'sampling' else ''}{total} {unit})"
            self._print(f"step {self.state.phase_step()}: {phase}{what}")

    def on_metrics(self, m: dict, samples: list[dict]) -> None:
        self.state.metrics(m)
        if "reward" not in m:
            return self._print(_eval_message(m))
        parts = [
            f"step {m['step']}/{self.total}",
            f"reward {_f(m['reward'])}",
            f"acc {_f(m['accuracy/lenient'], '.2f')}",
            f"mixed {_f(m.get('cast/groups/mixed'), '.2f')}",
            f"loss {_f(m['loss'], '.4f')}",
            f"gnorm {_f(m['grad_norm'], '.3f')}",
            f"len {_f(m['completions/mean_length'], '.1f')}",
            f"lr {_f(m['learning_rate'], '.2e')}",
            f"{_f(m['time/step'], '.1f')}s",
            self.state.eta_text(),
        ]
        if (ev := self.state.eval_text()) is not None:
            parts.append(f"eval {ev}")
        if m.get("health/drift"):
            parts.append("LENGTH DRIFT")
        self._print(" | ".join(parts))

    def on_message(self, text: str) -> None:
        self.state.message(text)
        self._print(text)


def _sample_text(s: dict) -> str:
    text = escape(s["completion"].strip().replace("\n", " ")[:400])
    return (
        f"[dim]{escape(s['problem'][:160])}[/]\n{text}\n"
        f"[bold]reward {s['reward']:.3g}[/] (gold {escape(str(s['gold']))}, {escape(str(s['finish']))})"
    )


class RichView(TrainingCallback):
    """A live panel: the step bar with the ETA and the last eval, the current phase with its
    bar, rewards, the algorithm's panel, optimisation and timings, a sample.

    `on_phase` is cheap: it re-draws only when a new phase starts or `1/refresh_per_second`
    has passed since the last drawing; `clock` is for tests. The sample alternates between a
    correct and a wrong completion of the last step, every `sample_period` seconds."""

    def __init__(
        self,
        total: int,
        console: Console | None = None,
        eval_every: int = 0,
        *,
        clock: Callable[[], float] = time.monotonic,
        refresh_per_second: float = 4.0,
        sample_period: float = 5.0,
        answer_format: str | None = None,
    ):
        self.total, self.clock = total, clock
        self.info: dict = {}
        self.strict = data.strict_label(answer_format)  # None: the prompt asks for no format
        self.console = console or Console()
        self.state = RunState(total, eval_every, clock)
        self.m: dict = {}
        self.samples: list[dict] = []  # the last step's: one correct first, then one wrong
        self.samples_at = 0.0
        self.min_interval = 1.0 / refresh_per_second
        self.sample_period = sample_period
        self.drawn_at = -float("inf")
        self.live = Live(console=self.console, auto_refresh=False)
        self.started = False  # the live display runs
        self.running = False  # between on_train_begin and on_train_end

    def on_train_begin(self, info: dict) -> None:
        self.info = info
        self.state.begin(info)
        self.running = True
        self.refresh()

    def on_train_end(self) -> None:
        self.running = False
        self._stop()

    def _stop(self) -> None:
        """End the live display: its last frame stays on the screen, once."""
        if self.started:
            self.live.stop()
            self.started = False

    def on_message(self, text: str) -> None:
        """Below the last frame: the live display stops (the next phase or line starts a new one),
        so no frame follows the summary. The resume note, before any step, goes above it."""
        self.state.message(text)
        if not _RESUMED.match(text):
            self._stop()
        self.console.print(text)

    def on_phase(self, phase: str, done: int, total: int, note: str = "") -> None:
        started = self.state.on_phase(phase, done, total, note)
        if started or self.clock() - self.drawn_at >= self.min_interval:
            self.refresh()

    def on_metrics(self, m: dict, samples: list[dict]) -> None:
        self.state.metrics(m)
        if "reward" not in m:
            self.console.print(_eval_message(m))
        else:
            self.m = m
            correct = [s for s in samples if s["reward"] >= CORRECT]
            wrong = [s for s in samples if s["reward"] < CORRECT]
            self.samples = correct[:1] + wrong[:1]
            self.samples_at = self.clock()
        self.refresh()

    def refresh(self) -> None:
        """Draw the panel now (between on_train_begin and on_train_end), starting a live
        display when none runs (a fresh one: a stopped one would erase what came after it)."""
        self.drawn_at = self.clock()
        if self.started:
            self.live.update(self._render(), refresh=True)
        elif self.running:
            self.live = Live(self._render(), console=self.console, auto_refresh=False)
            self.live.start(refresh=True)
            self.started = True

    # ------------------------------------------------------------------ the panel's parts

    def _progress(self) -> Table:
        st = self.state
        grid = Table.grid(padding=(0, 2))
        ev = st.eval_text()
        grid.add_row(
            "[bold]training",
            ProgressBar(total=max(self.total, 1), completed=min(st.step, self.total), width=40),
            f"{st.step}/{self.total}",
            st.eta_text(live=True),
            "" if ev is None else f"eval {ev}",
        )
        if st.phase is None:
            grid.add_row("[dim]phase", "", "[dim]-", "", "")
        else:
            phase, done, total, note = st.phase
            unit = UNITS.get(phase)
            bar: RenderableType = ""
            count = ""
            if unit is not None and total > 0:
                bar = ProgressBar(total=total, completed=min(done, total), width=40)
                count = f"{done}/{total} {unit}" + (f" · {note}" if note else "")
            grid.add_row(
                f"[bold]step {st.phase_step()} · {phase}",
                bar,
                count,
                f"{self.clock() - st.phase_since:.0f}s",
                "",
            )
        return grid

    def _rewards(self) -> Table:
        g = self.m.get
        t = Table(title="rewards", show_header=False, box=None)
        rows: list[tuple[str, str, str]] = [
            ("reward", "reward", ".3f"),
            ("accuracy lenient", "accuracy/lenient", ".3f"),
        ]
        if self.strict is not None:  # what the prompt's answer format asks for
            rows.insert(1, (f"accuracy {self.strict}", "accuracy/strict", ".3f"))
        if not self._teacherless():  # without a teacher the group mix is in its own panel
            rows += [
                ("all correct", "cast/groups/all_correct", ".2f"),
                ("all wrong", "cast/groups/all_wrong", ".2f"),
                ("mixed", "cast/groups/mixed", ".2f"),
            ]
        rows += [
            ("length", "completions/mean_length", ".1f"),
            ("truncated", "completions/clipped_ratio", ".2f"),
            ("length drift (0/1)", "health/drift", "d"),
        ]
        t.add_row("eval accuracy", self.state.eval_text() or "-")
        for label, key, spec in rows:
            t.add_row(label, _f(g(key), spec))
        return t

    def _facts(self) -> AlgorithmFacts | None:
        """The run's algorithm facts; None before the header names it (or for a name not known)."""
        return ALGORITHMS.get(self.state.algorithm)

    def _teacherless(self) -> bool:
        """A known algorithm without a teacher (GRPO): its signal panel replaces the gap table."""
        facts = self._facts()
        return facts is not None and not facts.uses_teacher

    def _cast_panel(self) -> Table:
        """The teacher's gap table, with the rows that apply to the algorithm: flips, the
        ±a_max clip and the zero-variance base only where its facts say it has them (all of
        them while the algorithm is unknown)."""
        facts = self._facts()
        g = self.m.get
        flips = facts is None or facts.flips
        clips = facts is None or facts.clips_at_a_max
        zero_var = facts is None or facts.zero_var_base
        t = Table(title="CAST gap table", box=None)
        t.add_column("")
        for col in ("share", "|g|", "flipped" if flips else ""):
            t.add_column(col, justify="right")
        for traj in ("correct", "wrong"):
            for sign, word in (("pos", "teacher +"), ("neg", "teacher -")):
                k = f"cast/gap/{traj}_{sign}"
                flipped = _f(g(f"{k}/flipped"), ".2f") if flips else ""
                t.add_row(f"{traj} {word}", _f(g(f"{k}/share"), ".2f"), _f(g(f"{k}/abs_mean"), ".3f"), flipped)
        if flips:
            t.add_row("flip down/up", _f(g("cast/flip/down_share"), ".2f"), "", _f(g("cast/flip/up_share"), ".2f"))
        t.add_row(
            "adv mean/min/max",
            _f(g("cast/adv/mean"), ".2f"),
            _f(g("cast/adv/min"), ".2f"),
            _f(g("cast/adv/max"), ".2f"),
        )
        if clips:
            t.add_row("at ±a_max", _f(g("cast/adv/at_a_max_share"), ".2f"), "", "")
        t.add_row(
            "EOS g<0 / content g<0",
            _f(g("cast/eos/neg_gap_share"), ".2f"),
            "",
            _f(g("cast/content/neg_gap_share"), ".2f"),
        )
        t.add_row(
            "EOS adv correct/wrong (mixed)",
            _f(g("cast/eos/adv_mean/mixed_correct"), ".2f"),
            "",
            _f(g("cast/eos/adv_mean/mixed_wrong"), ".2f"),
        )
        if zero_var:  # only a zero-variance base gives all-correct / all-wrong groups an advantage
            t.add_row(
                "EOS adv all-correct/all-wrong",
                _f(g("cast/eos/adv_mean/all_correct"), ".2f"),
                "",
                _f(g("cast/eos/adv_mean/all_wrong"), ".2f"),
            )
        return t

    def _grpo_panel(self) -> Table:
        """GRPO's learning signal: which groups carry gradient, the advantages, the clip."""
        g = self.m.get
        t = Table(title="GRPO signal", show_header=False, box=None)
        t.add_row("groups mixed", _f(g("cast/groups/mixed"), ".2f"))
        t.add_row("groups all correct", _f(g("cast/groups/all_correct"), ".2f"))
        t.add_row("groups all wrong", _f(g("cast/groups/all_wrong"), ".2f"))
        t.add_row("reward std (groups)", _f(g("reward_std"), ".3f"))
        t.add_row(
            "adv mean/min/max",
            f"{_f(g('cast/adv/mean'), '.2f')} / {_f(g('cast/adv/min'), '.2f')} / {_f(g('cast/adv/max'), '.2f')}",
        )
        t.add_row(
            "EOS adv correct/wrong",
            f"{_f(g('cast/eos/adv_mean/mixed_correct'), '.2f')} / {_f(g('cast/eos/adv_mean/mixed_wrong'), '.2f')}",
        )
        self._clip_rows(t)
        return t

    def _clip_rows(self, t: Table) -> None:
        """The clip shares and the rows without loss: in the GRPO signal panel without a
        teacher, else in the optimisation panel."""
        g = self.m.get
        t.add_row("clip low/high", f"{_f(g('clip_ratio/low_mean'))} / {_f(g('clip_ratio/high_mean'))}")
        t.add_row("rows skipped", _f(g("rows_skipped"), "d"))

    def _optimisation(self) -> Table:
        g = self.m.get
        grpo = self._teacherless()
        t = Table(title="optimisation", show_header=False, box=None)
        t.add_row("loss", _f(g("loss"), ".4f"))
        t.add_row("grad norm", _f(g("grad_norm"), ".3f"))
        t.add_row("lr", _f(g("learning_rate"), ".2e"))
        if not grpo:  # without a teacher: in the GRPO signal panel
            self._clip_rows(t)
        t.add_row("entropy", _f(g("entropy"), ".3f"))
        t.add_row("kl", _f(g("kl"), ".4f"))
        t.add_row("gen tok/s", _f(g("tokens_per_s/generate"), ".0f"))
        t.add_row("train tok/s", _f(g("tokens_per_s/train"), ".0f"))
        t.add_row(
            "step s",
            f"{_f(g('time/step'), '.1f')} ("
            + "/".join(_f(g(f"time/{p}"), ".1f") for p in ("sample", "verify", "teacher", "update"))
            + ")",
        )
        evals = self.state.eval_times
        t.add_row("eval s (mean)", _f(_mean(evals) if evals else None, ".1f"))
        t.add_row("peak / rss GB", f"{_f(g('memory/peak_gb'), '.2f')} / {_f(g('memory/rss_gb'), '.2f')}")
        return t

    def _sample(self) -> Panel | None:
        if not self.samples:
            return None
        i = int((self.clock() - self.samples_at) // self.sample_period) % len(self.samples)
        s = self.samples[i]
        kind = "correct" if s["reward"] >= CORRECT else "wrong"
        of = f" {i + 1}/{len(self.samples)}" if len(self.samples) > 1 else ""
        return Panel(_sample_text(s), title=f"sample ({kind}{of})", expand=True)

    def _render(self) -> Panel:
        items = dict(self.info)  # the run's facts; info's step is where this invocation started
        if isinstance(start := items.get("step"), int):  # the current step, as `7/24`
            items["step"] = f"{self.state.step}/{self.total}" + (f" (resumed at {start})" if start else "")
        head = Table.grid(padding=(0, 2))
        head.add_row(*[f"[dim]{k}[/] {escape(str(v))}" for k, v in items.items()])
        algo = self._grpo_panel() if self._teacherless() else self._cast_panel()
        body = Table.grid(padding=(0, 3))
        body.add_row(self._rewards(), algo, self._optimisation())
        parts: list[RenderableType] = [head, self._progress(), body]
        if (sample := self._sample()) is not None:
            parts.append(sample)
        return Panel(Group(*parts), title="cast-mlx")


def make_view(
    total: int, live: bool, force_terminal: bool = False, eval_every: int = 0, answer_format: str | None = None
) -> TrainingCallback:
    """RichView on a TTY when `live`, else PlainView. `force_terminal`: draw the live view
    even though stdout is not a TTY (rank 0 under `mlx.launch`, whose stdout is a pipe that
    the launcher copies to its terminal). `eval_every`: the recipe's `logging.eval_every`,
    for the evals the ETA counts. `answer_format`: the recipe's `data.answer_format`, which
    says what strict accuracy means (`data.strict_label`; None: not known, plain "strict")."""
    if live and (force_terminal or sys.stdout.isatty()):
        console = Console(force_terminal=True) if force_terminal else None
        return RichView(total, console, eval_every=eval_every, answer_format=answer_format)
    return PlainView(total, eval_every=eval_every)
