"""End to end at 1e8 classes: protomem-train, its checkpoint and a resume cost what they cost at 1e6."""
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools" / "bench"))

import scale_train  # noqa: E402


def test_training_checkpoint_and_resume_at_1e8_classes_match_1e6(tmp_path):
    rows = scale_train.measure(tmp_path, [10**6, 10**8], memory_size=4096, identities=40, per_identity=4)
    small, large = rows
    for phase in ("fresh", "resume"):
        assert large[phase]["peak_rss_mb"] <= 1.05 * small[phase]["peak_rss_mb"], phase
    assert abs(large["checkpoint_mb"] - small["checkpoint_mb"]) <= 0.01 * small["checkpoint_mb"]
    log = (tmp_path / f"log_{10**8}_resume.txt").read_text()
    assert "resumed from the complete checkpoint of global step 5" in log and "done: 10 steps" in log
    # the spread labels reached the head: the largest is near 1e8 and exact
    from protomem_plugin.data.recordio import InsightFaceRec

    labels = InsightFaceRec(str(tmp_path / f"data_{10**8}")).labels
    assert labels.max() == 39 * (10**8 // 40 // 8 * 8) and len(set(labels.tolist())) == 40
