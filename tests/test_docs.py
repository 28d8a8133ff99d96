"""The README is a front door and the docs cannot go stale: its length, the generated
recipe reference, every quoted command parses, every local link exists."""

from __future__ import annotations

import json
import re
import shlex

import pytest

from helpers import ROOT, run_cli

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CODE = re.compile(r"```[a-z]*\n(.*?)```", re.S)
INLINE = re.compile(r"`([^`\n]+)`")


def quoted_commands(prefix: str) -> list[tuple[str, str]]:
    """`(page, command)` for every line in a code block, and every inline code span, that
    starts with `prefix` (after `$ ` or a venv's bin/)."""
    found = []
    for page in PAGES:
        text = page.read_text()
        blocks = [block.replace("\\\n", " ") for block in CODE.findall(text)]  # joined continuations
        spans = [line for block in blocks for line in block.splitlines()]
        spans += INLINE.findall(CODE.sub("", text))
        for span in spans:
            span = re.sub(r"^(\$ |\.venv/bin/)", "", span.strip()).split("  #")[0].strip()
            if span.startswith(prefix):
                found.append((page.name, span))
    return found


def test_the_readme_is_short():
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines <= 250, f"README.md has {lines} lines; move detail into docs/"


def test_the_readme_starts_with_the_two_commands():
    first = (ROOT / "README.md").read_text().split("```")[1].strip().splitlines()
    assert first[0] == "bash"
    assert first[1].endswith("python -m cast_mlx.train --recipe recipes/smollm2-135m-arith.yaml")
    assert first[2].endswith("python -m pytest -q") and len(first) == 3


def test_the_recipe_reference_is_generated():
    proc = run_cli("-m", "cast_mlx.config_reference", "--check", "docs/recipe-reference.md", timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_the_reference_check_can_fail(tmp_path):
    stale = tmp_path / "ref.md"
    stale.write_text((ROOT / "docs/recipe-reference.md").read_text().replace("`data.task`", "`data.tusk`"))
    proc = run_cli("-m", "cast_mlx.config_reference", "--check", str(stale), timeout=120)
    assert proc.returncode == 1 and "stale" in proc.stderr


CHECK_HELP = """
import contextlib, importlib, io, json, sys
results = {}
for name in json.loads(sys.argv[1]):
    module = importlib.import_module(name)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            module.main(["--help"])
        results[name] = "returned"
    except SystemExit as exc:
        results[name] = exc.code
print(json.dumps(results))
"""


def test_every_quoted_command_module_exists_and_parses_help():
    names = {cmd.split()[2] for _, cmd in quoted_commands("python -m cast_mlx.")}
    modules = sorted(n for n in names if n.islower())  # not a pattern such as cast_mlx.X
    assert "cast_mlx.train" in modules and "cast_mlx.eval" in modules  # the extraction works
    proc = run_cli("-c", CHECK_HELP, json.dumps(modules), timeout=300)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results == {m: 0 for m in modules}


def train_commands() -> list[tuple[str, list[str]]]:
    """The quoted `python -m cast_mlx.train --recipe R ...` commands: their arguments."""
    out = []
    for page, cmd in quoted_commands("python -m cast_mlx.train --recipe "):
        args = shlex.split(cmd)[3:]
        if "[" in cmd or not (ROOT / args[1]).is_file():  # a placeholder, not a real recipe
            continue
        out.append((page, args))
    return out


@pytest.mark.parametrize("page, args", train_commands())
def test_quoted_training_commands_parse(page, args):
    args = [a for a in args if a not in ("--dry-run", "--no-dashboard", "--quiet")]
    proc = run_cli("-m", "cast_mlx.train", *args, "--print-config", timeout=120)
    assert proc.returncode == 0, f"{page}: {' '.join(args)}: {proc.stderr}"


def test_quoted_scripts_exist():
    scripts = {shlex.split(cmd)[1] for _, cmd in quoted_commands("python scripts/")}
    assert scripts, "no script quoted"
    assert sorted(s for s in scripts if not (ROOT / s).is_file()) == []


LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("page", ["README.md", "docs/index.md"])
def test_local_links_exist(page):
    path = ROOT / page
    links = [link for link in LINK.findall(path.read_text()) if "://" not in link]
    assert links
    assert [link for link in links if not (path.parent / link).exists()] == []
