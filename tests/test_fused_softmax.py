"""The fused margin softmax (heads/fused.py) equals the autograd composition it replaces.

Float64: statistics and gradients of ``fused_softmax_statistics`` against
``softmax_statistics(margin(clamp(x @ W.T, -1, 1), target))`` for every margin with a target form;
whole heads (PM, QAPM; plain and chunked; prototype gradient on and off; low-precision storage; a
memory with gaps between occupied slots) against the same heads whose margin hides its target form;
the reused workspace carries nothing from one step, head or rank to the next.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

from dispatch_probe import LargeOutputs
from dist_utils import run_distributed
from protomem_plugin import distributed as D
from protomem_plugin.heads import PrototypeMemory, QualityAwarePrototypeMemory
from protomem_plugin.heads.chunked import ColumnSource
from protomem_plugin.heads.fused import Workspace, fused_form, fused_softmax_statistics
from protomem_plugin.losses import AdaFaceMarginLoss, CombinedMarginLoss, bind_norms, target_form


class Hidden(torch.nn.Module):
    """The same margin without its target form: heads must call it (the autograd composition)."""

    def __init__(self, margin):
        super().__init__()
        self.margin = margin  # a submodule: converted with the head (AdaFace's statistics)
        self.needs_norms = getattr(margin, "needs_norms", False)

    def forward(self, logits, labels, **kwargs):
        return self.margin(logits, labels, **kwargs)

    def begin_batch(self, norms):
        batch = self.margin.begin_batch(norms)
        return lambda logits, labels: batch(logits, labels)


def margins():
    return {
        "arcface": CombinedMarginLoss(16, 1.0, 0.5, 0.0),
        "arcface_exact": CombinedMarginLoss(16, 1.0, 0.5, 0.0, gradient="exact"),
        "cosface": CombinedMarginLoss(16, 1.0, 0.0, 0.35),
        "combined": CombinedMarginLoss(16, 1.1, 0.3, 0.1),
        "combined_exact": CombinedMarginLoss(16, 1.1, 0.3, 0.1, gradient="exact"),
    }


def reference_statistics(normed, source, margin, target):
    rows = torch.arange(source.num_columns)
    w = source.column_vectors(source.weight, source.override, rows, normed.dtype)
    logits = (normed @ w.t()).clamp(-1.0, 1.0)
    return D.softmax_statistics(margin(logits, target), target)


def assert_fused_equals_reference(normed, source, form, margin, target, block, inputs):
    """Fused statistics and the cross-entropy's gradients w.r.t. ``inputs`` equal the composition's."""
    fused = fused_softmax_statistics(normed, source, form, margin, target, block)
    ref = reference_statistics(normed, source, margin, target)
    for a, b in zip(fused, ref):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)
    got = torch.autograd.grad(D.cross_entropy_from_statistics(*fused), inputs)
    want = torch.autograd.grad(D.cross_entropy_from_statistics(*ref), inputs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)


def problem(seed, rows=7, dim=6, columns=23, override=True, stretch=False, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    normed = F.normalize(torch.randn(rows, dim, generator=g, dtype=dtype), dim=1).requires_grad_(True)
    weight = F.normalize(torch.randn(columns, dim, generator=g, dtype=dtype), dim=1)
    target = torch.randint(0, columns, (rows,), generator=g)
    target[1] = -1  # a row whose target is on another shard
    if stretch:  # cosines beyond [-1, 1]: clamped, and their entries carry no gradient
        weight[:3] = normed.detach()[:3] * 1.5
        weight[3] = -normed.detach()[4] * 1.5
        target[0] = 0
    written = torch.tensor([2, 9, 17]) if override else None
    protos = None
    if override:
        protos = F.normalize(torch.randn(3, dim, generator=g, dtype=dtype), dim=1).requires_grad_(True)
        weight[written] = protos.detach()
        target[2] = 9
    return normed, weight, target, written, protos


@pytest.mark.parametrize("name", list(margins()))
@pytest.mark.parametrize("block", [1, 4, 23, 64])
@pytest.mark.parametrize("case", ["override", "plain", "stretch"])
def test_statistics_and_gradients_equal_the_autograd_composition(name, block, case):
    margin = margins()[name]
    normed, weight, target, written, protos = problem(3, override=case == "override", stretch=case == "stretch")
    source = ColumnSource(weight, override_columns=written, override=protos, override_in_weight=True)
    form = fused_form(margin, normed, source)
    assert form is not None
    fused = fused_softmax_statistics(normed, source, form, margin, target, block)
    ref = reference_statistics(normed, source, margin, target)
    for a, b, what in zip(fused, ref, ("row max", "sum exp", "target logit")):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13, msg=f"{what}")
    upstream = torch.randn(2, normed.shape[0], generator=torch.Generator().manual_seed(1), dtype=normed.dtype)
    inputs = [normed] + ([protos] if protos is not None else [])
    got = torch.autograd.grad((fused[1] * upstream[0] + fused[2] * upstream[1]).sum(), inputs)
    want = torch.autograd.grad((ref[1] * upstream[0] + ref[2] * upstream[1]).sum(), inputs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)
    if case == "stretch":  # the case really has cosines beyond +-1 (target and non-target entries)
        raw = normed.detach() @ weight.t()
        assert raw[0, 0] > 1 and raw[1, 1] > 1 and raw[4, 3] < -1


def test_low_precision_weight_and_index_sources_equal_the_composition():
    margin = margins()["arcface_exact"]
    normed, weight, target, written, protos = problem(5, columns=30)
    stored = weight.to(torch.bfloat16)  # the written rows hold rounded prototypes: the override wins
    index = torch.randperm(40, generator=torch.Generator().manual_seed(2))[:30]
    big = torch.zeros(40, weight.shape[1], dtype=torch.bfloat16)
    big[index] = stored
    for source in (ColumnSource(stored, override_columns=written, override=protos),
                   ColumnSource(big, index=index, override_columns=written, override=protos)):
        form = fused_form(margin, normed, source)
        assert_fused_equals_reference(normed, source, form, margin, target, 7, [normed, protos])


def test_adaface_batch_fuses_and_equals_its_call():
    margin = AdaFaceMarginLoss(s=16.0)
    normed, weight, target, written, protos = problem(7)
    norms = torch.linspace(5, 40, normed.shape[0], dtype=torch.float64)
    batch = bind_norms(margin, norms)
    source = ColumnSource(weight, override_columns=written, override=protos, override_in_weight=True)
    form = fused_form(batch, normed, source)
    assert form is not None and form.scale == 16.0
    assert_fused_equals_reference(normed, source, form, batch, target, 5, [normed, protos])


def test_target_form_only_where_the_margin_is_scale_plus_target():
    class Subclass(CombinedMarginLoss):
        def forward(self, logits, labels):
            return super().forward(logits, labels) + 1.0

    class AdaSubclass(AdaFaceMarginLoss):
        def apply_margin(self, logits, labels, g_angle, g_add):
            return super().apply_margin(logits, labels, g_angle, g_add) * 2

    assert target_form(CombinedMarginLoss(64, 1, 0.5, 0)) is not None
    assert target_form(CombinedMarginLoss(64, 1, 0.5, 0, interclass_filtering_threshold=0.2)) is None
    assert target_form(Subclass(64, 1, 0.5, 0)) is None
    hooked = CombinedMarginLoss(64, 1, 0.5, 0)
    hooked.register_forward_hook(lambda module, args, out: out)
    assert target_form(hooked) is None
    assert target_form(lambda logits, labels: logits) is None
    norms = torch.ones(4)
    assert target_form(AdaFaceMarginLoss().begin_batch(norms)) is not None
    assert target_form(AdaSubclass().begin_batch(norms)) is None
    source = ColumnSource(torch.randn(5, 3))
    x = torch.randn(4, 3)
    margin = CombinedMarginLoss(64, 1, 0.5, 0)
    assert fused_form(margin, x, source) is not None
    assert fused_form(margin, x.half(), source) is None
    assert fused_form(margin, x, ColumnSource(torch.randn(5, 3), normalize=True)) is None
    assert fused_form(margin, x, ColumnSource(torch.randn(5, 3, requires_grad=True))) is None
    assert fused_form(CombinedMarginLoss(-1.0, 1, 0.5, 0), x, source) is None


@pytest.mark.parametrize("name", ["arcface", "combined_exact"])
def test_target_form_reproduces_the_margin_call(name):
    margin = margins()[name]
    g = torch.Generator().manual_seed(0)
    logits = torch.rand(6, 9, generator=g, dtype=torch.float64) * 2 - 1
    labels = torch.tensor([0, 3, -1, 8, 8, 2])
    form = target_form(margin)
    rows = torch.arange(6)
    expected = logits * form.scale
    expected[rows, labels.clamp_min(0)] = form.targets(logits[rows, labels.clamp_min(0)], labels)
    assert torch.equal(margin(logits, labels), expected)


# ----------------------------------------------------------------------------- whole heads
STEPS, BATCH, DIM, CLASSES, SLOTS = 6, 12, 8, 40, 18


def batches(seed=0, dim=DIM):
    g = torch.Generator().manual_seed(seed)
    out = []
    for step in range(STEPS):
        classes = torch.randperm(CLASSES, generator=g)[: BATCH // 2]
        labels = classes.repeat_interleave(2)
        if step == 2:
            labels[-1] = labels[0]  # a class with three images, one with a single image
        out.append((torch.randn(BATCH, dim, generator=g, dtype=torch.float64) * 3, labels))
    return out


def make(kind, margin, chunk=0, slots=SLOTS, **kw):
    torch.manual_seed(0)
    if kind == "qapm":
        return QualityAwarePrototypeMemory(margin, DIM, CLASSES, memory_size=slots, logits_chunk=chunk, **kw).double()
    return PrototypeMemory(margin, DIM, CLASSES, memory_size=slots, logits_chunk=chunk, **kw).double()


def run(head, data, rank=0, world_size=1, before_step=None):
    losses, grads = [], []
    local = BATCH // world_size
    for x, y in data:
        if before_step is not None:
            before_step(head)
        xl = x[rank * local : (rank + 1) * local].clone().requires_grad_(True)
        loss = head(xl, y[rank * local : (rank + 1) * local])
        loss.backward()
        losses.append(loss.detach())
        grads.append(xl.grad)
    return losses, grads, {k: v.clone() for k, v in head.state_dict().items()}


def assert_runs_equal(a, b, rtol=1e-11, what=""):
    for step, (la, lb) in enumerate(zip(a[0], b[0])):
        torch.testing.assert_close(la, lb, rtol=rtol, atol=1e-13, msg=lambda m: f"{what} loss step {step}: {m}")
    for step, (ga, gb) in enumerate(zip(a[1], b[1])):
        torch.testing.assert_close(ga, gb, rtol=rtol * 100, atol=1e-12, msg=lambda m: f"{what} grad step {step}: {m}")
    for key in a[2]:
        if not key.startswith("margin_loss."):  # the composed margin sits one level deeper
            assert torch.equal(a[2][key], b[2][key]), f"{what}: state {key}"


@pytest.mark.parametrize("kind,options", [
    ("pm", {}), ("pm", {"prototype_grad": False}), ("pm", {"memory_dtype": "bfloat16"}), ("qapm", {}),
    ("qapm", {"quality_source": "recognizability_soft"})])
@pytest.mark.parametrize("chunk", [0, 5])
def test_fused_heads_equal_the_composed_heads(kind, options, chunk):
    for name, margin in margins().items():
        fused = run(make(kind, margin, chunk, **options), batches())
        composed = run(make(kind, Hidden(margin), chunk, **options), batches())
        assert_runs_equal(fused, composed, what=f"{kind} {options} {name} chunk={chunk}")


def test_adaface_head_fused_equals_composed():
    fused = run(make("pm", AdaFaceMarginLoss(s=16.0)), batches())
    composed = run(make("pm", Hidden(AdaFaceMarginLoss(s=16.0))), batches())
    assert_runs_equal(fused, composed, what="adaface")


def gapped_state(head):
    """The head's state with its occupied slots moved apart (every other slot empty)."""
    state = {k: v.clone() for k, v in head.state_dict().items()}
    occupied = torch.nonzero(state["slot_class"] >= 0).squeeze(1)
    spread = torch.arange(occupied.numel()) * 2 + 1
    for key in ("memory", "slot_class", "slot_step"):
        moved = state[key][occupied].clone()
        state[key][occupied] = torch.full_like(moved, -1) if key != "memory" else torch.zeros_like(moved)
        state[key][spread] = moved
    return state


@pytest.mark.parametrize("chunk", [0, 5])
def test_memory_with_gaps_equals_the_composition_and_is_never_copied_whole(chunk):
    margin, dim = margins()["arcface"], 32  # the memory (64 x 32) is larger than the (12, 64) logits
    data = batches(1, dim)
    heads = []
    for m in (margin, Hidden(margin)):
        torch.manual_seed(0)
        head = PrototypeMemory(m, dim, CLASSES, memory_size=64, logits_chunk=chunk).double()
        run(head, data[:2])
        head.load_state_dict(gapped_state(head))
        heads.append(head)
    fused, composed = run(heads[0], data[2:]), run(heads[1], data[2:])
    assert_runs_equal(fused, composed, what=f"gapped chunk={chunk}")
    # the fused path reads the scattered slots block by block: no copy of the memory's size
    head = heads[0]
    x, y = data[0]
    probe = LargeOutputs(numel=head.memory.numel() // 2, keep=head.memory)
    with probe:
        head(x.clone().requires_grad_(True), y).backward()
    assert probe.found == []


def test_workspace_reuse_carries_nothing_between_steps_or_heads():
    margin = margins()["arcface_exact"]
    clean = run(make("pm", margin), batches())

    def poison(head):  # whatever the buffers held before a step, the step overwrites it
        for buf in head.workspace._buffers.values():
            buf.fill_(float("nan"))

    poisoned = run(make("pm", margin), batches(), before_step=poison)
    assert_runs_equal(clean, poisoned, rtol=0, what="poisoned workspace")
    head = make("pm", margin)
    run(head, batches()[:1])
    assert head.workspace.nbytes > 0
    assert not any("workspace" in k for k in head.state_dict())
    twin = copy.deepcopy(head)
    assert twin.workspace is not head.workspace and twin.workspace.nbytes == 0
    # two heads interleaved step by step: each keeps its own buffers and its own results
    a, b = make("pm", margin), make("qapm", margin)
    out_a, out_b = [], []
    for x, y in batches():
        for head, out in ((a, out_a), (b, out_b)):
            xl = x.clone().requires_grad_(True)
            head(xl, y).backward()
            out.append(xl.grad)
    ref_b = run(make("qapm", margin), batches())
    for got, want in zip(out_a, clean[1]):
        assert torch.equal(got, want)
    for got, want in zip(out_b, ref_b[1]):
        assert torch.equal(got, want)


def test_workspace_grows_and_follows_dtype():
    ws = Workspace()
    a = ws.get("x", 10, torch.float32, torch.device("cpu"))
    b = ws.get("x", 5, torch.float32, torch.device("cpu"))
    assert b.data_ptr() == a.data_ptr() and b.numel() == 5
    c = ws.get("x", 20, torch.float64, torch.device("cpu"))
    assert c.dtype == torch.float64 and c.numel() == 20 and ws.nbytes == 160


NO_EVICTION = 2 * CLASSES  # eviction is decided per shard: a memory that never fills compares with one process


def _distributed_worker(rank, world_size, out_dir):
    torch.set_num_threads(1)
    results = {}
    for name in ("arcface", "combined_exact"):
        margin = margins()[name]
        for chunk in (0, 5):
            results[f"{name}|{chunk}|fused"] = run(make("pm", margin, chunk, NO_EVICTION), batches(), rank,
                                                   world_size)[:2]
            results[f"{name}|{chunk}|composed"] = run(make("pm", Hidden(margin), chunk, NO_EVICTION), batches(), rank,
                                                      world_size)[:2]
    torch.save(results, f"{out_dir}/rank{rank}.pt")


def test_two_ranks_fused_equals_composed_and_one_process(tmp_path):
    run_distributed(_distributed_worker, 2, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for name in ("arcface", "combined_exact"):
        for chunk in (0, 5):
            single = run(make("pm", margins()[name], chunk, NO_EVICTION), batches())
            for rank, results in enumerate(ranks):
                fused, composed = results[f"{name}|{chunk}|fused"], results[f"{name}|{chunk}|composed"]
                for la, lb, ls in zip(fused[0], composed[0], single[0]):
                    torch.testing.assert_close(la, lb, rtol=1e-11, atol=1e-13)
                    torch.testing.assert_close(la, ls, rtol=1e-11, atol=1e-13)
                local = BATCH // 2
                for ga, gb, gs in zip(fused[1], composed[1], single[1]):
                    torch.testing.assert_close(ga, gb, rtol=1e-9, atol=1e-12)
                    # the all-gather's backward scales the local slice by the world size (DDP then averages)
                    torch.testing.assert_close(ga, 2 * gs[rank * local : (rank + 1) * local], rtol=1e-9, atol=1e-12)


def test_fused_statistics_never_wait_for_the_device():
    from protomem_plugin.host_syncs import HostSyncCounter

    margin = margins()["arcface_exact"]
    normed, weight, target, written, protos = problem(11, columns=40, stretch=True)
    source = ColumnSource(weight.to(torch.bfloat16), override_columns=written, override=protos)  # every branch
    form = fused_form(margin, normed, source)
    with HostSyncCounter() as syncs:
        stats = fused_softmax_statistics(normed, source, form, margin, target, 6)
        D.cross_entropy_from_statistics(*stats, check_columns=False).backward()
    assert syncs.total == 0, syncs.counts


# ----------------------------------------------------------------------------- fp16 (autocast) heads
def _fp16_run(margin, fp16, dtype=torch.float32, **options):
    torch.manual_seed(0)
    head = PrototypeMemory(margin, DIM, CLASSES, memory_size=SLOTS, fp16=fp16, **options).to(dtype)
    losses, grads = [], []
    for x, y in batches():
        xl = x.to(dtype).clone().requires_grad_(True)
        loss = head(xl, y)
        loss.backward()
        losses.append(loss.detach().double())
        grads.append(xl.grad.double())
    return head, losses, grads


@pytest.mark.parametrize("memory_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["arcface", "cosface"])
def test_fp16_heads_fuse_with_low_precision_products_as_close_to_float64_as_the_composed_path(name, memory_dtype):
    margin = margins()[name]
    _, ref_losses, ref_grads = _fp16_run(margin, False, torch.float64)
    head, losses, grads = _fp16_run(margin, True, memory_dtype=memory_dtype)
    _, composed_losses, composed_grads = _fp16_run(Hidden(margin), True, memory_dtype=memory_dtype)
    _, fp32_losses, fp32_grads = _fp16_run(margin, False, memory_dtype=memory_dtype)
    assert head.workspace.nbytes > 0, "the fp16 head took the fused path"
    for step in range(STEPS):  # the same bfloat16 logits, so the same loss
        torch.testing.assert_close(losses[step], composed_losses[step], rtol=1e-6, atol=1e-6)
    fused_error = max((g - r).abs().max().item() for g, r in zip(grads, ref_grads))
    composed_error = max((g - r).abs().max().item() for g, r in zip(composed_grads, ref_grads))
    low_precision = max((g - r).abs().max().item() for g, r in zip(grads, fp32_grads))
    scale = max(r.abs().max().item() for r in ref_grads)
    assert fused_error <= 2 * composed_error and fused_error < 0.05 * scale, (fused_error, composed_error, scale)
    assert low_precision > 1e-5, "the products ran in bfloat16"


def test_fp16_fused_head_never_makes_a_batch_by_memory_tensor():
    margin = margins()["cosface"]
    torch.manual_seed(0)
    head = PrototypeMemory(margin, DIM, 10_000, memory_size=4096, fp16=True, logits_chunk=64)
    head.write_prototypes(torch.arange(4096), F.normalize(torch.randn(4096, DIM), dim=1))
    x, y = batches()[0]
    x = x.float().requires_grad_(True)
    probe = LargeOutputs(numel=x.shape[0] * 4096 // 2, keep=head.memory)
    with probe:
        head(x, y + 5000).backward()
    assert probe.found == [] and head.workspace.nbytes > 0


def test_float16_products_take_at_most_32768_columns_so_their_sums_stay_finite():
    columns = 70_000  # every column the same unit vector: a float16 sum over all of them would be 70000
    weight = torch.zeros(columns, 4)
    weight[:, 0] = 1.0
    normed = torch.zeros(2, 4)
    normed[:, 0] = 1.0
    normed.requires_grad_(True)
    source = ColumnSource(weight)
    margin = CombinedMarginLoss(1.0, 1.0, 0.0, 0.0)
    form = fused_form(margin, normed, source)
    target = torch.tensor([0, 5])
    half = fused_softmax_statistics(normed, source, form, margin, target, 1 << 20, Workspace(),
                                    lambda: torch.autocast("cpu", dtype=torch.float16))
    plain = fused_softmax_statistics(normed, source, form, margin, target, 1 << 20)
    (got,) = torch.autograd.grad(D.cross_entropy_from_statistics(*half), normed)
    (want,) = torch.autograd.grad(D.cross_entropy_from_statistics(*plain), normed)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)
