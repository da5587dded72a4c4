"""2-process gloo runs equal 1 process fed the same global batch, for every head."""
import pytest
import torch

from dist_utils import run_distributed
from protomem_plugin.heads import PartialFC, PrototypeMemory, QualityAwarePrototypeMemory
from protomem_plugin.losses import CombinedMarginLoss

# eviction is decided per shard, so the memory is large enough that no class is evicted
STEPS, BATCH, DIM, CLASSES, SLOTS = 6, 8, 5, 12, 14


def make_head(kind):
    margin = CombinedMarginLoss(16.0, 1.0, 0.0, 0.3)
    torch.manual_seed(0)
    if kind == "partial_fc":  # centres from one fixed matrix, split as arcface_torch splits them
        head = PartialFC(margin, DIM, CLASSES, sample_rate=1.0).double()
        full = torch.randn(CLASSES, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
        with torch.no_grad():
            head.weight.copy_(full[head.class_start : head.class_start + head.num_local])
        return head
    if kind == "pm":
        return PrototypeMemory(margin, DIM, CLASSES, memory_size=SLOTS).double()
    if kind == "qapm_norm":
        return QualityAwarePrototypeMemory(margin, DIM, CLASSES, memory_size=SLOTS, quality_source="norm").double()
    return QualityAwarePrototypeMemory(
        margin, DIM, CLASSES, memory_size=SLOTS, quality_source="recognizability_soft", ui_fraction=0.25
    ).double()


def global_batches():
    g = torch.Generator().manual_seed(5)
    out = []
    for _ in range(STEPS):
        classes = torch.randperm(CLASSES, generator=g)[: BATCH // 2]
        out.append((torch.randn(BATCH, DIM, generator=g, dtype=torch.float64) * 2, classes.repeat_interleave(2)))
    return out




KINDS = ["partial_fc", "pm", "qapm_norm", "qapm_soft"]


def worker(rank, world_size, out_dir):
    for kind in KINDS:
        run_kind(rank, world_size, kind, out_dir)


def run_kind(rank, world_size, kind, out_dir):
    head = make_head(kind)
    losses, grads = [], []
    local = BATCH // world_size
    for x, y in global_batches():
        xl = x[rank * local : (rank + 1) * local].clone().requires_grad_(True)
        loss = head(xl, y[rank * local : (rank + 1) * local])
        loss.backward()
        losses.append(loss.detach())
        grads.append(xl.grad)
    diag = head.diagnostics()
    torch.save({"losses": losses, "grads": grads, "state": head.state_dict(), "diag": diag}, f"{out_dir}/{kind}_rank{rank}.pt")


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("two_ranks")
    run_distributed(worker, 2, str(out))
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_two_ranks_equal_one(kind, two_rank_results):
    head = make_head(kind)
    single_losses, single_grads = [], []
    for x, y in global_batches():
        x = x.clone().requires_grad_(True)
        loss = head(x, y)
        loss.backward()
        single_losses.append(loss.detach())
        single_grads.append(x.grad)
    ranks = [torch.load(two_rank_results / f"{kind}_rank{r}.pt", weights_only=True) for r in range(2)]
    for step in range(STEPS):
        for r in range(2):
            torch.testing.assert_close(ranks[r]["losses"][step], single_losses[step], rtol=1e-12, atol=1e-12)
        # every rank's gradient is world_size x the exact one (DDP averages it back)
        merged = torch.cat([ranks[0]["grads"][step], ranks[1]["grads"][step]]) / 2
        torch.testing.assert_close(merged, single_grads[step], rtol=1e-9, atol=1e-12)
    assert ranks[0]["diag"] == ranks[1]["diag"], "diagnostics are reduced over ranks"
    if kind == "partial_fc":
        torch.testing.assert_close(torch.cat([ranks[0]["state"]["weight"], ranks[1]["state"]["weight"]]), head.weight.detach())
        return
    assert ranks[0]["diag"]["memory_fill"] == pytest.approx(head.diagnostics()["memory_fill"])
    # union of the shards' memories equals the single memory (class -> prototype, write step)
    def contents(states):
        out = {}
        for s in states:
            for slot, c in enumerate(s["slot_class"].tolist()):
                if c >= 0:
                    assert c not in out, "a class is stored twice"
                    out[c] = (s["memory"][slot], int(s["slot_step"][slot]))
        return out

    union = contents([r["state"] for r in ranks])
    single = contents([head.state_dict()])
    assert set(union) == set(single)
    for c in single:
        torch.testing.assert_close(union[c][0], single[c][0], rtol=0, atol=1e-12)
        assert union[c][1] == single[c][1]
    for r, s in enumerate(ranks):
        stored = s["state"]["slot_class"]
        assert torch.all(stored[stored >= 0] % 2 == r), "each class lives on its owner shard"
