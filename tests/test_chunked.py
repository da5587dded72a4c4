"""Chunked margin softmax (``logits_chunk``) == the plain path: losses, gradients and memory states.

Float64, tiny sizes; chunks of 3 columns (3 divides none of the column counts, and with at most 4
target columns among 5+ chunks, some chunk holds no target), a first step whose classes all belong to shard 0 (shard 1 has no occupied slot), every
margin mode with and without interclass filtering, an arcface_torch-style callable that edits its
input in place. One process in-process, two gloo processes in one spawn running every case.
"""
import pytest
import torch
from easydict import EasyDict as edict

from dist_utils import run_distributed
from protomem_plugin import registry
from protomem_plugin.heads import PartialFC, PrototypeMemory, QualityAwarePrototypeMemory
from protomem_plugin.losses import CombinedMarginLoss

STEPS, BATCH, DIM, CLASSES, SLOTS = 4, 8, 5, 24, 14
CHUNKS = (3,)
THRESHOLD = 0.2


def arcface_torch_inplace(filtering: bool):
    """Re-statement of arcface_torch's CombinedMarginLoss ArcFace branch (in-place edits under no_grad)."""

    def margin(logits, labels, s=16.0, m=0.4):
        index = torch.where(labels != -1)[0]
        if filtering:
            with torch.no_grad():
                dirty = (logits > THRESHOLD).to(logits.dtype)
                mask = torch.ones(index.numel(), logits.shape[1], dtype=logits.dtype)
                mask.scatter_(1, labels[index, None], 0)
                dirty[index] *= mask
            logits = (1 - dirty) * logits
        target = logits[index, labels[index]]
        with torch.no_grad():
            target.arccos_()
            logits.arccos_()
            logits[index, labels[index]] = target + m
            logits.cos_()
        return logits * s

    return margin


def margins():
    out = {}
    for thr in (0.0, THRESHOLD):
        tag = "_filter" if thr else ""
        out[f"arcface_st{tag}"] = CombinedMarginLoss(16, 1.0, 0.5, 0.0, thr)
        out[f"arcface_exact{tag}"] = CombinedMarginLoss(16, 1.0, 0.5, 0.0, thr, gradient="exact")
        out[f"cosface{tag}"] = CombinedMarginLoss(16, 1.0, 0.0, 0.35, thr)
        out[f"combined_st{tag}"] = CombinedMarginLoss(16, 1.1, 0.3, 0.1, thr)
        out[f"combined_exact{tag}"] = CombinedMarginLoss(16, 1.1, 0.3, 0.1, thr, gradient="exact")
        out[f"inplace_callable{tag}"] = arcface_torch_inplace(bool(thr))
    return out


MARGINS = margins()
KINDS = ("pfc_sampled", "pfc_full", "pm", "pm_detached", "pm_bf16", "qapm")


def make_head(kind, margin, chunk):
    torch.manual_seed(0)
    if kind == "pfc_sampled":
        return PartialFC(margin, DIM, CLASSES, sample_rate=0.6, logits_chunk=chunk).double()
    if kind == "pfc_full":
        return PartialFC(margin, DIM, CLASSES, logits_chunk=chunk).double()
    if kind == "qapm":
        return QualityAwarePrototypeMemory(margin, DIM, CLASSES, memory_size=SLOTS, logits_chunk=chunk).double()
    return PrototypeMemory(
        margin, DIM, CLASSES, memory_size=SLOTS, logits_chunk=chunk, prototype_grad=kind != "pm_detached",
        memory_dtype="bfloat16" if kind == "pm_bf16" else "float32",
    ).double()


def global_batches():
    g = torch.Generator().manual_seed(3)
    out = []
    for step in range(STEPS):
        if step == 0:  # even classes only: on 2 ranks, shard 1 starts with no occupied slot
            classes = torch.randperm(CLASSES // 2, generator=g)[: BATCH // 2] * 2
        else:
            classes = torch.randperm(CLASSES, generator=g)[: BATCH // 2]
        out.append((torch.randn(BATCH, DIM, generator=g, dtype=torch.float64) * 2, classes.repeat_interleave(2)))
    return out


def run_case(kind, margin_name, chunk, rank=0, world_size=1):
    """Losses, input gradients, parameter gradients and final state of one head over the sequence."""
    head = make_head(kind, MARGINS[margin_name], chunk)
    local = BATCH // world_size
    losses, grads, param_grads, occupied = [], [], [], []
    for x, y in global_batches():
        xl = x[rank * local : (rank + 1) * local].clone().requires_grad_(True)
        loss = head(xl, y[rank * local : (rank + 1) * local])
        loss.backward()
        losses.append(loss.detach())
        grads.append(xl.grad)
        occupied.append(int((head.slot_class >= 0).sum()) if hasattr(head, "slot_class") else -1)
        for p in head.parameters():
            param_grads.append(p.grad.clone())
            p.grad = None
    state = {k: v for k, v in head.state_dict().items() if isinstance(v, torch.Tensor)}
    return {"losses": losses, "grads": grads, "param_grads": param_grads, "state": state,
            "occupied": torch.tensor(occupied)}


def assert_same(plain, chunked, what):
    for step, (a, b) in enumerate(zip(plain["losses"], chunked["losses"])):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12, msg=lambda m: f"{what} loss step {step}: {m}")
    for step, (a, b) in enumerate(zip(plain["grads"], chunked["grads"])):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12, msg=lambda m: f"{what} grad step {step}: {m}")
    assert len(plain["param_grads"]) == len(chunked["param_grads"])
    for a, b in zip(plain["param_grads"], chunked["param_grads"]):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12, msg=lambda m: f"{what} parameter grad: {m}")
    for key, value in plain["state"].items():
        assert torch.equal(chunked["state"][key], value), f"{what}: state {key} differs"


def all_cases():
    return [(k, m, c) for k in KINDS for m in MARGINS for c in CHUNKS]


def worker(rank, world_size, out_dir):
    torch.set_num_threads(1)  # two processes on a small machine: no oversubscription
    results = {}
    for kind, margin_name, chunk in all_cases():
        results[f"{kind}|{margin_name}|0"] = results.get(f"{kind}|{margin_name}|0") or run_case(
            kind, margin_name, 0, rank, world_size)
        results[f"{kind}|{margin_name}|{chunk}"] = run_case(kind, margin_name, chunk, rank, world_size)
    torch.save(results, f"{out_dir}/rank{rank}.pt")


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("chunked_two_ranks")
    run_distributed(worker, 2, str(out))
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_equals_plain_one_process(kind):
    for margin_name in MARGINS:
        plain = run_case(kind, margin_name, 0)
        assert all(torch.isfinite(loss) for loss in plain["losses"])
        for chunk in CHUNKS:
            assert_same(plain, run_case(kind, margin_name, chunk), f"{kind}/{margin_name}/chunk={chunk}")


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_equals_plain_two_processes(kind, two_rank_results):
    for margin_name in MARGINS:
        for rank, results in enumerate(two_rank_results):
            plain = results[f"{kind}|{margin_name}|0"]
            for chunk in CHUNKS:
                assert_same(plain, results[f"{kind}|{margin_name}|{chunk}"], f"rank {rank} {kind}/{margin_name}/chunk={chunk}")
        for step in range(STEPS):  # every rank returns the same loss
            assert torch.equal(two_rank_results[0][f"{kind}|{margin_name}|3"]["losses"][step],
                               two_rank_results[1][f"{kind}|{margin_name}|3"]["losses"][step])
    if kind.startswith(("pm", "qapm")):  # the first step really left shard 1 without occupied slots
        occupied = two_rank_results[1][f"{kind}|arcface_st|3"]["occupied"]
        assert occupied[0] == 0 and occupied[-1] > 0


def test_filtering_and_margins_take_effect():
    """The cases differ from one another, so the equalities above compare distinct computations."""
    runs = {name: run_case("pm", name, 0) for name in MARGINS}
    signatures = {(round(r["losses"][1].item(), 9), round(r["grads"][1].abs().sum().item(), 9)) for r in runs.values()}
    assert len(signatures) == len(runs)


def test_chunked_matches_plain_in_float32_with_large_chunks():
    margin = CombinedMarginLoss(64, 1.0, 0.5, 0.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 32, generator=g)
    y = torch.randint(0, 500, (8,), generator=g).repeat_interleave(2)
    for make in (lambda c: PartialFC(margin, 32, 500, sample_rate=0.3, logits_chunk=c),
                 lambda c: PrototypeMemory(margin, 32, 500, memory_size=100, logits_chunk=c, memory_dtype="float16")):
        torch.manual_seed(0)
        plain = make(0)
        torch.manual_seed(0)
        chunked = make(37)
        for _ in range(3):
            xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
            la, lb = plain(xa, y), chunked(xb, y)
            la.backward()
            lb.backward()
            torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-4, atol=1e-6)


def test_config_keys_reach_the_heads():
    cfg = edict(embedding_size=8, num_classes=100, sample_rate=0.2, fp16=False)
    assert registry.build_head(dict(cfg, logits_chunk=64), CombinedMarginLoss(64, 1, 0.5, 0)).logits_chunk == 64
    head = registry.build_head(dict(cfg, head="qapm", logits_chunk=16, memory_dtype="bfloat16"), CombinedMarginLoss(64, 1, 0.5, 0))
    assert head.logits_chunk == 16 and head.memory.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="'logits_chunk'.*must be of type int"):
        registry.build_head(dict(cfg, logits_chunk="big"), CombinedMarginLoss(64, 1, 0.5, 0))
    with pytest.raises(ValueError, match="logits_chunk must be a non-negative integer"):
        PrototypeMemory(CombinedMarginLoss(64, 1, 0.5, 0), 8, 100, memory_size=10, logits_chunk=-1)
    with pytest.raises(ValueError, match="memory_dtype must be one of"):
        PrototypeMemory(CombinedMarginLoss(64, 1, 0.5, 0), 8, 100, memory_size=10, memory_dtype="float8")
