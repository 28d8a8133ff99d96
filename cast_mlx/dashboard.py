"""What a run shows while it trains: a `rich` live dashboard on a terminal, plain lines
elsewhere (CI, pipes, `--no-dashboard`). Both are training callbacks
(`cast_mlx.callbacks.TrainingCallback`):

    view = make_view(total_steps, live=True)
    view.on_train_begin(info); view.on_metrics(metrics, samples); view.on_train_end()

A metrics line without `reward` is the step-0 eval: it is shown as a message.
"""

from __future__ import annotations

import sys

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from cast_mlx.callbacks import TrainingCallback


def _f(x, spec=".3f") -> str:
    return "-" if x is None else format(x, spec)


def _eval_message(m: dict) -> str:
    return f"step {m['step']} eval accuracy {m['eval/accuracy']:.3f} (n={m['eval/n']})"


class PlainView(TrainingCallback):
    """One log line per step (stdout)."""

    def __init__(self, total: int, stream=None):
        self.total, self.stream = total, stream or sys.stdout

    def on_train_begin(self, info: dict) -> None:
        print(" | ".join(f"{k}: {v}" for k, v in info.items()), file=self.stream, flush=True)

    def on_metrics(self, m: dict, samples: list[dict]) -> None:
        if "reward" not in m:
            return self.on_message(_eval_message(m))
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
        ]
        if "eval/accuracy" in m:
            parts.append(f"eval {_f(m['eval/accuracy'], '.3f')}")
        if m.get("health/drift"):
            parts.append("LENGTH DRIFT")
        print(" | ".join(parts), file=self.stream, flush=True)

    def on_message(self, text: str) -> None:
        print(text, file=self.stream, flush=True)


class RichView(TrainingCallback):
    """A live panel: progress/ETA, rewards, group mix, CAST gap table, timings, memory."""

    def __init__(self, total: int, console: Console | None = None):
        self.total = total
        self.info: dict = {}
        self.console = console or Console()
        self.progress = Progress(TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        self.task = self.progress.add_task("steps", total=total)
        self.live = Live(console=self.console, refresh_per_second=2)

    def on_train_begin(self, info: dict) -> None:
        self.info = info
        self.live.update(self._render({}, []))
        self.live.start()

    def on_train_end(self) -> None:
        self.live.stop()

    def on_message(self, text: str) -> None:
        self.console.print(text)

    def on_metrics(self, m: dict, samples: list[dict]) -> None:
        if "reward" not in m:
            return self.on_message(_eval_message(m))
        self.progress.update(self.task, completed=m["step"])
        self.live.update(self._render(m, samples))

    def _render(self, m: dict, samples: list[dict]):
        g = m.get
        head = Table.grid(padding=(0, 2))
        head.add_row(*[f"[dim]{k}[/] {v}" for k, v in self.info.items()])

        left = Table(title="rewards", show_header=False, box=None)
        for label, key, spec in (
            ("reward", "reward", ".3f"),
            ("accuracy strict", "accuracy/strict", ".3f"),
            ("accuracy lenient", "accuracy/lenient", ".3f"),
            ("eval accuracy", "eval/accuracy", ".3f"),
            ("all correct", "cast/groups/all_correct", ".2f"),
            ("all wrong", "cast/groups/all_wrong", ".2f"),
            ("mixed", "cast/groups/mixed", ".2f"),
            ("length", "completions/mean_length", ".1f"),
            ("truncated", "completions/clipped_ratio", ".2f"),
            ("length drift (0/1)", "health/drift", "d"),
        ):
            left.add_row(label, _f(g(key), spec))

        mid = Table(title="CAST gap table", box=None)
        mid.add_column("")
        for col in ("share", "|g|", "flipped"):
            mid.add_column(col, justify="right")
        for traj in ("correct", "wrong"):
            for sign, word in (("pos", "teacher +"), ("neg", "teacher -")):
                k = f"cast/gap/{traj}_{sign}"
                mid.add_row(
                    f"{traj} {word}",
                    _f(g(f"{k}/share"), ".2f"),
                    _f(g(f"{k}/abs_mean"), ".3f"),
                    _f(g(f"{k}/flipped"), ".2f"),
                )
        mid.add_row("flip down/up", _f(g("cast/flip/down_share"), ".2f"), "", _f(g("cast/flip/up_share"), ".2f"))
        mid.add_row(
            "adv mean/min/max",
            _f(g("cast/adv/mean"), ".2f"),
            _f(g("cast/adv/min"), ".2f"),
            _f(g("cast/adv/max"), ".2f"),
        )
        mid.add_row("at ±a_max", _f(g("cast/adv/at_a_max_share"), ".2f"), "", "")
        mid.add_row(
            "EOS g<0 / content g<0",
            _f(g("cast/eos/neg_gap_share"), ".2f"),
            "",
            _f(g("cast/content/neg_gap_share"), ".2f"),
        )
        mid.add_row(
            "EOS adv correct/wrong (mixed)",
            _f(g("cast/eos/adv_mean/mixed_correct"), ".2f"),
            "",
            _f(g("cast/eos/adv_mean/mixed_wrong"), ".2f"),
        )
        mid.add_row(
            "EOS adv all-correct/all-wrong",
            _f(g("cast/eos/adv_mean/all_correct"), ".2f"),
            "",
            _f(g("cast/eos/adv_mean/all_wrong"), ".2f"),
        )

        right = Table(title="optimisation", show_header=False, box=None)
        for label, metric, fmt in (
            ("loss", "loss", ".4f"),
            ("grad norm", "grad_norm", ".3f"),
            ("lr", "learning_rate", ".2e"),
            ("clip low/high", None, None),
            ("entropy", "entropy", ".3f"),
            ("kl", "kl", ".4f"),
            ("gen tok/s", "tokens_per_s/generate", ".0f"),
            ("train tok/s", "tokens_per_s/train", ".0f"),
            ("step s (sample/verify/teacher/update)", None, None),
            ("peak / rss GB", None, None),
        ):
            if label == "clip low/high":
                right.add_row(label, f"{_f(g('clip_ratio/low_mean'))} / {_f(g('clip_ratio/high_mean'))}")
            elif label.startswith("step s"):
                right.add_row(
                    "step s",
                    f"{_f(g('time/step'), '.1f')} ("
                    + "/".join(_f(g(f"time/{p}"), ".1f") for p in ("sample", "verify", "teacher", "update"))
                    + ")",
                )
            elif label.startswith("peak"):
                right.add_row(label, f"{_f(g('memory/peak_gb'), '.2f')} / {_f(g('memory/rss_gb'), '.2f')}")
            else:
                right.add_row(label, _f(g(metric), fmt))

        body = Table.grid(padding=(0, 3))
        body.add_row(left, mid, right)
        parts: list[RenderableType] = [head, self.progress, body]
        if samples:
            s = samples[0]
            text = s["completion"].strip().replace("\n", " ")
            parts.append(
                Panel(
                    f"[dim]{s['problem'][:160]}[/]\n{text[:400]}\n"
                    f"[bold]reward {s['reward']:.0f}[/] (gold {s['gold']}, {s['finish']})",
                    title="sample",
                    expand=True,
                )
            )
        return Panel(Group(*parts), title="cast-mlx")


def make_view(total: int, live: bool, force_terminal: bool = False) -> TrainingCallback:
    """RichView on a TTY when `live`, else PlainView. `force_terminal`: draw the live view
    even though stdout is not a TTY (rank 0 under `mlx.launch`, whose stdout is a pipe that
    the launcher copies to its terminal)."""
    if live and (force_terminal or sys.stdout.isatty()):
        return RichView(total, Console(force_terminal=True) if force_terminal else None)
    return PlainView(total)
