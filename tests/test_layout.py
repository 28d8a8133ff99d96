"""The module layout's promises: no import cycle between eval and trainer, leaf modules stay
leaves, and the fast test tier does not import torch."""

from __future__ import annotations

import json

import pytest

from helpers import run_cli

IMPORTS = """
import json, sys
sys.path.insert(0, "tests")
import {module}
print(json.dumps(sorted(m for m in sys.modules if m in {watch})))
"""


def imported_after(module: str, watch: set[str]) -> list[str]:
    proc = run_cli("-c", IMPORTS.format(module=module, watch=sorted(watch)), timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "module, absent",
    [
        ("cast_mlx.eval", {"cast_mlx.training.trainer"}),  # eval never imports the trainer (the old cycle)
        ("cast_mlx.training.checkpoint", {"cast_mlx.training.trainer", "cast_mlx.eval", "cast_mlx.engine.rollout"}),
        ("cast_mlx.training.metrics", {"cast_mlx.training.trainer", "cast_mlx.algorithm.loss"}),
        ("cast_mlx.config", {"mlx.core"}),  # recipes validate before anything heavy loads
    ],
)
def test_module_does_not_pull_in(module, absent):
    assert imported_after(module, absent) == []


def test_fast_tier_modules_import_no_torch():
    fast = "conftest, test_advantages, test_loss, test_config, test_verify, test_dashboard"
    assert imported_after(fast, {"torch", "transformers"}) == []
