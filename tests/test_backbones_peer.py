"""Parity with a real arcface_torch checkout: set ARCFACE_TORCH_ROOT to its recognition/arcface_torch folder.

Loads arcface_torch's state_dict into ours with strict=True and compares eval-mode outputs and,
under the same seed, training-mode outputs and gradients (masking, drop path, checkpointing).
"""
import os

import pytest

from protomem_plugin.backbones.parity import compare_backbone, load_peer_backbones

ROOT = os.environ.get("ARCFACE_TORCH_ROOT")
pytestmark = pytest.mark.skipif(not ROOT, reason="ARCFACE_TORCH_ROOT does not point to an arcface_torch checkout")

SMALL_NAMES = ["r18", "mbf", "mbf_large", "vit_t", "vit_t_dp005_mask0", "vit_s_dp005_mask_0",
               "vit_b_dp005_mask_005"]


@pytest.fixture(scope="module")
def peers():
    return load_peer_backbones(ROOT)


@pytest.mark.parametrize("name", SMALL_NAMES)
def test_matches_arcface_torch(peers, name):
    result = compare_backbone(peers, name, batch=2, train=True)
    print(result)
    assert result.strict_load and not result.error
    assert result.eval_max_abs_diff <= 1e-5 * max(1.0, result.output_max_abs)
    assert result.train_max_abs_diff <= 1e-5 * max(1.0, result.output_max_abs)
    assert result.grad_max_rel_diff <= 1e-4
