"""What a GPU run needs and a CPU run can check: device-independent head state, labels on the
embeddings' device, low-precision storage without copies, fp16-safe chunked gradients."""
import pytest
import torch
import torch.nn.functional as F

from dispatch_probe import LargeOutputs
from protomem_plugin import distributed as D
from protomem_plugin.heads import PartialFC, PrototypeMemory
from protomem_plugin.heads import prototype_memory as pm_module
from protomem_plugin.heads.chunked import ColumnSource, chunked_softmax_statistics
from protomem_plugin.losses import CombinedMarginLoss

ARC = CombinedMarginLoss(64.0, 1.0, 0.5, 0.0)


def batch(step, classes=200, size=16, dim=8):
    g = torch.Generator().manual_seed(step)
    labels = torch.randperm(classes, generator=g)[: size // 2].repeat_interleave(2)
    return torch.randn(size, dim, generator=g).requires_grad_(True), labels


# ----------------------------------------------------------------------------- Partial FC sampler state
def test_partial_fc_sampler_state_is_device_independent_and_resumes_exactly():
    torch.manual_seed(0)
    head = PartialFC(ARC, 8, 200, sample_rate=0.1)
    for step in range(3):
        x, y = batch(step)
        head(x, y).backward()
    state = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in head.state_dict().items()}
    extra = state["_extra_state"]
    # plain integers: nothing shaped by a generator implementation (a CUDA state is 16 bytes, a CPU one 5056)
    assert extra == {"sampler_seed": head.sampler_seed, "sampler_draws": 3}
    torch.manual_seed(1)
    resumed = PartialFC(ARC, 8, 200, sample_rate=0.1)
    resumed.load_state_dict(state)
    for step in range(3, 6):
        labels = batch(step)[1]
        local = labels - head.class_start
        a, b = head.sample(local), resumed.sample(local)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_partial_fc_checkpoint_with_a_cuda_generator_state_loads_on_cpu():
    head = PartialFC(ARC, 8, 200, sample_rate=0.1)
    for step in range(2):
        x, y = batch(step)
        head(x, y).backward()
    state = dict(head.state_dict())
    state["_extra_state"] = {"sampler_rng": torch.zeros(16, dtype=torch.uint8)}  # as a CUDA generator saves it
    fresh = PartialFC(ARC, 8, 200, sample_rate=0.1)
    fresh.load_state_dict(state)
    assert fresh._sampler_draws == 2  # older checkpoints continue from the head's step count
    x, y = batch(5)
    assert torch.isfinite(fresh(x, y))


# ----------------------------------------------------------------------------- labels
@pytest.mark.parametrize("head", [PartialFC(ARC, 8, 50), PrototypeMemory(ARC, 8, 50, memory_size=16)])
def test_labels_from_the_host_move_to_the_embeddings_device(head):
    embeddings = torch.empty(4, 8, device="meta")  # a device other than the labels'
    _, labels = head.check_local_inputs(embeddings, torch.tensor([1, 2, 3, 4], dtype=torch.int32))
    assert labels.device == embeddings.device and labels.dtype == torch.int64


# ----------------------------------------------------------------------------- low-precision storage
@pytest.mark.parametrize("path", ["fused", "composed"])
@pytest.mark.parametrize("memory_dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("full", [False, True])
def test_low_precision_memory_is_never_copied_whole_under_fp16(monkeypatch, memory_dtype, full, path):
    monkeypatch.setattr(pm_module._StoredCosines, "BLOCK", 256)  # blocks well below the memory size
    slots, dim = 2048, 64  # the (batch, slots) logits stay below the probe size
    if path == "fused":  # the head's block bound: 256 columns at a time
        margin, chunk = ARC, 256
    else:  # a plain callable has no target form: the logits are composed, the memory read by _StoredCosines
        margin, chunk = (lambda logits, labels: ARC(logits, labels)), 0
    head = PrototypeMemory(margin, dim, 100_000, memory_size=slots, memory_dtype=memory_dtype, fp16=True,
                           logits_chunk=chunk)
    g = torch.Generator().manual_seed(0)
    fill = slots if full else slots // 2
    classes = torch.arange(fill)
    head.write_prototypes(classes, F.normalize(torch.randn(fill, dim, generator=g), dim=1))
    x = torch.randn(16, dim, generator=g).requires_grad_(True)
    labels = torch.arange(50_000, 50_008).repeat_interleave(2)
    probe = LargeOutputs(numel=fill * dim // 2, keep=head.memory)
    with probe:
        head(x, labels).backward()
    assert probe.found == []
    assert (head.workspace.nbytes > 0) == (path == "fused")


# ----------------------------------------------------------------------------- chunked fp16 gradients
def _loss_and_grad(normed, weight, target, chunk, autocast, dtype):
    x = normed.detach().to(dtype).requires_grad_(True)
    w = weight.to(dtype)
    if chunk:
        stats = chunked_softmax_statistics(x, ColumnSource(w), ARC, target, chunk, autocast)
    else:
        with autocast():
            cos = x @ w.t()
        stats = D.softmax_statistics(ARC(cos.to(torch.float32 if dtype != torch.float64 else dtype).clamp(-1, 1),
                                         target), target)
    loss = D.cross_entropy_from_statistics(*stats)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.double(), grad.double()


@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["random", "many equal logits"])
def test_chunked_low_precision_gradient_matches_float64_like_the_plain_path(low, case):
    g = torch.Generator().manual_seed(0)
    rows, dim, columns = 4, 16, 40_000
    normed = F.normalize(torch.randn(rows, dim, generator=g), dim=1)
    if case == "random":
        weight = F.normalize(torch.randn(columns, dim, generator=g), dim=1)
    else:  # every column the same cosine: the forward's gradient sum has 40000 equal terms (fp16 overflows)
        weight = normed[:1].repeat(columns, 1) + 1e-3 * torch.randn(columns, dim, generator=g)
        weight = F.normalize(weight, dim=1)
    target = torch.tensor([0, 5, 17, 39_999])
    _, ref_grad = _reference(normed, weight, target)

    def autocast():
        return torch.autocast("cpu", dtype=low)

    _, plain = _loss_and_grad(normed, weight, target, 0, autocast, torch.float32)
    _, chunked = _loss_and_grad(normed, weight, target, columns, autocast, torch.float32)
    assert torch.isfinite(chunked).all()
    scale = ref_grad.norm()
    plain_error = (plain - ref_grad).norm() / scale
    chunked_error = (chunked - ref_grad).norm() / scale
    assert chunked_error <= max(2 * plain_error, 2e-2), (float(chunked_error), float(plain_error))


def _reference(normed, weight, target):
    x = normed.double().requires_grad_(True)
    stats = D.softmax_statistics(ARC((x @ weight.double().t()).clamp(-1, 1), target), target)
    loss = D.cross_entropy_from_statistics(*stats)
    (grad,) = torch.autograd.grad(loss, x)
    return loss, grad
