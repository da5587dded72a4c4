"""Low-precision prototype storage (``memory_dtype``): dtype kept, saved and loaded, never non-finite."""
import io

import pytest
import torch

from protomem_plugin.heads import PrototypeMemory, QualityAwarePrototypeMemory
from protomem_plugin.heads.prototype_memory import NonFinitePrototypeError
from protomem_plugin.losses import CombinedMarginLoss

MARGIN = CombinedMarginLoss(32.0, 1.0, 0.5, 0.0)
LOW = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def batches(steps=8, batch=16, dim=16, classes=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, dim, generator=g) * 5,
             torch.randperm(classes, generator=g)[: batch // 2].repeat_interleave(2)) for _ in range(steps)]


def run(head, data, **extras):
    losses = []
    for x, y in data:
        loss = head(x.clone().requires_grad_(True), y, **extras)
        loss.backward()
        losses.append(loss.detach())
    return torch.stack(losses)


@pytest.mark.parametrize("name", list(LOW))
def test_storage_dtype_survives_module_casts(name):
    head = PrototypeMemory(MARGIN, 16, 40, memory_size=20, memory_dtype=name)
    assert head.memory.dtype == LOW[name]
    for cast in (lambda h: h.float(), lambda h: h.double(), lambda h: h.to(torch.float32), lambda h: h.half()):
        assert cast(head).memory.dtype == LOW[name]
    assert head.memory.element_size() * head.memory.numel() == 20 * 16 * 2
    # the default follows the module dtype like any buffer
    assert PrototypeMemory(MARGIN, 16, 40, memory_size=20).double().memory.dtype == torch.float64


@pytest.mark.parametrize("name", list(LOW))
def test_stores_the_rounded_prototypes_and_computes_in_float32(name):
    data = batches()
    full = PrototypeMemory(MARGIN, 16, 40, memory_size=20)
    low = PrototypeMemory(MARGIN, 16, 40, memory_size=20, memory_dtype=name)
    full_losses, low_losses = run(full, data[:1]), run(low, data[:1])
    # the first step reads no stored prototype (every occupied slot was written now): identical losses
    assert torch.equal(full_losses, low_losses)
    assert torch.equal(low.memory, full.memory.to(LOW[name]))
    assert torch.equal(low.slot_class, full.slot_class)
    # later steps read the rounded prototypes: close, not equal
    full_losses, low_losses = run(full, data[1:]), run(low, data[1:])
    assert low_losses.dtype == torch.float32
    gap = (low_losses - full_losses).abs().max().item()
    assert 0 < gap < 0.05 * full_losses.abs().max().item()


@pytest.mark.parametrize("name", list(LOW))
def test_state_dict_round_trip_with_weights_only_load(name):
    data = batches(steps=10)
    make = lambda: QualityAwarePrototypeMemory(MARGIN, 16, 40, memory_size=20, memory_dtype=name,  # noqa: E731
                                               quality_source="recognizability_soft")
    head = make()
    run(head, data[:5])
    buffer = io.BytesIO()
    torch.save(head.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert saved["memory"].dtype == LOW[name]
    fresh = make()
    fresh.load_state_dict(saved)
    assert torch.equal(fresh.memory, head.memory)
    assert torch.equal(run(fresh, data[5:]), run(head, data[5:]))
    assert torch.equal(fresh.memory, head.memory)


def test_float32_checkpoint_loads_into_float16_storage_and_overflow_is_refused():
    head32 = PrototypeMemory(MARGIN, 16, 40, memory_size=20)
    run(head32, batches(steps=3))
    head16 = PrototypeMemory(MARGIN, 16, 40, memory_size=20, memory_dtype="float16")
    head16.load_state_dict(head32.state_dict())
    assert head16.memory.dtype == torch.float16
    assert torch.equal(head16.memory, head32.memory.half())
    state = head32.state_dict()
    state["memory"] = state["memory"].clone()
    state["memory"][0, 0] = 1e5  # beyond float16's largest finite value (65504)
    before = head16.memory.clone()
    with pytest.raises(ValueError, match="'memory'.*not finite in torch.float16"):
        head16.load_state_dict(state)
    assert torch.equal(head16.memory, before)


@pytest.mark.parametrize("name", list(LOW))
def test_never_writes_non_finite_values(name):
    head = PrototypeMemory(MARGIN, 4, 40, memory_size=8, memory_dtype=name)
    run(head, batches(steps=2, batch=4, dim=4))
    state = {k: v.clone() for k, v in head.state_dict().items()}
    # a prototype whose entries overflow the storage dtype is refused, nothing is written
    huge = torch.tensor([[1e39, 0.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5]])
    with pytest.raises(NonFinitePrototypeError, match=r"classes \[11\]"):
        head.write_prototypes(torch.tensor([11, 12]), huge)
    for key, value in head.state_dict().items():
        assert torch.equal(value, state[key]), key
    # extreme (finite) embedding scales still give unit prototypes, stored finite
    for scale in (1e-30, 1e30, 6e4):
        x = torch.randn(4, 4) * scale
        head(x.requires_grad_(True), torch.tensor([20, 20, 21, 21])).backward()
        assert torch.isfinite(head.memory).all()
    stored = head.memory[head.slot_class >= 0].float()
    torch.testing.assert_close(stored.norm(dim=1), torch.ones(stored.shape[0]), rtol=0, atol=1e-2)
