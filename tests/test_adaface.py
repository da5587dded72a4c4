"""AdaFace margin loss (Kim, Jain, Liu, CVPR 2022) with every head.

The references are plain-PyTorch re-statements of the paper's equations written here: norms clipped
to [0.001, 100], batch mean and (population) standard deviation blended into running values
(EMA, t_alpha) *before* use, ``zhat = clip(h (|z| - mu) / (sigma + eps), -1, 1)``, target logit
``s (cos(clip(theta + g_angle, eps, pi - eps)) - g_add)`` with ``g_angle = -m zhat`` and
``g_add = m zhat + m``. Float64, tiny sizes.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from easydict import EasyDict as edict

from dist_utils import run_distributed
from protomem_plugin import registry
from protomem_plugin.heads import PartialFC, PrototypeMemory, QualityAwarePrototypeMemory
from protomem_plugin.losses import AdaFaceMarginLoss, CombinedMarginLoss, build_margin_loss
from protomem_plugin.train.config import ConfigError, get_config
from test_pm_reference import ReferenceMemory
from train_helpers import read_losses, write_config

EPS = 1e-3
STEPS, BATCH, DIM, CLASSES, SLOTS = 3, 8, 5, 12, 14


# ----------------------------------------------------------------------------- reference
class ReferenceAdaFace:
    """The paper's equations, written out; ``margin(cos, target)`` for one batch of raw embeddings ``x``."""

    def __init__(self, s=16.0, m=0.4, h=0.333, t_alpha=0.5):
        self.s, self.m, self.h, self.t_alpha = s, m, h, t_alpha
        self.mean, self.std = 20.0, 100.0
        self.zhats = []

    def for_batch(self, x):
        norms = torch.sqrt((x.detach() ** 2).sum(dim=1)).clamp(0.001, 100.0)
        batch_mean = norms.mean()
        batch_std = torch.sqrt(((norms - batch_mean) ** 2).mean())
        self.mean = self.t_alpha * batch_mean + (1 - self.t_alpha) * self.mean  # updated before use
        self.std = self.t_alpha * batch_std + (1 - self.t_alpha) * self.std
        zhat = torch.clamp(self.h * (norms - self.mean) / (self.std + EPS), -1.0, 1.0)
        self.zhats.append(zhat)

        def margin(cos, target):
            onehot = torch.zeros_like(cos, dtype=torch.bool)
            rows = (target >= 0).nonzero().squeeze(1)
            onehot[rows, target[rows]] = True
            cos_y = (cos * onehot).sum(dim=1)
            theta = torch.acos(torch.clamp(cos_y, -1 + EPS, 1 - EPS))
            target_logit = torch.cos(torch.clamp(theta - self.m * zhat, EPS, math.pi - EPS)) - (self.m * zhat + self.m)
            return self.s * torch.where(onehot, target_logit.unsqueeze(1), cos)

        return margin


def adaface(**kw):
    return AdaFaceMarginLoss(**{"s": 16.0, "t_alpha": 0.5, **kw})


def spread_batches(steps=STEPS, batch=BATCH, dim=DIM, classes=CLASSES, seed=5):
    """Identity pairs with norms spread from about 0.5 to 40 (the margin differs row to row)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        labels = torch.randperm(classes, generator=g)[: batch // 2].repeat_interleave(2)
        scale = torch.exp(torch.randn(batch, 1, generator=g, dtype=torch.float64) * 1.2) * 3
        out.append((torch.randn(batch, dim, generator=g, dtype=torch.float64) * scale, labels))
    return out


def fixed_centres(head):
    full = torch.randn(CLASSES, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        head.weight.copy_(full[head.class_start : head.class_start + head.num_local])
    return head


def make_head(kind, margin, chunk=0, **kw):
    torch.manual_seed(0)
    if kind == "pfc":
        return fixed_centres(PartialFC(margin, DIM, CLASSES, sample_rate=1.0, logits_chunk=chunk, **kw).double())
    if kind == "pfc_sampled":
        return PartialFC(margin, DIM, CLASSES, sample_rate=0.6, logits_chunk=chunk, **kw).double()
    if kind == "qapm":
        return QualityAwarePrototypeMemory(margin, DIM, CLASSES, memory_size=SLOTS, logits_chunk=chunk, **kw).double()
    return PrototypeMemory(margin, DIM, CLASSES, memory_size=SLOTS, logits_chunk=chunk, **kw).double()


def statistics(head):
    return torch.stack([head.margin_loss.batch_mean, head.margin_loss.batch_std])


def run_steps(head, batches, rank=0, world_size=1):
    """Losses, input gradients, parameter gradients and AdaFace statistics of every step."""
    local = BATCH // world_size
    out = {"losses": [], "grads": [], "param_grads": [], "stats": []}
    for x, y in batches:
        xl = x[rank * local : (rank + 1) * local].clone().requires_grad_(True)
        loss = head(xl, y[rank * local : (rank + 1) * local])
        loss.backward()
        out["losses"].append(loss.detach())
        out["grads"].append(xl.grad)
        for p in head.parameters():
            out["param_grads"].append(p.grad.clone())
            p.grad = None
        if isinstance(head.margin_loss, AdaFaceMarginLoss):
            out["stats"].append(statistics(head).clone())
    out["state"] = {k: v for k, v in head.state_dict().items() if isinstance(v, torch.Tensor)}
    return out


def assert_runs_equal(a, b, what, rtol=1e-9):
    for key in ("losses", "grads", "param_grads"):
        assert len(a[key]) == len(b[key])
        for step, (u, v) in enumerate(zip(a[key], b[key])):
            torch.testing.assert_close(v, u, rtol=rtol, atol=1e-12, msg=lambda m: f"{what} {key} {step}: {m}")
    for step, (u, v) in enumerate(zip(a["stats"], b["stats"])):
        assert torch.equal(u, v), f"{what}: statistics of step {step} differ"


# ----------------------------------------------------------------------------- the equations
def test_running_statistics_by_hand_over_two_steps():
    margin = AdaFaceMarginLoss().double()  # paper defaults: s 64, m 0.4, h 0.333, t_alpha 0.01
    assert (margin.batch_mean.item(), margin.batch_std.item()) == (20.0, 100.0)
    cos = torch.tensor([[0.5, 0.1], [0.2, -0.3], [0.9, 0.4]], dtype=torch.float64)
    labels = torch.tensor([0, -1, 1])

    margin(cos, labels, norms=torch.tensor([10.0, 20.0, 30.0], dtype=torch.float64))
    mean1, std1 = 0.01 * 20.0 + 0.99 * 20.0, 0.01 * math.sqrt(200.0 / 3.0) + 0.99 * 100.0
    assert margin.batch_mean.item() == pytest.approx(mean1, rel=1e-14)
    assert margin.batch_std.item() == pytest.approx(std1, rel=1e-14)

    # clipped to [0.001, 100]: mean 50.0005, population std 49.9995
    out = margin(cos[:2], labels[:2], norms=torch.tensor([0.0001, 200.0], dtype=torch.float64))
    mean2, std2 = 0.01 * 50.0005 + 0.99 * mean1, 0.01 * 49.9995 + 0.99 * std1
    assert margin.batch_mean.item() == pytest.approx(mean2, rel=1e-14)
    assert margin.batch_std.item() == pytest.approx(std2, rel=1e-14)
    # the step used the statistics it had just updated
    zhat = max(-1.0, min(1.0, 0.333 * (0.001 - mean2) / (std2 + EPS)))
    expected = 64 * (math.cos(math.acos(0.5) - 0.4 * zhat) - (0.4 * zhat + 0.4))
    assert out[0, 0].item() == pytest.approx(expected, rel=1e-12)
    assert out[0, 1].item() == pytest.approx(64 * 0.1) and out[1].tolist() == pytest.approx([64 * 0.2, -64 * 0.3])

    margin.eval()  # evaluation: the running values are used, not updated
    margin(cos, labels, norms=torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    assert margin.batch_mean.item() == pytest.approx(mean2, rel=1e-14)


@pytest.mark.parametrize("chunk", [0, 2])
def test_a_head_updates_the_statistics_once_per_step(chunk):
    head = make_head("pfc", AdaFaceMarginLoss(s=16.0, t_alpha=0.01), chunk)
    directions = F.normalize(torch.randn(3, DIM, dtype=torch.float64), dim=1)
    for norms in ([10.0, 20.0, 30.0], [0.0001, 200.0, 50.0005]):
        x = directions * torch.tensor(norms, dtype=torch.float64).unsqueeze(1)
        head(x.requires_grad_(True), torch.tensor([0, 5, 7])).backward()
    mean1, std1 = 20.0, 0.01 * math.sqrt(200.0 / 3.0) + 0.99 * 100.0
    clipped = torch.tensor([0.001, 100.0, 50.0005], dtype=torch.float64)
    mean2 = 0.01 * clipped.mean().item() + 0.99 * mean1
    std2 = 0.01 * clipped.std(unbiased=False).item() + 0.99 * std1
    torch.testing.assert_close(statistics(head), torch.tensor([mean2, std2], dtype=torch.float64), rtol=1e-14, atol=0)
    assert head.diagnostics()["adaface_norm_mean"] == pytest.approx(mean2)


def test_gradcheck_of_the_margin_in_float64():
    template = AdaFaceMarginLoss(s=4.0, h=1.0, t_alpha=0.5).double()
    g = torch.Generator().manual_seed(1)
    cos = (torch.rand(6, 4, generator=g, dtype=torch.float64) * 1.8 - 0.9).requires_grad_(True)
    labels = torch.tensor([0, 3, -1, 2, 1, 0])
    norms = torch.tensor([0.5, 3.0, 8.0, 20.0, 40.0, 150.0], dtype=torch.float64)

    def f(c):  # the same start state every call: the statistics move by one step
        return copy.deepcopy(template)(c, labels, norms=norms)

    assert torch.autograd.gradcheck(f, (cos,), eps=1e-6, atol=1e-7)


def normed_with_norms(u, norms):
    """Embeddings of direction ``u`` and the given norms: the finite differences leave the norms (and so
    the statistics and ``zhat``, which carry no gradient by definition) unchanged."""
    return F.normalize(u, dim=1) * norms.unsqueeze(1)


@pytest.mark.parametrize("kind", ["pfc", "pm"])
@pytest.mark.parametrize("chunk", [0, 3])
def test_gradcheck_of_the_heads_in_float64(kind, chunk):
    template = make_head(kind, adaface(s=4.0, h=1.0), chunk)
    x, y = spread_batches(steps=1, batch=6)[0]
    norms = x.norm(dim=1)
    u = x.clone().requires_grad_(True)
    if kind == "pm":
        def f(u):
            return copy.deepcopy(template)(normed_with_norms(u, norms), y)
        inputs = (u,)
    else:
        def f(u, w):
            return torch.func.functional_call(copy.deepcopy(template), {"weight": w}, (normed_with_norms(u, norms), y))
        inputs = (u, template.weight.detach().clone().requires_grad_(True))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- against the re-statement
def test_partial_fc_equals_the_restatement():
    head = make_head("pfc", adaface(h=1.0))
    reference = ReferenceAdaFace(h=1.0)
    w = head.weight.detach().clone().requires_grad_(True)
    for x, y in spread_batches(steps=4):
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        loss = head(xa, y)
        loss.backward()
        margin = reference.for_batch(xb)
        cos = (F.normalize(xb, dim=1) @ F.normalize(w, dim=1).t()).clamp(-1, 1)
        expected = F.cross_entropy(margin(cos, y), y)
        expected.backward()
        torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(head.weight.grad, w.grad, rtol=1e-9, atol=1e-12)
        head.weight.grad, w.grad = None, None
        torch.testing.assert_close(statistics(head), torch.stack([reference.mean, reference.std]), rtol=1e-13, atol=0)
    zhats = torch.cat(reference.zhats)
    assert (zhats.abs() == 1).any() and (zhats.abs() < 1).any(), "both clipped and free zhat occur"


@pytest.mark.parametrize("chunk", [0, 3])
def test_prototype_memory_equals_the_restatement(chunk):
    head = make_head("pm", adaface(h=1.0), chunk)
    reference, memory = ReferenceAdaFace(h=1.0), ReferenceMemory(SLOTS, DIM)
    for x, y in spread_batches(steps=5):
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        loss = head(xa, y)
        loss.backward()
        expected = memory.loss(xb, y, reference.for_batch(xb), prototype_grad=True)
        expected.backward()
        torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(statistics(head), torch.stack([reference.mean, reference.std]), rtol=1e-13, atol=0)


# ----------------------------------------------------------------------------- chunked, ranks, state
@pytest.mark.parametrize("kind", ["pfc", "pfc_sampled", "pm", "qapm"])
def test_chunked_equals_plain(kind):
    batches = spread_batches(steps=4)
    plain = run_steps(make_head(kind, adaface()), batches)
    chunked = run_steps(make_head(kind, adaface(), chunk=3), batches)
    assert_runs_equal(plain, chunked, f"{kind} chunk=3")
    for key, value in plain["state"].items():
        assert torch.equal(chunked["state"][key], value), key


DIST_KINDS = ("pfc", "pm", "qapm")


def worker(rank, world_size, out_dir):
    torch.set_num_threads(1)
    results = {}
    for kind in DIST_KINDS:
        for chunk in (0, 3):
            head = make_head(kind, adaface(), chunk)
            results[f"{kind}|{chunk}"] = run_steps(head, spread_batches(), rank, world_size)
            results[f"{kind}|{chunk}"]["diag"] = head.diagnostics()
    torch.save(results, f"{out_dir}/rank{rank}.pt")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("adaface_two_ranks")
    run_distributed(worker, 2, str(out), timeout_s=120)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.parametrize("kind", DIST_KINDS)
def test_two_ranks_equal_one_process(kind, two_ranks):
    for chunk in (0, 3):
        single = run_steps(make_head(kind, adaface(), chunk), spread_batches())
        ranks = [r[f"{kind}|{chunk}"] for r in two_ranks]
        for step in range(STEPS):
            for r in range(2):
                torch.testing.assert_close(ranks[r]["losses"][step], single["losses"][step], rtol=1e-12, atol=1e-12)
                assert torch.equal(ranks[r]["stats"][step], single["stats"][step]), (chunk, r, step)
            merged = torch.cat([ranks[0]["grads"][step], ranks[1]["grads"][step]]) / 2  # DDP averages
            torch.testing.assert_close(merged, single["grads"][step], rtol=1e-9, atol=1e-12)
            if kind == "pfc":  # each rank's centres get their rows of the one-process gradient
                torch.testing.assert_close(torch.cat([ranks[0]["param_grads"][step], ranks[1]["param_grads"][step]]),
                                           single["param_grads"][step], rtol=1e-9, atol=1e-12)
        assert ranks[0]["diag"]["adaface_norm_std"] == ranks[1]["diag"]["adaface_norm_std"]


@pytest.mark.parametrize("kind", ["pfc", "qapm"])
def test_resharding_two_ranks_into_one_keeps_the_statistics(kind, two_ranks):
    head = make_head(kind, adaface())
    states = [r[f"{kind}|0"]["state"] for r in two_ranks]
    head.load_state_dict(head.merge_shard_states(states))  # strict: every key present
    assert torch.equal(statistics(head), two_ranks[0][f"{kind}|0"]["stats"][-1])
    assert not torch.equal(statistics(head), torch.tensor([20.0, 100.0], dtype=torch.float64))


@pytest.mark.parametrize("kind", ["pfc", "pm"])
def test_state_dict_round_trip_continues_identically(kind, tmp_path):
    batches = spread_batches(steps=4)
    head = make_head(kind, adaface())
    run_steps(head, batches[:2])
    torch.save(head.state_dict(), tmp_path / "head.pt")
    assert {"margin_loss.batch_mean", "margin_loss.batch_std"} <= set(head.state_dict())
    loaded = make_head(kind, adaface())
    loaded.load_state_dict(torch.load(tmp_path / "head.pt", weights_only=True))
    assert torch.equal(statistics(loaded), statistics(head))
    assert_runs_equal(run_steps(head, batches[2:]), run_steps(loaded, batches[2:]), kind, rtol=0)


# ----------------------------------------------------------------------------- the interface
def cosface(logits, labels):
    """An arcface_torch-style margin: exactly two arguments, no ``needs_norms``."""
    onehot = torch.zeros_like(logits)
    rows = (labels >= 0).nonzero().squeeze(1)
    onehot[rows, labels[rows]] = 1.0
    return 16.0 * (logits - 0.3 * onehot)


@pytest.mark.parametrize("kind", ["pfc", "pfc_sampled", "pm", "qapm"])
def test_an_arcface_style_callable_still_works_with_every_head(kind):
    for chunk in (0, 3):
        ours = run_steps(make_head(kind, CombinedMarginLoss(16.0, 1.0, 0.0, 0.3), chunk), spread_batches())
        losses = run_steps(make_head(kind, cosface, chunk), spread_batches())
        for a, b in zip(ours["losses"] + ours["grads"], losses["losses"] + losses["grads"]):
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


class RecordingMargin:
    """A stateless margin that wants the norms but has no ``begin_batch``: gets ``norms=`` on every call."""

    needs_norms = True

    def __init__(self):
        self.seen = []

    def __call__(self, logits, labels, norms):
        self.seen.append(norms)
        return cosface(logits, labels)


@pytest.mark.parametrize("kind", ["pfc", "pm", "qapm"])
@pytest.mark.parametrize("chunk", [0, 3])
def test_a_margin_that_needs_norms_gets_those_of_its_rows(kind, chunk):
    margin = RecordingMargin()
    head = make_head(kind, margin, chunk)
    x, y = spread_batches(steps=1)[0]
    head(x.clone().requires_grad_(True), y).backward()
    assert len(margin.seen) >= (2 if chunk else 1)  # the chunked path calls it per chunk and in the backward
    for norms in margin.seen:
        torch.testing.assert_close(norms, x.norm(dim=1), rtol=1e-15, atol=0)
        assert not norms.requires_grad


# ----------------------------------------------------------------------------- config and registry
def test_a_config_selects_the_margin(tmp_path):
    cfg = get_config(write_config(tmp_path / "a", "job", rec="x", margin="adaface", adaface_m=0.5,
                                  adaface_t_alpha=0.1, margin_scale=32.0))
    margin = build_margin_loss(cfg)
    assert isinstance(margin, AdaFaceMarginLoss)
    assert (margin.s, margin.m, margin.h, margin.t_alpha) == (32.0, 0.5, 0.333, 0.1)
    head = registry.build_head(dict(cfg, head="prototype_memory", memory_size=40), margin)
    assert head.margin_loss is margin and "margin_loss.batch_std" in head.state_dict()
    for extra in ({}, {"margin": "combined"}, {"margin": None}):
        cfg = get_config(write_config(tmp_path / "b", "job", rec="x", margin_list=(1.0, 0.5, 0.0), **extra))
        margin = build_margin_loss(cfg)
        assert isinstance(margin, CombinedMarginLoss)
        assert (margin.s, margin.m1, margin.m2, margin.m3) == (16.0, 1.0, 0.5, 0.0)


@pytest.mark.parametrize("override, message", [
    (dict(margin="adaface2"), r"unknown margin 'adaface2' in config key 'margin'; valid choices: adaface, combined"),
    (dict(margin="adaface", adaface_m=-0.1), r"config key 'adaface_m' must be >= 0"),
    (dict(margin="adaface", adaface_h=0.0), r"config key 'adaface_h' must be > 0"),
    (dict(margin="adaface", adaface_t_alpha=0.0), r"config key 'adaface_t_alpha' must be in \(0, 1\]"),
    (dict(margin="adaface", adaface_t_alpha=1.5), r"config key 'adaface_t_alpha' must be in \(0, 1\]"),
    (dict(margin="adaface", adaface_h="big"), r"config key 'adaface_h' of margin 'adaface' must be of type float"),
    (dict(margin="adaface", margin_scale=-1.0), r"config key 'margin_scale' must be a positive number"),
    (dict(adaface_m=0.3), r"\['adaface_m'\] are options of other margins.*'combined'"),
    (dict(adaface_alpha=0.3), r"unknown config key 'adaface_alpha'.*did you mean 'adaface_t_alpha'"),
    (dict(margin_list=(1.0, 0.5)), r"config key 'margin_list' must hold 3 numbers"),
])
def test_bad_margin_configs_name_the_key(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        get_config(write_config(tmp_path, "job", rec="x", **override))


def test_a_registered_margin_is_selected_by_the_config(tmp_path, monkeypatch):
    monkeypatch.setattr(registry._MARGINS, "classes", dict(registry._MARGINS.classes))

    @registry.register_margin("scaled_cosine")
    class ScaledCosine(torch.nn.Module):
        options = {"scaled_cosine_s": (float, 8.0, "scale")}

        def __init__(self, scaled_cosine_s=8.0):
            super().__init__()
            self.scale = scaled_cosine_s

        def forward(self, logits, labels):
            return logits * self.scale

    assert "scaled_cosine" in registry.available_margins()
    cfg = get_config(write_config(tmp_path, "job", rec="x", margin="scaled_cosine", scaled_cosine_s=4))
    margin = build_margin_loss(cfg)
    assert isinstance(margin, ScaledCosine) and margin.scale == 4.0
    head = registry.build_head(edict(cfg), margin)
    assert head.margin_loss is margin
    assert torch.isfinite(head(torch.randn(4, cfg.embedding_size), torch.tensor([0, 0, 7, 7])))


# ----------------------------------------------------------------------------- the recipe
def test_resume_through_the_recipe_restores_the_statistics(tmp_path, tiny_rec):
    from protomem_plugin.train.checkpoint import load_training_checkpoint
    from protomem_plugin.train.cli import main as train_main
    from protomem_plugin.train.runtime import Runtime
    from protomem_plugin.train.trainer import train

    options = dict(head="prototype_memory", memory_size=40, rec=str(tiny_rec), max_steps=3, val_targets=[],
                   margin="adaface", adaface_t_alpha=0.5, save_every_steps=2)
    assert train_main([str(write_config(tmp_path / "a", "job", output=str(tmp_path / "one"), **options))]) == 0
    staged = write_config(tmp_path / "b", "job", output=str(tmp_path / "two"), stop_at_step=2, **options)
    assert train_main([str(staged)]) == 0
    saved = load_training_checkpoint(tmp_path / "two" / "checkpoint_gpu_0.pt")
    assert saved["protomem"]["margin"] == "adaface"
    mean = saved["state_dict_softmax_fc"]["margin_loss.batch_mean"]
    assert abs(float(mean) - 20.0) > 1.0, "two steps moved the statistics"

    cfg = get_config(staged)
    cfg.update(resume=True, margin="combined", adaface_t_alpha=None)
    with pytest.raises(ConfigError, match="config key 'margin' = 'combined' but .* trained with 'adaface'"):
        train(cfg, Runtime(0, 1, 0, torch.device("cpu")))

    assert train_main([str(staged), "--set", "resume=True", "stop_at_step=None"]) == 0
    one, two = read_losses(tmp_path / "one"), read_losses(tmp_path / "two")
    assert sorted(two) == sorted(one) == [1, 2, 3]
    assert two[3] == pytest.approx(one[3], abs=1e-6)
    final = [load_training_checkpoint(tmp_path / d / "checkpoint_gpu_0.pt")["state_dict_softmax_fc"] for d in ("one", "two")]
    for key in ("margin_loss.batch_mean", "margin_loss.batch_std"):
        torch.testing.assert_close(final[1][key], final[0][key], rtol=1e-6, atol=0)
