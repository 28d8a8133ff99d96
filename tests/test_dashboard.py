"""The live view renders every metric the trainer writes; the plain view is one line a step."""

from __future__ import annotations

import io

from rich.console import Console

from cast_mlx.dashboard import PlainView, RichView, make_view

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
