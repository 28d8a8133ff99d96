"""Agreement of our verifier with math-verify (the `math_verify` reward): one JSON line of counts.

Judges (a) every committed completion, the records of the git-tracked `docs/runs/**/samples.jsonl`,
against its gold, and (b) every GSM8K gold solution (train and test, from
`../shared/data/gsm8k/`) against its own final answer, where both should say correct. Ours runs as the trainer runs it
(`Verifier`, answer_format hash) in both strictness modes; math-verify runs in the same worker
pool, one call per completion under --timeout. Each (source, mode) pair is counted as
agree-correct, agree-wrong, ours-only (only ours says correct), mv-only, and the rows where a
side cannot read the gold. Disagreements are sorted into classes by their cause, and the
markdown report shows examples of each with the judgement of who is right
(`JUDGEMENTS`, written after reading them). Needs the math-verify extra.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from cast_mlx.tasks.data import hash_gold
from cast_mlx.tasks.verify import (
    Verdict,
    Verifier,
    extract_answer,
    mathverify,
    normalize_answer,
    parse_gold,
    parse_number,
    quick_equivalent,
)

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k"
MODES = ("lenient", "strict")
OUTCOMES = ("agree_correct", "agree_wrong", "ours_only", "mv_only", "ours_no_gold", "mv_no_gold")
COMMAND = "python scripts/verify_agreement.py"
TAIL = 160  # characters of a completion shown in an example

NO_MARKER = "no marker (strict needs `####`)"
EXPRESSION = "math-verify read an expression and evaluated it"
OTHER = "another number read"
# Who is right in each disagreement class, decided by reading every row of it (the report
# prints examples under each). Key: "<source>: <direction>: <cause>", direction as in OUTCOMES.
JUDGEMENTS = {
    f"samples: mv_only: {NO_MARKER}": (
        "neither is wrong: it is the definition. Strict mode asks for the answer after `####`, which "
        "these completions never write; math-verify has no strict mode and reads an answer anywhere. "
        "Lenient mode is the like-for-like comparison."
    ),
    f"samples: mv_only: {EXPRESSION}": (
        "**ours**, in every row. math-verify reads an expression that restates the question "
        "(`To calculate 47 + 1, you simply add them together.`) and evaluates it to the gold, even "
        "when the completion states a wrong answer (`43 + 7 = 12`). As a reward on arithmetic this "
        "pays a policy for repeating the problem; ours reads the number the completion gives."
    ),
    f"samples: mv_only: {OTHER}": (
        "**math-verify**, in every row. The completion states its answer (`The answer is 15.`, `9 - 5 "
        "equals 4`) and then keeps generating numbers; math-verify ranks a stated answer first, our lenient chain "
        "(the `####` answer, else the boxed one, else the last number) takes the last number of the "
        "ramble. Ours does what it documents; not changed, see the decision."
    ),
    f"samples: ours_only: {OTHER}": (
        "**ours**, in all but one row: math-verify anchors on the word *answer* in prose (`the answer "
        "is the sum of the numbers 47 and 1` -> 47) or reads a list number (`1.`). In "
        "`study-24-cpu/cast-seed1/samples.jsonl:31` neither reads a real final answer (`28 + 9 = 37` "
        "and then `66`); our last number happens to be the gold."
    ),
    f"gsm8k: ours_only: {OTHER}": (
        "**ours**, in every row: these are GSM8K's own gold solutions, whose answer is the `#### N` "
        "they end with. math-verify ranks a number near the word *answer* in the reasoning higher "
        "(`Kim answered 22+3=<<22+3=25>>25 questions` -> 25, `the final answer is 15 gallons * 8 pints` "
        "-> 15), or a percentage before its rounding (`33.333%, which rounds down to 33%`)."
    ),
}


@dataclass
class Record:
    source: str  # "samples" or "gsm8k"
    where: str  # file:line
    completion: str
    gold: str
    recorded: float | None = None  # samples.jsonl's reward, as the run judged it
    ours: dict[str, Verdict | None] = field(default_factory=dict)  # by mode: the verdict (None: no gold)
    ours_answer: dict[str, str | None] = field(default_factory=dict)  # by mode: the answer ours judged
    mv: float | None = None  # 1.0 / 0.0; None: math-verify cannot read the gold
    mv_answer: str | None = None
    mv_timed_out: bool = False


# ---- the records ------------------------------------------------------------------------


def committed(runs: Path) -> list[Path]:
    """The samples.jsonl files under `runs` that git tracks (a run still being written is not
    committed); every one found when `runs` is not in a git checkout."""
    found = sorted(runs.glob("**/samples.jsonl"))
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--", "."], cwd=runs, capture_output=True, check=True, text=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return found
    tracked = {(runs / name).resolve() for name in listed.split("\0") if name}
    return [path for path in found if path.resolve() in tracked]


def sample_records(runs: Path) -> list[Record]:
    out = []
    for path in committed(runs):
        with path.open(encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                row = json.loads(line)
                where = f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{i}"
                out.append(Record("samples", where, row["completion"], str(row["gold"]), recorded=row.get("reward")))
    return out


def gsm8k_records(folder: Path) -> list[Record]:
    out = []
    for split in ("train", "test"):
        path = folder / f"{split}.jsonl"
        if not path.is_file():
            continue
        with path.open(encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                solution = json.loads(line)["answer"]
                out.append(Record("gsm8k", f"gsm8k/{split}.jsonl:{i}", solution, hash_gold(solution)))
    return out


# ---- judging ----------------------------------------------------------------------------


def judge_ours(records: list[Record], verifier: Verifier) -> None:
    verdicts = verifier.verify_batch([(r.completion, r.gold, "hash") for r in records])
    for r, v in zip(records, verdicts):
        r.ours = {"lenient": v, "strict": v}
        r.ours_answer = {"lenient": v.pred if v else None, "strict": extract_answer(r.completion, "hash")}


def judge_mv(records: list[Record], verifier: Verifier, timeout: float) -> None:
    assert verifier.pool is not None
    found = mathverify.results(
        verifier.pool, [r.completion for r in records], [r.gold for r in records], timeout=timeout, load_timeout=120
    )
    for r, result in zip(records, found):
        if result is None:  # past the limit: counted as wrong, as the reward counts it
            r.mv, r.mv_answer, r.mv_timed_out = 0.0, None, True
        else:
            _, r.mv, r.mv_answer = result


def ours_correct(r: Record, mode: str) -> bool | None:
    v = r.ours[mode]
    if v is None:
        return None
    return bool(v.strict if mode == "strict" else v.lenient)


def outcome(ours: bool | None, mv: float | None) -> str:
    """Which of OUTCOMES a row is, from our verdict (None: no gold) and math-verify's value."""
    if ours is None:
        return "ours_no_gold"
    if mv is None:
        return "mv_no_gold"
    if ours and mv:
        return "agree_correct"
    if not ours and not mv:
        return "agree_wrong"
    return "ours_only" if ours else "mv_only"


def same_answer(a: str | None, b: str | None) -> bool:
    """Whether the two verifiers read the same answer (the cheap rungs of our ladder, no sympy)."""
    if a is None or b is None:
        return False
    parsed = parse_gold(a)
    return parsed is not None and quick_equivalent(b, parsed) is True


def cause(r: Record, mode: str, kind: str) -> str:
    """The class of a disagreement (`kind` is ours_only or mv_only): why the two differ."""
    ours_answer = r.ours_answer[mode]
    if kind == "mv_only" and ours_answer is None:
        return NO_MARKER if mode == "strict" else "no answer read by ours"
    if kind == "ours_only" and r.mv_answer is None:
        return "no answer read by math-verify"
    if same_answer(ours_answer, r.mv_answer):
        return "the same answer, judged differently"
    if r.mv_answer is not None and parse_number(normalize_answer(r.mv_answer.removesuffix("*(1/100)"))) is None:
        return EXPRESSION  # not a plain number (a percent reads as `N*(1/100)`)
    return OTHER


# ---- the report -------------------------------------------------------------------------


def count(records: list[Record]) -> dict:
    counts: dict = {}
    for source in ("samples", "gsm8k"):
        rows = [r for r in records if r.source == source]
        if not rows:
            continue
        counts[source] = {"n": len(rows), "mv_timeouts": sum(r.mv_timed_out for r in rows)}
        for mode in MODES:
            tally = Counter(outcome(ours_correct(r, mode), r.mv) for r in rows)
            counts[source][mode] = {key: tally.get(key, 0) for key in OUTCOMES}
        if source == "samples":  # the recorded rewards were judged lenient: do they still hold?
            counts[source]["recorded_vs_lenient_now"] = sum(
                r.recorded is not None and float(bool(ours_correct(r, "lenient"))) != r.recorded for r in rows
            )
    return counts


def classes(records: list[Record]) -> dict[tuple[str, str, str], list[Record]]:
    """(source, mode, "<direction>: <cause>") -> the disagreeing records, in order."""
    out: dict[tuple[str, str, str], list[Record]] = {}
    for r in records:
        for mode in MODES:
            kind = outcome(ours_correct(r, mode), r.mv)
            if kind in ("ours_only", "mv_only"):
                out.setdefault((r.source, mode, f"{kind}: {cause(r, mode, kind)}"), []).append(r)
    return out


def _cell(text: str | None) -> str:
    if text is None:
        return "—"
    text = text.replace("|", "\\|").replace("`", "'").replace("\n", "⏎")
    return f"`{text}`" if text.strip() else "—"


def _table(rows: list[Record], mode: str) -> list[str]:
    lines = ["| where | completion (its end) | gold | ours read | math-verify read |", "|---|---|---|---|---|"]
    for r in rows:
        tail = ("…" if len(r.completion) > TAIL else "") + r.completion[-TAIL:]
        lines.append(
            f"| {r.where} | {_cell(tail)} | {_cell(r.gold)} | {_cell(r.ours_answer[mode])} | {_cell(r.mv_answer)} |"
        )
    return lines


def decision(counts: dict, found: dict[tuple[str, str, str], list[Record]]) -> list[str]:
    """The decision, with this run's numbers."""

    def size(source: str, name: str) -> int:
        return len(found.get((source, "lenient", name), []))

    lines = ["## The decision", ""]
    if "samples" in counts:
        c = counts["samples"]
        m = c["lenient"]
        lines.append(
            f"**Our verifier stays the default.** On the {c['n']} committed completions, lenient mode, the two "
            f"agree on {m['agree_correct'] + m['agree_wrong']} ({m['agree_correct']} correct, {m['agree_wrong']} "
            f"wrong) and disagree on {m['ours_only'] + m['mv_only']}. Ours is right on the "
            f"{size('samples', f'mv_only: {EXPRESSION}')} rows where math-verify evaluates an expression (a "
            "restated question evaluated to the gold: a reward a policy can learn to collect) and on the "
            f"{size('samples', f'ours_only: {OTHER}')} ours-only rows but one (a tie: neither reads a real answer); "
            f"math-verify is right on the {size('samples', f'mv_only: {OTHER}')} rows where a completion "
            "states its answer and then rambles on."
        )
    if "gsm8k" in counts:
        c = counts["gsm8k"]
        ours_right = c["strict"]["agree_correct"] + c["strict"]["ours_only"]
        lines += [""] if len(lines) > 2 else []
        lines.append(
            f"On GSM8K's {c['n']} gold solutions, ours calls {ours_right} correct in strict mode, and "
            f"math-verify calls {c['lenient']['ours_only'] + c['lenient']['agree_wrong']} of them wrong: "
            "it does not know that `####` marks the answer."
        )
    lines += [
        "",
        "math-verify stays an optional built-in, `reward.functions: [math_verify]`, for a comparison with "
        "setups that use TRL's `accuracy_reward`; it is not a better default here.",
        "",
        "**Fixed in ours** (a regression test each in `tests/test_verify.py`): a quoted marker. A completion "
        'that writes `The final answer after "####" is 30.` named the marker; the prose after it was read as '
        'its answer (`" is 30`), and a correct answer scored 0. `extract_hash` now skips a `####` in '
        "quotes, and such a completion goes down the lenient chain (here: the last number, 30). It changes "
        "the committed samples' recorded rewards listed under *Recorded rewards* below, each 0 -> 1.",
        "",
        "**Not changed:** reading `The answer is N.` before the last number would fix the rows where "
        "math-verify is right, but the same rule misreads other committed completions (`The final answer is "
        "20. 16 + 8 = 24.`, `The answer is 12. The answer is 12 - 2 = 10.`, where the last number is the "
        "gold), and it would change the reward and the accuracy that the committed studies were measured "
        "with. Strict mode, which requires `####`, is not affected.",
    ]
    return lines


def report(records: list[Record], counts: dict, args: argparse.Namespace, examples: int) -> str:
    version = metadata.version("math-verify")
    found = classes(records)
    lines = [
        "# Our verifier and math-verify: the agreement study",
        "",
        "Generated by `scripts/verify_agreement.py`, which also writes the counts to",
        "[`runs/verify-agreement.json`](runs/verify-agreement.json); do not edit it by hand:",
        "",
        "```bash",
        COMMAND,
        "```",
        "",
        f"math-verify {version}; our verifier as the trainer runs it (`Verifier`, answer_format hash), in "
        f"both modes; math-verify in the same worker pool, {args.timeout:g} s per call, as the `math_verify` "
        "reward runs ([howto-reward-plugin.md](howto-reward-plugin.md#math_verify-a-second-opinion)).",
        "",
        "- **samples**: every committed completion (`docs/runs/**/samples.jsonl`, arithmetic level 1,",
        "  SmolLM2-135M) against its gold;",
        "- **gsm8k**: every GSM8K gold solution (train and test) against its own final answer: both",
        "  verifiers should say correct.",
        "",
        "ours-only: only our verifier says correct; mv-only: only math-verify does; no-gold: that side",
        "cannot read the gold answer (the row would leave the loss). In the examples, *math-verify read* is",
        "the sympy object it compared, as sympy prints it (an unevaluated `8 - 3` prints as `8 - 1*3`).",
        "",
        "## Counts",
        "",
        "| source | mode (ours) | n | agree, correct | agree, wrong | ours-only | mv-only | ours no-gold "
        "| mv no-gold |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for source, c in counts.items():
        for mode in MODES:
            cells = " | ".join(str(c[mode][k]) for k in OUTCOMES)
            lines.append(f"| {source} | {mode} | {c['n']} | {cells} |")
    timeouts = ", ".join(f"{source} {c['mv_timeouts']}" for source, c in counts.items())
    lines += ["", f"math-verify calls past the limit (counted wrong): {timeouts}.", ""]
    lines += decision(counts, found)
    lines += ["", "## The disagreement classes", ""]
    if not found:
        lines.append("None: the two verifiers agree on every row.")
    for (source, mode, name), rows in sorted(found.items(), key=lambda kv: (kv[0][0], kv[0][1], -len(kv[1]))):
        if mode == "strict" and found.get((source, "lenient", name)) == rows:
            continue  # the same rows in both modes: shown once, under lenient
        if mode == "lenient" and found.get((source, "strict", name)) == rows:
            mode_label = "both modes"
        else:
            mode_label = mode
        verdict = JUDGEMENTS.get(f"{source}: {name}") or "not judged yet"
        shown = rows if len(rows) <= 2 * examples else rows[:examples]
        more = f" ({len(shown)} shown)" if len(shown) < len(rows) else ""
        lines += [f"### {source}, {mode_label}: {name}: {len(rows)} rows{more}", "", f"Who is right: {verdict}", ""]
        lines += _table(shown, mode) + [""]
    if "samples" in counts:
        changed = [
            r
            for r in records
            if r.source == "samples"
            and r.recorded is not None
            and float(bool(ours_correct(r, "lenient"))) != r.recorded
        ]
        lines += [
            "## Recorded rewards",
            "",
            f"Committed samples whose recorded reward (lenient, as their run judged them) differs from our "
            f"lenient verdict today: {len(changed)}.",
            "",
        ]
        if changed:
            lines += _table(changed, "lenient") + [""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=ROOT / "docs" / "runs", help="where the samples.jsonl are")
    parser.add_argument("--gsm8k", type=Path, default=GSM8K, help="GSM8K's folder (train.jsonl, test.jsonl)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "verify-agreement.md", help="the report")
    parser.add_argument("--json", type=Path, default=ROOT / "docs" / "runs" / "verify-agreement.json")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per math-verify call (reward.timeout)")
    parser.add_argument("--limit", type=int, default=0, help="judge only the first N records of each source")
    parser.add_argument("--examples", type=int, default=4, help="examples shown per class")
    args = parser.parse_args(argv)
    try:
        metadata.version("math-verify")
    except metadata.PackageNotFoundError:
        print(f"math-verify is not installed: {mathverify.INSTALL}", file=sys.stderr)
        return 2
    records = sample_records(args.runs)
    if args.gsm8k.is_dir():
        records += gsm8k_records(args.gsm8k)
    else:
        print(f"no GSM8K folder at {args.gsm8k}: judging the committed completions only", file=sys.stderr)
    if args.limit:
        records = [r for s in ("samples", "gsm8k") for r in [x for x in records if x.source == s][: args.limit]]
    start = time.monotonic()
    with Verifier(workers=args.workers, timeout=2.0) as verifier:
        chunk = 500
        for i in range(0, len(records), chunk):
            part = records[i : i + chunk]
            judge_ours(part, verifier)
            judge_mv(part, verifier, args.timeout)
            print(f"{i + len(part)}/{len(records)} judged, {time.monotonic() - start:.0f}s", file=sys.stderr)
    counts = count(records)
    line = json.dumps(counts, sort_keys=True)
    print(line)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(line + "\n")
    args.out.write_text(report(records, counts, args, args.examples))
    return 0


if __name__ == "__main__":
    sys.exit(main())
