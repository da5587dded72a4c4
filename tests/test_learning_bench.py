"""A short version of tools/bench/learning.py: every head trains and is evaluated (mechanics only)."""
import importlib
import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_bench():
    """tools/bench/learning.py imported by name, so that its spawned workers can import it too."""
    sys.path.insert(0, str(REPO / "tools" / "bench"))
    return importlib.import_module("learning")


def test_every_head_trains_and_is_evaluated(tmp_path):
    bench = load_bench()
    out = tmp_path / "out"
    assert bench.main(["--quick", "--seeds", "1", "--steps", "8", "--points", "1", "--jobs", "2",
                       "--data", str(tmp_path / "data"), "--out", str(out)]) == 0
    result = json.loads((out / "learning_quick.json").read_text())
    runs = {(r["regime"], r["head"]) for r in result["runs"]}
    expected = {(regime, head) for regime, heads in bench.REGIME_HEADS.items() for head in heads}
    assert runs == expected
    for run in result["runs"]:
        final = run["final"]
        assert final["step"] == 8
        for key in ("tar@1e-4", "tar@1e-3", "bin_accuracy"):
            assert 0.0 <= final[key] <= 1.0, (run["head"], key, final[key])
        assert run["ages"] and math.isfinite(run["ages"]["mean"]), run["head"]
        log = tmp_path / "data" / "runs_quick" / run["regime"] / f"{run['head']}_seed0" / "train_log.jsonl"
        losses = [json.loads(line)["loss"] for line in log.read_text().splitlines()]
        assert len(losses) == 8 and all(math.isfinite(v) for v in losses), (run["head"], losses)
    assert "| obsolescence | pm |" in (out / "learning_quick.md").read_text()
