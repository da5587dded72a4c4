"""Memory semantics, QAPM weighting, bad input and resumable state of the heads (one process)."""
import io

import pytest
import torch
import torch.nn.functional as F

from protomem_plugin.heads import NonFiniteEmbeddingError, PartialFC, PrototypeMemory, QualityAwarePrototypeMemory
from protomem_plugin.losses import CombinedMarginLoss

MARGIN = CombinedMarginLoss(16.0, 1.0, 0.5, 0.0)


def stored(head):
    return {int(c): slot for slot, c in enumerate(head.slot_class.tolist()) if c >= 0}


def pairs(classes, dim=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor(classes).repeat_interleave(2)
    return torch.randn(len(labels), dim, generator=g, dtype=torch.float64), labels


# ----------------------------------------------------------------------------- memory semantics
def test_class_seen_again_is_refreshed_not_duplicated():
    head = PrototypeMemory(MARGIN, 4, 100, memory_size=6).double()
    x, y = pairs([3, 7])
    head(x, y)
    slot_of_3 = stored(head)[3]
    x2, y2 = pairs([3, 9], seed=1)
    head(x2, y2)
    classes = [c for c in head.slot_class.tolist() if c >= 0]
    assert sorted(classes) == [3, 7, 9] and len(classes) == len(set(classes))
    assert stored(head)[3] == slot_of_3, "refreshed in place"
    assert int(head.slot_step[slot_of_3]) == 1
    expected = F.normalize(F.normalize(x2[:2], dim=1).sum(0), dim=0)
    torch.testing.assert_close(head.memory[slot_of_3], expected)
    assert head.diagnostics()["refreshed_classes"] == 1 and head.diagnostics()["new_classes"] == 1


def test_least_recently_written_leave_first():
    head = PrototypeMemory(MARGIN, 4, 100, memory_size=4).double()
    for step, classes in enumerate([[0, 1], [2, 3], [0, 4]]):
        head(*pairs(classes, seed=step))
    # step 2: 0 refreshed; 4 evicts the oldest written of {1 (step 0), 2, 3 (step 1)} -> 1
    assert sorted(stored(head)) == [0, 2, 3, 4]
    head(*pairs([5, 6], seed=3))
    # oldest now: 2 and 3 (step 1) -> both leave; 0 and 4 (step 2) stay
    assert sorted(stored(head)) == [0, 4, 5, 6]
    assert head.diagnostics()["evicted_classes"] == 2
    assert head.diagnostics()["slot_age_max"] == 1  # 0 and 4 were written one step earlier
    assert head.diagnostics()["slot_age_mean"] == 0.5


def test_one_step_with_more_classes_than_slots_raises():
    head = PrototypeMemory(MARGIN, 4, 100, memory_size=3).double()
    with pytest.raises(ValueError, match="too small for one global batch"):
        head(*pairs([0, 1, 2, 3]))


def test_no_num_classes_sized_state():
    head = QualityAwarePrototypeMemory(MARGIN, 8, 10_000_000, memory_size=16)
    biggest = max(t.numel() for t in head.state_dict().values() if isinstance(t, torch.Tensor))
    assert biggest == 16 * 8


def test_single_image_class_has_positive_cosine_one():
    head = PrototypeMemory(CombinedMarginLoss(1.0, 1.0, 0.0, 0.0), 4, 10, memory_size=4).double()
    x = torch.randn(1, 4, dtype=torch.float64)
    loss = head(x, torch.tensor([2]))
    assert loss.item() == pytest.approx(0.0, abs=1e-12)  # only one slot, cosine 1 -> softmax prob 1


# ----------------------------------------------------------------------------- QAPM
def run_first_step(head, x, y, **extras):
    head(x.clone().requires_grad_(True), y, **extras).backward()
    return {c: head.memory[s].clone() for c, s in stored(head).items()}


def test_qapm_equal_weights_reproduce_pm_exactly():
    g = torch.Generator().manual_seed(4)
    pm = PrototypeMemory(MARGIN, 5, 20, memory_size=8).double()
    qapm = QualityAwarePrototypeMemory(MARGIN, 5, 20, memory_size=8, quality_source="external").double()
    for _ in range(6):
        x = torch.randn(8, 5, generator=g, dtype=torch.float64)
        y = torch.randint(0, 20, (4,), generator=g).repeat_interleave(2)
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        la = pm(xa, y)
        lb = qapm(xb, y, quality=torch.full((8,), 0.7, dtype=torch.float64))
        la.backward()
        lb.backward()
        assert torch.equal(la, lb)
        assert torch.equal(xa.grad, xb.grad)
        assert torch.equal(pm.memory, qapm.memory)


def test_low_quality_exemplar_moves_prototype_toward_good_ones():
    torch.manual_seed(0)
    good = F.normalize(torch.tensor([[1.0, 0.1, 0.0, 0.0], [1.0, -0.1, 0.0, 0.0]], dtype=torch.float64), dim=1) * 10
    bad = F.normalize(torch.tensor([[0.0, 0.0, 1.0, 0.0]], dtype=torch.float64), dim=1) * 1.0  # small norm
    x = torch.cat([good, bad])
    y = torch.tensor([5, 5, 5])
    target = F.normalize(F.normalize(good, dim=1).mean(0), dim=0)
    pm = run_first_step(PrototypeMemory(MARGIN, 4, 10, memory_size=4).double(), x, y)[5]
    qapm = run_first_step(QualityAwarePrototypeMemory(MARGIN, 4, 10, memory_size=4, norm_power=2.0).double(), x, y)[5]
    assert torch.dot(qapm, target) > torch.dot(pm, target) + 0.02
    expected = F.normalize(F.normalize(good, dim=1).sum(0) + (0.1**2) * F.normalize(bad, dim=1)[0], dim=0)
    torch.testing.assert_close(qapm, expected)


def test_external_quality_is_honoured_and_zero_groups_fall_back():
    x = torch.randn(4, 4, dtype=torch.float64)
    y = torch.tensor([1, 1, 2, 2])
    head = QualityAwarePrototypeMemory(MARGIN, 4, 10, memory_size=4, quality_source="external").double()
    mem = run_first_step(head, x, y, quality=torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64))
    e = F.normalize(x, dim=1)
    torch.testing.assert_close(mem[1], e[0])  # only the first image counts
    torch.testing.assert_close(mem[2], F.normalize(e[2] + e[3], dim=0))  # all-zero group -> equal weights
    assert head.diagnostics()["fallback_classes"] == 1
    with pytest.raises(ValueError, match="quality"):
        head(x, y)
    with pytest.raises(ValueError, match="non-negative"):
        head(x, y, quality=torch.tensor([1.0, -1.0, 1.0, 1.0], dtype=torch.float64))


@pytest.mark.parametrize("source", ["recognizability_soft", "recognizability_hard"])
def test_recognizability_down_weights_images_near_the_unrecognizable_prototype(source):
    head = QualityAwarePrototypeMemory(MARGIN, 4, 10, memory_size=4, quality_source=source, ui_fraction=0.25).double()
    # the lowest-norm image defines the unrecognizable direction; class 3 has one image close to it
    x = torch.tensor(
        [[0.0, 0.0, 0.0, 0.5], [5.0, 0.0, 0.0, 0.0], [4.0, 1.0, 0.0, 0.0], [0.2, 0.0, 0.0, 3.0]],
        dtype=torch.float64,
    )
    y = torch.tensor([7, 3, 3, 3])
    mem = run_first_step(head, x, y)
    e = F.normalize(x, dim=1)
    torch.testing.assert_close(head.ui_prototype, e[0])
    good = F.normalize(e[1] + e[2], dim=0)
    assert torch.dot(mem[3], good) > 0.99
    plain = F.normalize(e[1] + e[2] + e[3], dim=0)
    assert torch.dot(mem[3], good) > torch.dot(plain, good)


# ----------------------------------------------------------------------------- bad input
HEADS = [
    lambda: PartialFC(MARGIN, 4, 10, sample_rate=0.5),
    lambda: PrototypeMemory(MARGIN, 4, 10, memory_size=6),
    lambda: QualityAwarePrototypeMemory(MARGIN, 4, 10, memory_size=6),
]


@pytest.mark.parametrize("make", HEADS, ids=["partial_fc", "pm", "qapm"])
def test_bad_input_raises_clear_errors(make):
    head = make()
    x, y = torch.randn(4, 4), torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match=r"outside \[0, num_classes=10\)"):
        head(x, torch.tensor([0, 0, 10, 10]))
    with pytest.raises(ValueError, match=r"outside"):
        head(x, torch.tensor([0, 0, -1, -1]))
    with pytest.raises(ValueError, match="embedding size 5"):
        head(torch.randn(4, 5), y)
    with pytest.raises(ValueError, match="2-D"):
        head(torch.randn(4, 4, 1), y)
    with pytest.raises(ValueError, match="one label per embedding"):
        head(x, torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="integers"):
        head(x, y.float())
    before = {k: v.clone() for k, v in head.state_dict().items() if isinstance(v, torch.Tensor)}
    bad = x.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(NonFiniteEmbeddingError, match="rows \\[2\\]"):
        head(bad, y)
    bad[2, 1] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        head(bad, y)
    after = head.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]), f"{k} changed by a rejected batch"


def test_memory_state_never_holds_non_finite_values():
    head = PrototypeMemory(MARGIN, 4, 10, memory_size=6)
    head(torch.randn(4, 4), torch.tensor([0, 0, 1, 1]))
    with pytest.raises(NonFiniteEmbeddingError):
        head(torch.full((4, 4), float("nan")), torch.tensor([2, 2, 3, 3]))
    assert torch.isfinite(head.memory).all()


# ----------------------------------------------------------------------------- resumable state
@pytest.mark.parametrize(
    "make",
    [
        lambda: PartialFC(MARGIN, 6, 40, sample_rate=0.3),
        lambda: PrototypeMemory(MARGIN, 6, 40, memory_size=10),
        lambda: QualityAwarePrototypeMemory(MARGIN, 6, 40, memory_size=10, quality_source="recognizability_soft"),
    ],
    ids=["partial_fc", "pm", "qapm"],
)
def test_state_dict_round_trip_continues_bit_identically(make):
    g = torch.Generator().manual_seed(11)
    data = [(torch.randn(8, 6, generator=g).requires_grad_(True), torch.randint(0, 40, (4,), generator=g).repeat_interleave(2)) for _ in range(10)]
    torch.manual_seed(1)
    head = make()
    optim = torch.optim.SGD(head.parameters(), lr=0.1) if list(head.parameters()) else None
    for x, y in data[:5]:
        head(x, y).backward()
        if optim:
            optim.step()
            optim.zero_grad()
    buffer = io.BytesIO()
    torch.save({"head": head.state_dict(), "optim": optim.state_dict() if optim else None}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    torch.manual_seed(999)  # a different global RNG must not matter
    fresh = make()
    fresh.load_state_dict(saved["head"])
    fresh_optim = torch.optim.SGD(fresh.parameters(), lr=0.1) if optim else None
    if fresh_optim:
        fresh_optim.load_state_dict(saved["optim"])
    for x, y in data[5:]:
        a, b = head(x, y), fresh(x, y)
        assert torch.equal(a, b)
        a.backward()
        b.backward()
        if optim:
            optim.step(), fresh_optim.step()
            optim.zero_grad(), fresh_optim.zero_grad()
    for k, v in head.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, fresh.state_dict()[k]), k


def test_partial_fc_loads_arcface_torch_state_dict_and_samples_positives():
    head = PartialFC(MARGIN, 6, 40, sample_rate=0.25)
    head.load_state_dict({"weight": torch.randn(40, 6)})  # what PartialFC_V2 saves
    labels = torch.tensor([1, 5, 9, 13, 33, 39])
    index, targets = head.sample(labels)
    assert index.numel() == 10 and torch.all(index[targets] == labels)
    assert torch.all(index.diff() > 0)


@pytest.mark.parametrize("cls", [PrototypeMemory, QualityAwarePrototypeMemory], ids=["pm", "qapm"])
@pytest.mark.parametrize("chunk", [0, 3])
def test_no_step_work_of_size_num_classes(cls, chunk):
    """10^13 classes: any per-step tensor with one entry per class would need terabytes."""
    huge = 10**13
    head = cls(MARGIN, 4, huge, memory_size=6, logits_chunk=chunk).double()
    for step, classes in enumerate([[huge - 1, 5], [123_456_789_012, 5], [7, huge - 2]]):
        x, y = pairs(classes, seed=step)
        loss = head(x.requires_grad_(True), y)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    assert sorted(stored(head)) == sorted([5, 7, 123_456_789_012, huge - 2, huge - 1])
