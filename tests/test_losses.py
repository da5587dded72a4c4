import math

import pytest
import torch

from protomem_plugin.losses import CombinedMarginLoss, build_margin_loss


def cosines(rows=6, cols=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.empty(rows, cols, dtype=torch.float64).uniform_(-0.95, 0.95, generator=g)


def test_cosface_target_is_textbook():
    cos = cosines()
    labels = torch.tensor([0, 3, -1, 4, 1, -1])
    out = CombinedMarginLoss(64, 1.0, 0.0, 0.35)(cos.clone(), labels)
    expected = 64 * cos.clone()
    for i, c in enumerate(labels.tolist()):
        if c >= 0:
            expected[i, c] = 64 * (cos[i, c] - 0.35)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("gradient", ["straight_through", "exact"])
def test_arcface_target_is_textbook(gradient):
    cos = cosines()
    labels = torch.tensor([0, 3, -1, 4, 1, 2])
    out = CombinedMarginLoss(32, 1.0, 0.5, 0.0, gradient=gradient)(cos.clone(), labels)
    for i, c in enumerate(labels.tolist()):
        for j in range(cos.shape[1]):
            want = math.cos(math.acos(cos[i, j]) + 0.5) if j == c else cos[i, j].item()
            assert out[i, j].item() == pytest.approx(32 * want, abs=1e-9)


def test_combined_margin_is_textbook():
    cos = cosines()
    labels = torch.tensor([1, 1, 1, 1, 1, 1])
    out = CombinedMarginLoss(10, 1.2, 0.3, 0.1, gradient="exact")(cos.clone(), labels)
    checked = 0
    for i in range(6):
        t = math.acos(cos[i, 1])
        if 1.2 * t + 0.3 <= math.pi:
            checked += 1
            assert out[i, 1].item() == pytest.approx(10 * (math.cos(1.2 * t + 0.3) - 0.1), abs=1e-9)
    assert checked >= 4


def test_exact_gradient_matches_autograd_of_closed_form():
    cos = cosines().requires_grad_(True)
    labels = torch.tensor([0, 3, -1, 4, 1, 2])
    loss_fn = CombinedMarginLoss(30, 1.0, 0.5, 0.0, gradient="exact")
    upstream = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (loss_fn(cos, labels) * upstream).sum().backward()

    ref_cos = cos.detach().clone().requires_grad_(True)
    closed = ref_cos.clone()
    for i, c in enumerate(labels.tolist()):
        if c >= 0:
            c_ = ref_cos[i, c]
            closed[i, c] = c_ * math.cos(0.5) - torch.sqrt(1 - c_ * c_) * math.sin(0.5)
    (30 * closed * upstream).sum().backward()
    torch.testing.assert_close(cos.grad, ref_cos.grad)


def test_straight_through_matches_arcface_torch():
    """arcface_torch: target value cos(theta+m), gradient of every logit d/dcos = s (no_grad in-place edit)."""
    cos = cosines().requires_grad_(True)
    labels = torch.tensor([0, 3, -1, 4, 1, 2])
    upstream = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out = CombinedMarginLoss(64, 1.0, 0.5, 0.0)(cos, labels)
    (out * upstream).sum().backward()

    ref = cos.detach().clone().requires_grad_(True)
    logits = ref * 1.0
    index = torch.where(labels != -1)[0]
    target = logits[index, labels[index]]
    with torch.no_grad():
        target.arccos_()
        logits.arccos_()
        logits[index, labels[index]] = target + 0.5
        logits.cos_()
    ref_out = logits * 64
    (ref_out * upstream).sum().backward()
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(cos.grad, ref.grad)
    torch.testing.assert_close(cos.grad, 64 * upstream)


def test_beyond_pi_is_continuous_and_increasing():
    loss = CombinedMarginLoss(1.0, 1.0, 0.5, 0.0, gradient="exact")
    c = torch.linspace(-1, 1, 20001, dtype=torch.float64)
    target = loss.target_logit(c)
    assert torch.all(torch.diff(target) > 0), "target logit must increase with the cosine"
    c0 = math.cos(math.pi - 0.5)
    sides = loss.target_logit(torch.tensor([c0 - 1e-9, c0 + 1e-9], dtype=torch.float64))
    assert sides[0].item() == pytest.approx(-1.0, abs=1e-6) and sides[1].item() == pytest.approx(-1.0, abs=1e-6)
    assert target[0].item() == pytest.approx(-1 - (1 - math.cos(0.5)), abs=1e-9)


def test_interclass_filtering_matches_arcface_torch():
    cos = cosines(rows=5, cols=6, seed=3)
    labels = torch.tensor([2, -1, 0, 5, -1])
    thr = 0.3
    out = CombinedMarginLoss(1.0, 1.0, 0.0, 0.2, interclass_filtering_threshold=thr)(cos.clone(), labels)
    # arcface_torch: dirty = logits > thr, cleared at the target of positive rows, logits *= 1 - dirty
    dirty = (cos > thr).double()
    for i, c in enumerate(labels.tolist()):
        if c >= 0:
            dirty[i, c] = 0
    expected = cos * (1 - dirty)
    for i, c in enumerate(labels.tolist()):
        if c >= 0:
            expected[i, c] = cos[i, c] - 0.2
    torch.testing.assert_close(out, expected)


def test_bad_arguments():
    with pytest.raises(ValueError, match="gradient"):
        CombinedMarginLoss(64, 1, 0.5, 0, gradient="nope")
    with pytest.raises(ValueError, match="margin_list"):
        build_margin_loss({"margin_list": (1.0, 0.5)})
