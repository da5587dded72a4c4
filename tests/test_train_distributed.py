"""Distributed training: 2 gloo ranks equal 1 process on the same global batch; resume across world sizes."""
import pytest
import torch

from dist_utils import run_distributed
from protomem_plugin.train.config import get_config
from protomem_plugin.train.resume import load_resume_state
from protomem_plugin.train.runtime import Runtime
from protomem_plugin.train.trainer import build_setup, train
from train_helpers import read_losses, write_config

CPU = torch.device("cpu")
# eviction is decided per shard: a memory holding every class keeps 2 ranks and 1 process comparable
HEADS = {"prototype_memory": dict(head="prototype_memory", memory_size=64),
         "partial_fc": dict(head="partial_fc", sample_rate=1.0),
         "pm_doppelganger_mining": dict(head="prototype_memory", memory_size=64, doppelganger_mining=True)}


def job(tmp_path, name, head, **kw):
    # BatchNorm statistics are per rank under DDP (no SyncBatchNorm on CPU): freeze them for exact parity;
    # float64 so that rounding differences of split batches do not grow over the steps
    options = dict(freeze_bn=True, compute_dtype="float64", max_steps=24, val_targets=[], **HEADS[head])
    return write_config(tmp_path / name, "job", **{**options, **kw})


def train_worker(rank, world_size, config_path, overrides):
    cfg = get_config(config_path)
    cfg.update(overrides)
    train(cfg, Runtime(rank, world_size, 0, CPU))


def resume_worker(rank, world_size, config_path, output, dump):
    cfg = get_config(config_path)
    cfg.update(output=output, resume=True)
    setup = build_setup(cfg, Runtime(rank, world_size, 0, CPU))
    load_resume_state(output, setup.runtime, setup.backbone, setup.head, setup.optimizer, setup.scheduler, setup.loader)
    torch.save(setup.head.state_dict(), f"{dump}/head_{rank}.pt")


def memory_contents(states):
    out = {}
    for state in states:
        for slot, c in enumerate(state["slot_class"].tolist()):
            if c >= 0:
                assert c not in out, f"class {c} stored twice"
                out[c] = (state["memory"][slot], int(state["slot_step"][slot]))
    return out


def assert_same_memory(a, b):
    assert set(a) == set(b) and a
    for c in a:
        torch.testing.assert_close(a[c][0], b[c][0], rtol=0, atol=0)
        assert a[c][1] == b[c][1]


@pytest.mark.parametrize("head", list(HEADS))
def test_two_ranks_train_like_one_process(tmp_path, tiny_rec, head):
    two = tmp_path / "two"
    cfg2 = job(tmp_path, "c2", head, rec=str(tiny_rec), batch_size=8, output=str(two))
    run_distributed(train_worker, 2, str(cfg2), {})
    one = tmp_path / "one"
    cfg1 = job(tmp_path, "c1", head, rec=str(tiny_rec), batch_size=16, output=str(one))
    train(get_config(cfg1), Runtime(0, 1, 0, CPU))
    losses_two, losses_one = read_losses(two), read_losses(one)
    assert len(losses_one) == 24 and sorted(losses_two) == sorted(losses_one)
    for step in losses_one:
        assert losses_two[step] == pytest.approx(losses_one[step], abs=1e-5), step
    w1 = torch.load(one / "model.pt", weights_only=True)
    w2 = torch.load(two / "model.pt", weights_only=True)
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-5)


def test_resume_two_ranks_on_one_and_one_on_two(tmp_path, tiny_rec):
    two = tmp_path / "two"
    cfg2 = job(tmp_path, "c2", "prototype_memory", rec=str(tiny_rec), batch_size=8, output=str(two), max_steps=10,
               save_every_steps=10)
    run_distributed(train_worker, 2, str(cfg2), {})
    saved = [torch.load(two / f"checkpoint_gpu_{r}.pt", weights_only=True)["state_dict_softmax_fc"] for r in range(2)]

    # 2 -> 1: the single memory holds exactly the union of the two shards
    cfg1 = job(tmp_path, "c1", "prototype_memory", rec=str(tiny_rec), batch_size=16, output=str(two), resume=True,
               max_steps=14, save_every_steps=2)
    cfg = get_config(cfg1)
    setup = build_setup(cfg, Runtime(0, 1, 0, CPU))
    state = load_resume_state(str(two), setup.runtime, setup.backbone, setup.head, setup.optimizer, setup.scheduler,
                              setup.loader)
    assert state["global_step"] == 10 and setup.loader.state_dict()["position"] == 10 % len(setup.loader)
    merged = setup.head.state_dict()
    assert_same_memory(memory_contents([merged]), memory_contents(saved))
    assert int(merged["step"]) == 10

    # and it trains on from there on one rank
    train(cfg, Runtime(0, 1, 0, CPU))
    losses = read_losses(two)
    assert max(losses) == 14 and all(losses[s] == losses[s] for s in range(11, 15))

    # 1 -> 2: each new shard takes the classes it owns
    single = torch.load(two / "checkpoint_gpu_0.pt", weights_only=True)
    assert single["protomem"]["world_size"] == 1
    for stale in two.glob("checkpoint_gpu_1.pt"):
        stale.unlink()
    dump = tmp_path / "dump"
    dump.mkdir()
    run_distributed(resume_worker, 2, str(cfg1), str(two), str(dump))
    shards = [torch.load(dump / f"head_{r}.pt", weights_only=True) for r in range(2)]
    assert_same_memory(memory_contents(shards), memory_contents([single["state_dict_softmax_fc"]]))
    for r, shard in enumerate(shards):
        stored = shard["slot_class"]
        assert torch.all(stored[stored >= 0] % 2 == r)


@pytest.mark.parametrize("network", ["vit_t_dp005_mask0", "mbf_large"])
def test_arcface_torch_networks_train_on_two_ranks(tmp_path, network):
    # vit_t_dp005_mask0 never uses its mask token (mask ratio 0): DDP must not wait for its gradient;
    # rec = "synthetic" is arcface_torch's speed-test data (no files)
    config = write_config(tmp_path, "job", network=network, image_size=112, rec="synthetic", num_image=64,
                          num_classes=200, batch_size=4, max_steps=2, val_targets=[], head="prototype_memory",
                          memory_size=64, deterministic=False)
    run_distributed(train_worker, 2, str(config), {"output": str(tmp_path / "out")})
    assert sorted(read_losses(tmp_path / "out")) == [1, 2]


def nan_batchnorm_worker(rank, world_size, config_path, bad_rank, bad_step):
    """Train with a BatchNorm buffer of ``bad_rank`` set to NaN by the forward of step ``bad_step``."""
    import protomem_plugin.train.trainer as trainer

    build = trainer.get_model

    def get_model_with_fault(*args, **kwargs):
        model = build(*args, **kwargs)
        calls = {"n": 0}

        def poison(module, inputs, output):
            if module.training:
                calls["n"] += 1
                if rank == bad_rank and calls["n"] == bad_step:
                    module.running_var.data.fill_(float("nan"))  # as a bad batch would leave it

        next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)).register_forward_hook(poison)
        return model

    trainer.get_model = get_model_with_fault  # fault injection in this worker process only
    train(get_config(config_path), Runtime(rank, world_size, 0, CPU))


def test_a_non_finite_batchnorm_buffer_on_one_rank_skips_the_step_on_every_rank(tmp_path, tiny_rec):
    out = tmp_path / "out"
    cfg = job(tmp_path, "c", "prototype_memory", rec=str(tiny_rec), batch_size=8, output=str(out), max_steps=6,
              freeze_bn=False, compute_dtype="float32", save_every_steps=6)
    # a rank that skipped alone would leave the other waiting in DDP's gradient all-reduce: bounded by the timeout
    run_distributed(nan_batchnorm_worker, 2, str(cfg), 1, 3, timeout_s=60)
    rows = [__import__("json").loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["skipped"] for r in rows] == [False, False, True, False, False, False]  # rank 0 skipped step 3 too
    states = [torch.load(out / f"checkpoint_gpu_{r}.pt", weights_only=True)["state_dict_backbone"] for r in range(2)]
    for key, value in states[0].items():
        if value.is_floating_point():
            assert torch.isfinite(states[1][key]).all(), key  # the bad forward's statistics were undone
            if "running" not in key:
                torch.testing.assert_close(value, states[1][key], rtol=0, atol=0)  # the ranks stayed in step
