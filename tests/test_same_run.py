"""scripts/same_run.py: two run folders compared line by line and tensor by tensor."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import same_run  # noqa: E402


def run_folder(root: Path, loss: float, adapter: bytes, eval_at_2: bool = True) -> Path:
    root.mkdir(parents=True)
    rows = [{"step": 1, "loss": 0.5, "time/step": 3.0}, {"step": 2, "loss": loss, "time/step": 9.0}]
    if eval_at_2:
        rows[1] |= {"eval/accuracy": 0.25, "eval/cached": False}
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ckpt = root / "checkpoints" / "step_000002"
    ckpt.mkdir(parents=True)
    (ckpt / "adapters.safetensors").write_bytes(adapter)
    return root


def test_identical_runs_differ_only_in_times(tmp_path):
    a = run_folder(tmp_path / "a", 0.25, b"w")
    b = run_folder(tmp_path / "b", 0.25, b"w", eval_at_2=False)  # one run did not evaluate
    result = same_run.compare(a, b)
    assert result["identical"] and result["steps_compared"] == [1, 2]
    assert list(result["checkpoint_sha256"]) == ["step_000002/adapters.safetensors"]
    assert same_run.main([str(a), str(b)]) == 0


def test_a_different_loss_or_tensor_is_reported(tmp_path, capsys):
    a = run_folder(tmp_path / "a", 0.25, b"w")
    b = run_folder(tmp_path / "b", 0.26, b"x")
    result = same_run.compare(a, b)
    assert result["metric_lines_differing"] == {2: ["loss"]}
    assert result["checkpoint_sha256"]["step_000002/adapters.safetensors"].startswith("differs")
    assert same_run.main([str(a), str(b)]) == 1
    assert same_run.main([str(a), str(tmp_path / "missing")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
