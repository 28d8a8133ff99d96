"""The README is a front door and the docs cannot go stale: its length, the generated
recipe reference, every quoted command parses, every local link and anchor exists, the
README's file tree and step table name what the package holds. No model is loaded."""

from __future__ import annotations

import ast
import json
import re
import shlex

import pytest

from helpers import ROOT, run_cli

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]  # docs/runs/ is not a page
CODE = re.compile(r"```[a-z]*\n(.*?)```", re.S)
INLINE = re.compile(r"`([^`\n]+)`")
PREFIXES = ("python -m cast_mlx.", "python scripts/", "cast-mlx ")
SHELL = {">", ">>", "|", "&&", ";", "2>", "2>&1"}  # what ends the command's own arguments
PLACEHOLDER = re.compile(r"[\[<$]|\.\.\.|cast_mlx\.X\b")


def _clean(span: str) -> str:
    """A command as typed: without a prompt or a venv's bin/ in front, without a comment; under
    `mlx.launch ... --`, the command each rank runs."""
    span = re.sub(r"^(\$ |\.venv/bin/)", "", span.strip()).split("  #")[0].strip()
    return re.sub(r"^mlx\.launch .*? -- (\$\(which python\)|\S*python)\s", "python ", span)


def block_commands(prefix: str) -> list[tuple[str, str]]:
    """`(page, command)` for every line of a fenced code block that starts with `prefix`:
    whole commands, with their line continuations joined."""
    found = []
    for page in PAGES:
        for block in CODE.findall(page.read_text()):
            for line in block.replace("\\\n", " ").splitlines():
                if _clean(line).startswith(prefix):
                    found.append((page.name, _clean(line)))
    return found


def quoted_commands(prefix: str) -> list[tuple[str, str]]:
    """`(page, command)` for every code-block line and every inline code span that starts
    with `prefix` (inline spans may be fragments such as `python -m cast_mlx.eval --adapter`)."""
    found = block_commands(prefix)
    for page in PAGES:
        for span in INLINE.findall(CODE.sub("", page.read_text())):
            if _clean(span).startswith(prefix):
                found.append((page.name, _clean(span)))
    return found


def test_the_readme_is_short():
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines <= 250, f"README.md has {lines} lines; move detail into docs/"


def test_the_readme_starts_with_the_two_commands():
    first = (ROOT / "README.md").read_text().split("```")[1].strip().splitlines()
    assert first[0] == "bash"
    assert first[1].endswith("python -m cast_mlx.train --recipe recipes/smollm2-135m-arith.yaml")
    assert first[2].endswith("python -m pytest -q") and len(first) == 3


def test_the_readme_quotes_no_issue_numbers():
    assert re.findall(r"(?<![\w&])#\d+\b", (ROOT / "README.md").read_text()) == []


def test_the_recipe_reference_is_generated():
    proc = run_cli("-m", "cast_mlx.config_reference", "--check", "docs/recipe-reference.md", timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_the_reference_check_can_fail(tmp_path):
    stale = tmp_path / "ref.md"
    stale.write_text((ROOT / "docs/recipe-reference.md").read_text().replace("`data.task`", "`data.tusk`"))
    proc = run_cli("-m", "cast_mlx.config_reference", "--check", str(stale), timeout=120)
    assert proc.returncode == 1 and "stale" in proc.stderr


def test_the_reference_generator_needs_no_mlx():
    code = "import sys, cast_mlx.config_reference as r; r.render(); print([m for m in sys.modules if m[:3] == 'mlx'])"
    proc = run_cli("-c", code, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


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


# Runs each command's own entry point with its quoted arguments, but stops it the moment its
# argparse parser has accepted them: nothing is trained, loaded or written.
PARSE_ONLY = r"""
import argparse, contextlib, io, json, runpy, sys

class Parsed(BaseException):
    pass

original = argparse.ArgumentParser.parse_args

def parse_args(self, args=None, namespace=None):
    original(self, args, namespace)
    raise Parsed

argparse.ArgumentParser.parse_args = parse_args
results = []
for kind, target, args in json.loads(sys.argv[1]):
    err = io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            if kind == "module":
                sys.argv = [target, *args]
                runpy.run_module(target, run_name="__main__", alter_sys=True)
            elif kind == "script":
                sys.argv = [target, *args]
                runpy.run_path(target, run_name="__main__")
            else:
                from cast_mlx.cli import main
                main(args)
        results.append("ran without parsing its arguments")
    except Parsed:
        results.append("parsed")
    except SystemExit as exc:
        results.append(f"exit {exc.code}: {err.getvalue().strip()}")
    except Exception as exc:
        results.append(f"{type(exc).__name__}: {exc}")
print(json.dumps(results))
"""


def runnable_commands() -> list[tuple[str, str, list]]:
    """`(page, command, [kind, target, args])` for every whole quoted command without a
    placeholder, its arguments cut before any shell redirection."""
    out = []
    for prefix in PREFIXES:
        for page, cmd in block_commands(prefix):
            if PLACEHOLDER.search(cmd):
                continue
            words = shlex.split(cmd)
            cut = next((i for i, w in enumerate(words) if w in SHELL), len(words))
            words = words[:cut]
            if prefix.startswith("python -m"):
                out.append((page, cmd, ["module", words[2], words[3:]]))
            elif prefix.startswith("python scripts/"):
                out.append((page, cmd, ["script", words[1], words[2:]]))
            else:
                out.append((page, cmd, ["cast-mlx", "", words[1:]]))
    return out


def test_every_quoted_command_parses_its_arguments():
    commands = runnable_commands()
    kinds = {spec[0] for _, _, spec in commands}
    assert {"module", "script"} <= kinds  # the extraction works
    proc = run_cli("-c", PARSE_ONLY, json.dumps([spec for _, _, spec in commands]), timeout=300)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    failed = [f"{page}: {cmd}: {res}" for (page, cmd, _), res in zip(commands, results) if res != "parsed"]
    assert failed == []


def test_the_parse_check_can_fail():
    spec = [["module", "cast_mlx.eval", ["--task", "arithmetic", "--no-such-flag"]]]
    proc = run_cli("-c", PARSE_ONLY, json.dumps(spec), timeout=120)
    assert json.loads(proc.stdout.strip().splitlines()[-1])[0].startswith("exit 2")


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
def test_quoted_training_commands_resolve_their_recipe(page, args):
    """Beyond parsing: the recipe loads and every `--set` names a real field with a valid value."""
    args = [a for a in args if a not in ("--dry-run", "--no-dashboard", "--quiet", "--print-config")]
    proc = run_cli("-m", "cast_mlx.train", *args, "--print-config", timeout=120)
    assert proc.returncode == 0, f"{page}: {' '.join(args)}: {proc.stderr}"


def test_quoted_scripts_exist():
    scripts = {shlex.split(cmd)[1] for _, cmd in quoted_commands("python scripts/")}
    assert scripts, "no script quoted"
    assert sorted(s for s in scripts if not (ROOT / s).is_file()) == []


LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(page) -> set[str]:
    """GitHub's anchors of a page's headings."""
    text = CODE.sub("", page.read_text())
    heads = re.findall(r"^#+\s+(.*)$", text, re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


@pytest.mark.parametrize("page", [p.relative_to(ROOT).as_posix() for p in PAGES])
def test_local_links_and_anchors_exist(page):
    path = ROOT / page
    broken = []
    for link in LINK.findall(CODE.sub("", path.read_text())):
        if "://" in link or link.startswith("mailto:"):
            continue
        target, _, anchor = link.partition("#")
        file = (path.parent / target) if target else path
        if not file.exists():
            broken.append(link)
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(link)
    assert broken == []


def test_the_index_lists_every_page():
    index = (ROOT / "docs/index.md").read_text()
    listed = set(re.findall(r"\]\(([\w.-]+\.md)\)", index))
    pages = {p.name for p in PAGES if p.parent.name == "docs"} - {"index.md"}
    assert sorted(pages - listed) == []


def readme_tree() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Files") :]
    return CODE.findall(section)[0]


def test_the_readme_file_tree_names_every_module_and_package():
    tree = readme_tree()
    words = set(re.findall(r"[\w.-]+(?:/[\w.-]+)*/?", tree))
    package = ROOT / "cast_mlx"
    missing = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package)
        if path.name.startswith("__") or {"verify", "cli"} & set(rel.parts):  # one line each
            continue
        if path.name not in words:
            missing.append(rel.as_posix())
    for folder in sorted(p for p in package.iterdir() if p.is_dir() and (p / "__init__.py").exists()):
        if f"{folder.name}/" not in words:
            missing.append(f"{folder.name}/")
    for top in ("recipes/", "scripts/", "tests/", "docs/", "examples/own-task/"):
        if top not in words:
            missing.append(top)
    assert missing == [], "README's file tree is missing these"


def test_the_readme_step_table_names_real_functions():
    text = (ROOT / "README.md").read_text()
    table = text[text.index("## A training step") : text.index("## Files")]
    refs = re.findall(r"`([\w/]+\.py):(\w+)`", table)
    assert len(refs) >= 6
    missing = []
    for rel, name in refs:
        tree = ast.parse((ROOT / "cast_mlx" / rel).read_text())
        defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        if name not in defined:
            missing.append(f"{rel}:{name}")
    assert missing == []
