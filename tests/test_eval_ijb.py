"""IJB evaluation end to end on the synthetic IJB tree, alignment of its loose crops, bad input."""

import json
import shutil
from collections import defaultdict

import cv2
import numpy as np
import pytest
import torch
from insightface.utils.face_align import arcface_dst, estimate_norm, norm_crop

from protomem_plugin.backbones import get_model
from protomem_plugin.data.synthetic import SyntheticFaces
from protomem_plugin.eval.cli import ijb_main, synthetic_ijb_main
from protomem_plugin.eval.ijb import evaluate_ijb
from protomem_plugin.eval.ijb_meta import IJBFormatError, IJBLayout
from protomem_plugin.eval.synthetic_ijb import make_synthetic_ijb

NUM_IDENTITIES = 4
ALIGNMENT_BOUND = 4.0  # mean absolute error per pixel (0..255) inside the face, after two warps and JPEG


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_synthetic_ijb(tmp_path_factory.mktemp("ijb") / "IJBC", num_identities=NUM_IDENTITIES, seed=3)


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    torch.manual_seed(0)
    model = get_model("tiny", num_features=32).eval()
    path = tmp_path_factory.mktemp("model") / "model.pt"
    torch.save(model.state_dict(), path)
    return model, path


def test_synthetic_tree_layout(synthetic):
    layout = synthetic.layout
    for path in [layout.face_tid_mid, layout.name_5pts_score, layout.template_pair_label, layout.probe_mixed,
                 *layout.galleries.values()]:
        assert path.is_file(), path
    assert set(layout.galleries) == {"G1", "G2"}
    lines = layout.template_pair_label.read_text().split("\n")[:-1]
    labels = [int(line.split()[2]) for line in lines]
    # 3 templates per identity: 3 genuine pairs each; every cross-identity pair is an impostor
    assert labels.count(1) == 3 * NUM_IDENTITIES
    assert labels.count(0) == 9 * NUM_IDENTITIES * (NUM_IDENTITIES - 1) // 2
    assert len(synthetic.images) == len(layout.name_5pts_score.read_text().split("\n")) - 1


def test_alignment_recovers_rendered_faces(synthetic):
    faces = SyntheticFaces(NUM_IDENTITIES, seed=3, image_size=112)
    errors, unaligned = [], []
    for im in synthetic.images:
        reference = faces.render(im.identity, im.sample)[0][..., ::-1].astype(np.float64)
        loose = cv2.imread(str(synthetic.layout.image_dir / im.name))
        assert loose.shape[0] > 112 and loose.shape[1] > 112
        aligned = norm_crop(loose, im.landmarks).astype(np.float64)
        errors.append(np.abs(aligned - reference)[4:-4, 4:-4].mean())
        unaligned.append(np.abs(cv2.resize(loose, (112, 112)).astype(np.float64) - reference)[4:-4, 4:-4].mean())
        # the landmarks carry the template: the estimated alignment maps them back onto it
        matrix = estimate_norm(im.landmarks, 112)
        back = im.landmarks @ matrix[:, :2].T + matrix[:, 2]
        np.testing.assert_allclose(back, arcface_dst, atol=0.01)
    print(f"alignment error: mean {np.mean(errors):.2f}, max {np.max(errors):.2f}; "
          f"without alignment: min {np.min(unaligned):.2f}")
    assert max(errors) < ALIGNMENT_BOUND
    assert min(unaligned) > 5 * ALIGNMENT_BOUND


def _reference_pair_scores(model, layout, images):
    """Plain re-statement of the protocol: loops and dicts, no shared code with the library."""
    feats = {}
    with torch.no_grad():
        for im in images:
            aligned = norm_crop(cv2.imread(str(layout.image_dir / im.name)), im.landmarks)
            rgb = aligned[..., ::-1].astype(np.float32)
            x = torch.from_numpy(np.stack([rgb, rgb[:, ::-1]]).copy()).permute(0, 3, 1, 2)
            out = model((x / 255 - 0.5) / 0.5).double().numpy()
            feats[im.name] = (out[0] + out[1]) * im.score
    media = defaultdict(list)
    for im in images:
        media[(im.template, im.media)].append(feats[im.name])
    template = defaultdict(lambda: 0.0)
    for (t, _), vectors in media.items():
        template[t] = template[t] + np.mean(vectors, axis=0)
    template = {t: v / np.linalg.norm(v) for t, v in template.items()}
    scores = []
    for line in layout.template_pair_label.read_text().split("\n")[:-1]:
        a, b, _ = map(int, line.split())
        scores.append(float(template[a] @ template[b]))
    return np.array(scores)


def test_end_to_end_pytorch_model(synthetic, tiny_weights, tmp_path, capsys):
    model, weights = tiny_weights
    out = tmp_path / "out"
    root = str(synthetic.layout.root)
    assert ijb_main(["--root", root, "--target", "IJBC", "--output", str(out), "--network", "tiny",
                     "--weights", str(weights), "--num-features", "32", "--batch-size", "5", "--name", "tiny"]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    table = (out / "results.md").read_text()
    assert "| tiny | nearest ROC point |" in table and "| tiny | G1 |" in table and table.strip() in printed
    assert (out / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cv2.imread(str(out / "roc.png")).shape[1] >= 600
    assert results["num_images"] == len(synthetic.images)
    assert results["1:1"]["num_genuine"] == synthetic.num_genuine
    assert results["1:1"]["num_impostor"] == synthetic.num_impostor
    for gallery in ("G1", "G2"):
        assert results["1:N"][gallery]["num_mated"] == NUM_IDENTITIES  # 2 probes x 2 identities per gallery
        assert results["1:N"][gallery]["num_non_mated"] == NUM_IDENTITIES
    features = np.load(out / "ijbc_features.npy")
    assert features.shape == (len(synthetic.images), 2, 32)

    # the pair scores equal an independent re-statement of the protocol
    expected = _reference_pair_scores(model, synthetic.layout, synthetic.images)
    np.testing.assert_allclose(np.load(out / "ijbc_scores.npy"), expected, atol=1e-4)

    # the saved features are reused without a model and give the same results
    again = evaluate_ijb(root, "IJBC", tmp_path / "again", embedder=None, name="tiny",
                         features_path=out / "ijbc_features.npy")
    assert again["1:1"] == results["1:1"] and again["1:N"] == results["1:N"]
    # ... but not for another benchmark whose image count differs
    np.save(tmp_path / "short.npy", features[:-1])
    with pytest.raises(ValueError, match=r"short\.npy: expected features of shape"):
        evaluate_ijb(root, "IJBC", tmp_path / "x", features_path=tmp_path / "short.npy")


def test_onnx_model_gives_the_same_features(synthetic, tmp_path):
    from protomem_plugin.export import export_onnx

    torch.manual_seed(0)
    model = get_model("mbf", num_features=32)
    for module in model.modules():  # trained-like activation scales
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None
    with torch.no_grad():
        model.train()(torch.rand(8, 3, 112, 112) * 2 - 1)
    model.eval()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    onnx_path = export_onnx(model, tmp_path / "mbf.onnx")
    root = str(synthetic.layout.root)
    common = ["--root", root, "--num-features", "32", "--protocols", "1:1"]
    assert ijb_main(common + ["--output", str(tmp_path / "onnx"), "--onnx", str(onnx_path)]) == 0
    assert ijb_main(common + ["--output", str(tmp_path / "pt"), "--network", "mbf",
                              "--weights", str(tmp_path / "model.pt")]) == 0
    a = np.load(tmp_path / "onnx" / "ijbc_features.npy").reshape(-1, 32)
    b = np.load(tmp_path / "pt" / "ijbc_features.npy").reshape(-1, 32)
    cos = np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.9999
    assert "1:N" not in json.loads((tmp_path / "onnx" / "results.json").read_text())


def test_ijbb_layout_uses_s1_s2(tmp_path):
    assert synthetic_ijb_main(["--root", str(tmp_path / "IJBB"), "--target", "IJBB", "--identities", "2",
                               "--templates-per-identity", "2", "--max-media", "1", "--max-images", "1"]) == 0
    layout = IJBLayout.of(tmp_path / "IJBB", "IJB-B")
    assert [p.name for p in layout.galleries.values()] == ["ijbb_1N_gallery_S1.csv", "ijbb_1N_gallery_S2.csv"]
    assert all(p.is_file() for p in layout.galleries.values()) and layout.probe_mixed.is_file()


# -- bad input: every error names the file (and the line) ---------------------------------------

@pytest.fixture
def tree(synthetic, tmp_path):
    root = tmp_path / "IJBC"
    shutil.copytree(synthetic.layout.root, root)
    return IJBLayout.of(root, "IJBC")


def _edit_line(path, lineno, edit):
    lines = path.read_text().split("\n")
    lines[lineno - 1] = edit(lines[lineno - 1])
    path.write_text("\n".join(lines))


def _run(layout, tmp_path, tiny_weights):
    return ijb_main(["--root", str(layout.root), "--output", str(tmp_path / "out"), "--network", "tiny",
                     "--weights", str(tiny_weights[1]), "--num-features", "32"])


def test_missing_meta_file(tree, tmp_path, tiny_weights):
    tree.template_pair_label.unlink()
    with pytest.raises(FileNotFoundError, match=r"ijbc_template_pair_label\.txt"):
        _run(tree, tmp_path, tiny_weights)


def test_wrong_number_of_columns(tree, tmp_path, tiny_weights):
    _edit_line(tree.face_tid_mid, 3, lambda s: " ".join(s.split()[:2]))
    with pytest.raises(IJBFormatError, match=r"ijbc_face_tid_mid\.txt:3: expected 3 columns, got 2"):
        _run(tree, tmp_path, tiny_weights)


def test_non_numeric_landmark(tree, tmp_path, tiny_weights):
    _edit_line(tree.name_5pts_score, 2, lambda s: " ".join(s.split()[:3] + ["abc"] + s.split()[4:]))
    with pytest.raises(IJBFormatError, match=r"ijbc_name_5pts_score\.txt:2: column 4 \(x2\) 'abc' is not a number"):
        _run(tree, tmp_path, tiny_weights)


def test_missing_image(tree, tmp_path, tiny_weights):
    (tree.image_dir / "5.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"5\.jpg: image listed in .*ijbc_name_5pts_score\.txt line 5"):
        _run(tree, tmp_path, tiny_weights)
    assert not (tmp_path / "out" / "ijbc_features.npy").exists()


def test_pair_with_unknown_template(tree, tmp_path, tiny_weights):
    count = len(tree.template_pair_label.read_text().split("\n")) - 1
    with open(tree.template_pair_label, "a") as f:
        f.write("1 999 0\n")
    with pytest.raises(IJBFormatError, match=rf"ijbc_template_pair_label\.txt:{count + 1}: template_2 999 is not"):
        _run(tree, tmp_path, tiny_weights)


def test_gallery_with_unknown_template(tree, tmp_path, tiny_weights):
    with open(tree.galleries["G2"], "a") as f:
        f.write("4242,7,loose_crop/1.jpg\n")
    with pytest.raises(IJBFormatError, match=r"ijbc_1N_gallery_G2\.csv:\d+: template 4242 is not"):
        _run(tree, tmp_path, tiny_weights)
