import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_rec(tmp_path_factory):
    """60 synthetic identities x 6 images at 32x32 with a held-out val.bin (generated once)."""
    from protomem_plugin.data.synthetic import make_synthetic_dataset

    out = tmp_path_factory.mktemp("tiny_rec")
    make_synthetic_dataset(str(out), 60, 6, val_identities=30, val_pairs=200, image_size=32,
                           progress=False, num_workers=1)
    return out
