"""Image-folder training sets and the rec = "synthetic" speed-test source."""
import numpy as np
import pytest
import torch

from protomem_plugin.data import make_synthetic_dataset
from protomem_plugin.data.folders import ImageFolderSource, open_train_source
from protomem_plugin.data.loader import build_train_loader
from protomem_plugin.data.recordio import InsightFaceRec, RecordIOError
from protomem_plugin.data.speedtest import build_speed_test_loader


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources") / "data"
    make_synthetic_dataset(str(root), 6, 3, val_identities=2, val_pairs=10, image_size=32, write_folders=True,
                           progress=False, num_workers=1)
    return root


def test_folder_source_lists_sorted_identities_and_images(synthetic):
    source = open_train_source(str(synthetic / "images"))
    assert isinstance(source, ImageFolderSource) and source.num_classes == 6 and len(source) == 18
    assert source.classes == sorted(source.classes)
    assert source.labels.tolist() == [c for c in range(6) for _ in range(3)]
    assert source.where(4).endswith("000001/00001.jpg")
    assert isinstance(open_train_source(str(synthetic)), InsightFaceRec)


def test_folder_and_rec_give_the_same_batches(synthetic):
    # the synthetic writer puts the same JPEG bytes in train.rec and images/: both layouts load alike
    kwargs = dict(samples_per_class=3, seed=5, num_workers=0, image_size=32)
    rec = build_train_loader(str(synthetic), 6, **kwargs)
    folder = build_train_loader(str(synthetic / "images"), 6, **kwargs)
    for (a_img, a_lab), (b_img, b_lab) in zip(rec, folder):
        assert torch.equal(a_lab, b_lab) and torch.equal(a_img, b_img)


def test_folder_errors_name_the_folder(tmp_path):
    with pytest.raises(RecordIOError, match="no train.rec/train.idx and no identity sub-folders"):
        open_train_source(str(tmp_path))
    (tmp_path / "alice").mkdir()
    (tmp_path / "alice" / "notes.txt").write_text("x")
    with pytest.raises(RecordIOError, match="1 identity folders but no image files"):
        open_train_source(str(tmp_path))
    with pytest.raises(RecordIOError, match="no such dataset folder"):
        open_train_source(str(tmp_path / "missing"))


def test_speed_test_loader_groups_labels_over_the_classes():
    loader = build_speed_test_loader(40, 100, 8, samples_per_class=2, seed=1, image_size=32)
    batches = list(loader)
    assert len(batches) == 40 * 2 // 8  # every class has one image: groups are filled by repetition
    images, labels = batches[0]
    assert images.shape == (8, 3, 32, 32) and images.min() >= -1 and images.max() <= 1
    assert torch.equal(images, batches[1][0]), "one fixed image"
    assert all(len(set(lab[i:i + 2].tolist())) == 1 for _, lab in batches for i in range(0, 8, 2))
    assert sorted(set(torch.cat([lab for _, lab in batches]).tolist())) == list(range(40))
