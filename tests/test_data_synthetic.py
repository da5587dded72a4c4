"""Synthetic identities: determinism, alignment, quality, learnability, hardness, dataset files."""

import importlib.util
import json
import os
import pathlib

import cv2
import numpy as np
import pytest
import torch
from insightface.utils import face_align
from sklearn.metrics import roc_auc_score

from protomem_plugin.data.binsets import load_bin
from protomem_plugin.data.packing import pack_images
from protomem_plugin.data.recordio import InsightFaceRec
from protomem_plugin.data.synthetic import SyntheticFaces, identity_image_counts, make_synthetic_dataset

TOOLS = pathlib.Path(__file__).resolve().parents[1] / "tools"


def load_tool(name):
    spec = importlib.util.spec_from_file_location(f"tools_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_render_is_deterministic_and_seedable():
    gen = SyntheticFaces(10, seed=3, image_size=56)
    image, quality = gen.render(4, 7)
    assert image.shape == (56, 56, 3) and image.dtype == np.uint8
    assert 0.0 <= quality <= 1.0
    again, q2 = SyntheticFaces(10, seed=3, image_size=56).render(4, 7)
    np.testing.assert_array_equal(image, again)
    assert quality == q2
    assert not np.array_equal(image, SyntheticFaces(10, seed=4, image_size=56).render(4, 7)[0])
    assert not np.array_equal(image, gen.render(4, 8)[0])
    assert not np.array_equal(image, gen.render(5, 7)[0])


def test_quality_follows_the_degradation():
    gen = SyntheticFaces(5, image_size=32)
    q = {d: np.mean([gen.render(i, s, degradation=d)[1] for i in range(5) for s in range(4)]) for d in (0.0, 0.5, 1.0)}
    assert q[0.0] == 1.0
    assert q[0.0] > q[0.5] > q[1.0]
    assert q[1.0] < 0.4
    drawn = [gen.render(i, s)[1] for i in range(5) for s in range(20)]  # 20% heavy by default
    assert 0.05 < np.mean(np.array(drawn) < 0.6) < 0.45


@pytest.mark.filterwarnings("ignore::FutureWarning")  # insightface calls a deprecated scikit-image API
@pytest.mark.parametrize("size", [112, 56])
def test_landmarks_sit_at_the_arcface_template(size):
    gen = SyntheticFaces(30, image_size=size)
    template = face_align.arcface_dst * size / 112
    deviations = []
    for identity in range(30):
        sample = gen.render_sample(identity, identity % 5)
        deviations.append(np.abs(sample.landmarks - template))
        # the similarity transform insightface would apply to align it is close to identity
        matrix = face_align.estimate_norm(sample.landmarks * 112 / size, image_size=112)
        np.testing.assert_allclose(matrix[:, :2], np.eye(2), atol=0.15)  # about 8 degrees, 15% scale
        assert np.abs(matrix[:, 2]).max() < 10
    deviations = np.array(deviations) * 112 / size  # in pixels at 112
    assert deviations.mean() < 2.5 and deviations.max() < 12


def test_identity_counts_long_tail():
    assert identity_image_counts(4, 6).tolist() == [6, 6, 6, 6]
    counts = identity_image_counts(200, 10, long_tail=True, seed=1)
    assert counts.min() >= 1 and counts.max() > 4 * np.median(counts)
    assert 7 <= counts.mean() <= 13


class TinyNet(torch.nn.Module):
    def __init__(self, classes):
        super().__init__()
        def block(i, o):
            return [torch.nn.Conv2d(i, o, 3, padding=1, bias=False), torch.nn.BatchNorm2d(o), torch.nn.ReLU(), torch.nn.MaxPool2d(2)]
        self.features = torch.nn.Sequential(*block(3, 16), *block(16, 32), *block(32, 64), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.fc = torch.nn.Linear(64, classes)

    def forward(self, x):
        return self.fc(self.features(x))


def to_tensor(images):
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


@pytest.fixture
def one_torch_thread():
    """Tiny convolutions run faster on one thread than on two busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_learnable_but_degraded_pairs_are_harder(one_torch_thread):
    torch.manual_seed(0)
    ids, size = 20, 32
    gen = SyntheticFaces(ids, seed=0, image_size=size)
    train = [(gen.render(i, s)[0], i) for i in range(ids) for s in range(12)]
    test = [(gen.render(i, 100 + s)[0], i) for i in range(ids) for s in range(6)]
    x, y = to_tensor([t[0] for t in train]), torch.tensor([t[1] for t in train])
    net = TinyNet(ids)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    gen_t = torch.Generator().manual_seed(0)
    for step in range(200):
        idx = torch.randint(0, len(x), (32,), generator=gen_t)
        batch = x[idx]
        flip = torch.rand(32, generator=gen_t) < 0.5
        batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
        loss = torch.nn.functional.cross_entropy(net(batch), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        pred = net(to_tensor([t[0] for t in test])).argmax(1)
    accuracy = (pred == torch.tensor([t[1] for t in test])).float().mean().item()
    print(f"held-out accuracy {accuracy:.3f}")
    assert accuracy > 0.6, accuracy  # chance is 0.05

    # genuine vs impostor separation by the learned features, clean vs heavily degraded pairs
    def pair_scores(degradation):
        a = to_tensor([gen.render(i, 200 + s, degradation)[0] for i in range(ids) for s in range(3)])
        b = to_tensor([gen.render(i, 300 + s, degradation)[0] for i in range(ids) for s in range(3)])
        with torch.no_grad():
            fa = torch.nn.functional.normalize(net.features(a), dim=1)
            fb = torch.nn.functional.normalize(net.features(b), dim=1)
        sim = fa @ fb.T
        same = torch.tensor([i for i in range(ids) for _ in range(3)])
        genuine = same[:, None] == same[None, :]
        return sim[genuine].numpy(), sim[~genuine].numpy()

    clean_gen, clean_imp = pair_scores(0.0)
    bad_gen, bad_imp = pair_scores(1.0)
    clean_auc = roc_auc_score(np.r_[np.ones(len(clean_gen)), np.zeros(len(clean_imp))], np.r_[clean_gen, clean_imp])
    bad_auc = roc_auc_score(np.r_[np.ones(len(bad_gen)), np.zeros(len(bad_imp))], np.r_[bad_gen, bad_imp])
    print(f"verification AUC clean {clean_auc:.3f}, degraded {bad_auc:.3f}")
    assert clean_auc > 0.9, clean_auc
    assert clean_gen.mean() > bad_gen.mean() + 0.05
    assert bad_auc < clean_auc - 0.05, (clean_auc, bad_auc)

    # and in pixel space: degraded genuine pairs correlate less than clean ones
    def pixel_corr(d):
        pairs = [(gen.render(i, 400, d)[0], gen.render(i, 401, d)[0]) for i in range(ids)]
        return np.mean([np.corrcoef(p.ravel().astype(float), q.ravel().astype(float))[0, 1] for p, q in pairs])

    assert pixel_corr(0.0) > pixel_corr(1.0)


def test_make_synthetic_dataset_files_reuse_and_refusal(tmp_path):
    out = str(tmp_path / "syn")
    kwargs = dict(val_identities=4, val_pairs=8, image_size=32, progress=False, write_folders=True)
    assert make_synthetic_dataset(out, 6, 3, **kwargs) == out
    rec = InsightFaceRec(out)
    assert rec.num_classes == 6 and rec.image_size == (32, 32)
    np.testing.assert_array_equal(rec.labels, np.repeat(np.arange(6), 3))
    quality = np.load(os.path.join(out, "quality.npy"))
    assert quality.shape == (18,) and quality.dtype == np.float32 and (0 <= quality).all() and (quality <= 1).all()
    gen = SyntheticFaces(10, image_size=32)
    image, q = gen.render(2, 1)  # identity 2, sample 1 -> key 2*3+1+1
    assert quality[7] == pytest.approx(q)
    assert np.abs(rec.read_image(8).astype(int) - image).mean() < 3  # the stored JPEG (quality 95)
    images, issame = load_bin(os.path.join(out, "val.bin"), image_size=(32, 32))
    assert images.shape == (16, 32, 32, 3) and issame.tolist() == [True, False] * 4
    folder_pack = tmp_path / "from_folders"
    assert pack_images(os.path.join(out, "images"), str(folder_pack), progress=False) == 18
    np.testing.assert_array_equal(InsightFaceRec(str(folder_pack)).labels, rec.labels)

    stamp = os.path.getmtime(os.path.join(out, "train.rec"))
    assert make_synthetic_dataset(out, 6, 3, **kwargs) == out  # cached: reused untouched
    assert os.path.getmtime(os.path.join(out, "train.rec")) == stamp
    with pytest.raises(FileExistsError, match="overwrite"):
        make_synthetic_dataset(out, 7, 3, **kwargs)
    make_synthetic_dataset(out, 7, 3, overwrite=True, **kwargs)
    assert InsightFaceRec(out).num_classes == 7
    with open(os.path.join(out, "synthetic.json")) as f:
        assert json.load(f)["params"]["num_identities"] == 7


def test_worker_processes_do_not_change_the_output(tmp_path):
    common = dict(val_identities=2, val_pairs=2, image_size=16, progress=False, long_tail=True)
    one = make_synthetic_dataset(str(tmp_path / "one"), 40, 13, num_workers=1, **common)
    two = make_synthetic_dataset(str(tmp_path / "two"), 40, 13, num_workers=2, **common)
    for name in ("train.rec", "train.idx", "quality.npy", "val.bin"):
        assert (pathlib.Path(one) / name).read_bytes() == (pathlib.Path(two) / name).read_bytes()
    assert len(InsightFaceRec(one)) >= 500  # large enough to use the process pool


def test_command_line_tools(tmp_path, capsys):
    make_synthetic, pack_rec = load_tool("make_synthetic"), load_tool("pack_rec")
    out = tmp_path / "cli"
    assert make_synthetic.main([str(out), "--identities", "3", "--images-per-identity", "2", "--val-identities", "2",
                                "--val-pairs", "2", "--image-size", "16", "--write-folders"]) == 0
    assert InsightFaceRec(str(out)).num_classes == 3
    assert pack_rec.main([str(out / "images"), str(tmp_path / "packed"), "--quiet"]) == 0
    assert "packed 6 images" in capsys.readouterr().out
