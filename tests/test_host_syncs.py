"""Host-device synchronisations per step: the counter itself, and the budget of heads and trainer."""
import importlib
import sys

import pytest
import torch

from protomem_plugin.host_syncs import HostSyncCounter
from train_helpers import REPO


def bench():
    sys.path.insert(0, str(REPO / "tools" / "bench"))
    return importlib.import_module("host_syncs")


def test_counter_sees_each_kind_of_sync_and_nothing_else():
    x = torch.arange(6.0)
    original_tolist = torch.Tensor.tolist
    with HostSyncCounter() as syncs:
        y = (x * 2 + 1).sort().values.cumsum(0)   # fixed shapes: no sync
        torch.where(y > 3, y, 0.0).topk(2)
    assert syncs.total == 0
    with HostSyncCounter() as syncs:
        float(x.sum())            # _local_scalar_dense
        x[x > 2]                  # boolean-mask indexing
        torch.nonzero(x)
        torch.unique(x)
        x.tolist()
        torch.tensor([1, 2])      # host data copied to the device
        y = x.clone()
        y[y > 4] = x[:1]          # boolean-mask assignment
    assert syncs.counts == {
        "aten._local_scalar_dense": 1, "aten.index (bool mask)": 1, "aten.nonzero": 1, "aten._unique2": 1,
        "Tensor.tolist": 1, "torch.tensor (host data)": 1, "aten.index_put_ (bool mask)": 1,
    }
    assert torch.Tensor.tolist is original_tolist  # the wrapper is removed on exit


@pytest.mark.parametrize("name", [
    "pm", "pm chunked", "pm fp16 storage, fp16", "qapm norm", "qapm recognizability_soft", "qapm external",
    "qapm norm chunked",
])
def test_memory_heads_sync_at_most_twice_per_step_once_full(name):
    result = bench().head_syncs_per_step(name, steps=3)
    assert result["per_step"] <= 2, result["by_site"]


@pytest.mark.parametrize("head", ["prototype_memory", "partial_fc"])
def test_trainer_syncs_at_most_once_per_step_outside_logging(head):
    tool = bench()
    total = tool.trainer_syncs_per_step(head, short=3, long=7)
    alone = total["per_step"] - tool.head_syncs_per_step("pm" if head == "prototype_memory" else "partial_fc 1.0",
                                                          steps=2)["per_step"]
    assert alone <= 1, total["by_site"]
