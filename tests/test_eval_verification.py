""".bin verification: 10-fold accuracy on constructed distances and on a hand-packed .bin file."""

import pickle

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from protomem_plugin.eval.verification import evaluate_bin, verification_accuracy


def _pair_embeddings(cosines: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(2N, 3) embeddings, randomly scaled, whose pair i has the given cosine."""
    rows = []
    for c in cosines:
        rows += [[1.0, 0.0, 0.0], [c, np.sqrt(1 - c * c), 0.0]]
    emb = np.array(rows) * rng.uniform(0.5, 5.0, size=(2 * len(cosines), 1))
    return emb


def test_ten_fold_accuracy_closed_form():
    # 20 pairs -> 10 folds of 2 consecutive pairs. Genuine pairs at squared distance 0.505
    # (cos 0.7475), impostors at 2.0 (cos 0); pair 0 is a genuine outlier at 3.0 (cos -0.5).
    # Every fold picks the first threshold above 0.5 (0.51) and gets its 2 pairs right,
    # except fold 0 whose outlier is rejected: accuracies (0.5, 1 x 9) -> mean 0.95, std 0.15.
    issame = np.array([True, False] * 10)
    cosines = np.where(issame, 0.7475, 0.0)
    cosines[0] = -0.5
    emb = _pair_embeddings(cosines, np.random.default_rng(0))
    acc, std, thr = verification_accuracy(emb, issame, nfolds=10)
    assert acc == pytest.approx(0.95)
    assert std == pytest.approx(0.15)
    assert thr == pytest.approx(0.51)


def test_five_folds_and_input_checks():
    issame = np.array([True, False] * 5)
    emb = _pair_embeddings(np.where(issame, 0.8975, 0.1), np.random.default_rng(1))  # distances 0.205 / 1.8
    acc, std, thr = verification_accuracy(emb, issame, nfolds=5)
    assert (acc, std) == (1.0, 0.0)
    assert thr == pytest.approx(0.21)
    with pytest.raises(ValueError, match="2N, D"):
        verification_accuracy(emb[:-1], issame)
    with pytest.raises(ValueError, match="cannot be split"):
        verification_accuracy(emb, issame, nfolds=20)


class PoolProject(nn.Module):
    """8x8 average pooling then a fixed linear map (no bias): an embedding computable by hand,
    odd in its input, so that the negative image (255 - x) has the opposite embedding."""

    def __init__(self, dim: int = 16):
        super().__init__()
        torch.manual_seed(0)
        self.pool = nn.AvgPool2d(8)
        self.fc = nn.Linear(3 * 14 * 14, dim, bias=False)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(x), 1))


def _numpy_embedding(model: PoolProject, rgb: np.ndarray) -> np.ndarray:
    x = (rgb.astype(np.float64) / 255 - 0.5) / 0.5  # (H, W, 3)
    pooled = x.reshape(14, 8, 14, 8, 3).mean(axis=(1, 3)).transpose(2, 0, 1).reshape(-1)  # C, H, W order
    return model.fc.weight.detach().double().numpy() @ pooled


def test_evaluate_bin_on_hand_packed_file(tmp_path):
    rng = np.random.default_rng(0)
    n_pairs = 20
    issame = [bool(i % 2 == 0) for i in range(n_pairs)]
    images = []
    for i, same in enumerate(issame):
        a = rng.integers(0, 256, size=(112, 112, 3), dtype=np.uint8)
        b = a.copy() if same else rng.integers(0, 256, size=(112, 112, 3), dtype=np.uint8)
        if i == 0:  # a genuine pair of opposite embeddings (distance 4): always rejected
            b = 255 - a
        images += [a, b]
    bins = [cv2.imencode(".png", cv2.cvtColor(im, cv2.COLOR_RGB2BGR))[1].tobytes() for im in images]
    path = tmp_path / "pairs.bin"
    with open(path, "wb") as f:
        pickle.dump((bins, issame), f, protocol=2)

    model = PoolProject().train()
    result = evaluate_bin(model, str(path), batch_size=7)
    assert model.training  # mode restored

    # hand reference: embeddings of image and mirror, their norms, and the distances of the pairs
    plain = np.stack([_numpy_embedding(model, im) for im in images])
    mirror = np.stack([_numpy_embedding(model, im[:, ::-1]) for im in images])
    expected_xnorm = np.mean(np.linalg.norm(np.concatenate([plain, mirror]), axis=1))
    assert result["xnorm"] == pytest.approx(expected_xnorm, rel=1e-5)
    fused = plain + mirror
    fused /= np.linalg.norm(fused, axis=1, keepdims=True)
    dist = np.sum((fused[0::2] - fused[1::2]) ** 2, axis=1)
    impostor_min = dist[~np.array(issame)].min()
    assert dist[np.array(issame)][1:].max() < 1e-9 and impostor_min > 0.01
    assert dist[0] == pytest.approx(4.0)
    # identical genuine pairs sit at distance 0: the first threshold that accepts them is 0.01,
    # which rejects every impostor; only the fold holding pair 0 (pairs 0, 1) errs once
    assert result["best_threshold"] == pytest.approx(0.01)
    assert result["accuracy"] == pytest.approx(0.95)
    assert result["std"] == pytest.approx(0.15)
    assert result["num_pairs"] == n_pairs


def test_eval_bin_cli_matches_library(tmp_path, capsys):
    import json

    from protomem_plugin.backbones import get_model
    from protomem_plugin.eval.cli import bin_main

    rng = np.random.default_rng(5)
    images = [rng.integers(0, 256, size=(112, 112, 3), dtype=np.uint8) for _ in range(20)]
    bins = [cv2.imencode(".jpg", im)[1].tobytes() for im in images]
    path = tmp_path / "set.bin"
    with open(path, "wb") as f:
        pickle.dump((bins, [True, False] * 5), f)
    torch.manual_seed(0)
    model = get_model("tiny", num_features=16).eval()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    out = tmp_path / "r.json"
    assert bin_main([str(path), "--network", "tiny", "--weights", str(tmp_path / "model.pt"),
                     "--num-features", "16", "--batch-size", "8", "--output", str(out)]) == 0
    written = json.loads(out.read_text())["set"]
    direct = evaluate_bin(model, str(path), batch_size=8)
    assert written == pytest.approx(direct)
    assert f"| set | 10 | {100 * direct['accuracy']:.2f} |" in capsys.readouterr().out
