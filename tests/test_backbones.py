"""Backbones: arcface_torch names/shapes, output shapes, strict reloads, mixed precision."""
import importlib

import pytest
import torch
from torch import nn

from protomem_plugin.backbones import BACKBONE_NAMES, IResNet, get_model

# Blocks per stage, from the public IResNet description (arcface_torch).
STAGES = {
    "r18": (2, 2, 2, 2),
    "r34": (3, 4, 6, 3),
    "r50": (3, 4, 14, 3),
    "r100": (3, 13, 30, 3),
    "r200": (6, 26, 60, 6),
    "r2060": (3, 128, 896, 3),
}
WIDTHS = (64, 128, 256, 512)


def _bn(prefix, c):
    return [(f"{prefix}.weight", (c,)), (f"{prefix}.bias", (c,)), (f"{prefix}.running_mean", (c,)),
            (f"{prefix}.running_var", (c,)), (f"{prefix}.num_batches_tracked", ())]


def expected_iresnet_state(blocks, d=512):
    """(name, shape) of every state_dict entry, written out from the architecture rules."""
    out = [("conv1.weight", (64, 3, 3, 3))] + _bn("bn1", 64) + [("prelu.weight", (64,))]
    cin = 64
    for s, (n, w) in enumerate(zip(blocks, WIDTHS), start=1):
        for b in range(n):
            p = f"layer{s}.{b}"
            c = cin if b == 0 else w
            out += _bn(f"{p}.bn1", c) + [(f"{p}.conv1.weight", (w, c, 3, 3))] + _bn(f"{p}.bn2", w)
            out += [(f"{p}.prelu.weight", (w,)), (f"{p}.conv2.weight", (w, w, 3, 3))] + _bn(f"{p}.bn3", w)
            if b == 0:  # every stage starts with stride 2, so its first block has a projection
                out += [(f"{p}.downsample.0.weight", (w, c, 1, 1))] + _bn(f"{p}.downsample.1", w)
        cin = w
    out += _bn("bn2", 512) + [("fc.weight", (d, 512 * 7 * 7)), ("fc.bias", (d,))] + _bn("features", d)
    return out


def closed_form_iresnet_params(blocks, d=512):
    """Trainable+frozen parameter count in closed form (BN: 2c, PReLU: c, conv: k*k*cin*cout)."""
    total = 27 * 64 + 2 * 64 + 64
    cin = 64
    for n, w in zip(blocks, WIDTHS):
        first = 2 * cin + 9 * cin * w + 2 * w + w + 9 * w * w + 2 * w + cin * w + 2 * w
        rest = 2 * w + 9 * w * w + 2 * w + w + 9 * w * w + 2 * w
        total += first + (n - 1) * rest
        cin = w
    return total + 2 * 512 + 512 * 49 * d + d + 2 * d


def _meta_model(name, **kw):
    with torch.device("meta"):
        return get_model(name, **kw)


def _signature(model):
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def test_r50_state_dict_names_and_shapes_match_arcface_layout():
    assert _signature(_meta_model("r50")) == expected_iresnet_state(STAGES["r50"])


def test_r50_with_other_embedding_size():
    assert _signature(_meta_model("r50", num_features=256)) == expected_iresnet_state(STAGES["r50"], 256)


@pytest.mark.parametrize("name", ["r18", "r34", "r100", "r200"])
def test_iresnet_parameter_and_key_counts(name):
    model = _meta_model(name)
    n_blocks = sum(STAGES[name])
    assert sum(p.numel() for p in model.parameters()) == closed_form_iresnet_params(STAGES[name])
    # stem 7 entries, 18 per block, 6 per projection (one per stage), tail 12
    assert len(model.state_dict()) == 7 + 18 * n_blocks + 6 * 4 + 12


def test_r100_has_about_65m_parameters():
    # arcface_torch's published r100 has ~65.2M parameters
    n = sum(p.numel() for p in _meta_model("r100").parameters())
    assert 65.0e6 < n < 65.3e6


@pytest.mark.parametrize("name", ["r18", "tiny"])
def test_features_weight_is_frozen_at_one(name):
    model = get_model(name)
    assert model.features.weight.requires_grad is False
    assert torch.equal(model.features.weight, torch.ones(512))
    assert all(p.requires_grad for k, p in model.named_parameters() if k != "features.weight")


def test_r18_output_shape_and_gradients():
    torch.manual_seed(0)
    model = get_model("r18", num_features=512)
    x = torch.randn(2, 3, 112, 112)
    y = model(x)
    assert y.shape == (2, 512) and y.dtype == torch.float32
    y.pow(2).mean().backward()
    assert model.features.weight.grad is None
    assert model.conv1.weight.grad is not None and model.conv1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("size", [112, 56, 32])
def test_tiny_output_shape(size):
    model = get_model("tiny")
    assert model(torch.randn(3, 3, size, size)).shape == (3, 512)
    assert get_model("tiny", num_features=64).eval()(torch.randn(1, 3, size, size)).shape == (1, 64)


def test_tiny_rejects_images_that_are_too_small():
    with pytest.raises(ValueError, match="H, W >= 16"):
        get_model("tiny")(torch.randn(1, 3, 8, 8))


def test_mbf_layout_and_output():
    model = get_model("mbf")
    sd = model.state_dict()
    # stem ConvBlock, grouped 3x3 ConvBlock (groups=64 on 128 channels), GDC head
    assert sd["layers.0.layers.0.weight"].shape == (128, 3, 3, 3)
    assert sd["layers.1.layers.0.weight"].shape == (128, 2, 3, 3)
    assert sd["layers.2.layers.1.layers.0.weight"].shape == (128, 1, 3, 3)
    assert sd["layers.4.layers.0.layers.0.weight"].shape == (256, 128, 1, 1)
    assert sd["layers.7.layers.1.layers.2.layers.0.weight"].shape == (256, 256, 1, 1)
    assert sd["conv_sep.layers.0.weight"].shape == (512, 256, 1, 1)
    assert sd["features.layers.0.layers.0.weight"].shape == (512, 1, 7, 7)
    assert sd["features.layers.2.weight"].shape == (512, 512)
    assert "features.layers.2.bias" not in sd
    # ConvBlock 3 params+2 buffers (BN 4+1, conv 1, PReLU 1) = 7 keys, LinearBlock 6, DepthWise 20
    n_depthwise = 3 + (4 + 6 + 2)
    assert len(sd) == 7 + 7 + 20 * n_depthwise + 7 + (6 + 1 + 5)
    assert model(torch.randn(2, 3, 112, 112)).shape == (2, 512)


@pytest.mark.parametrize("name", ["mbf", "mbf_large"])
def test_mbf_rejects_dropout(name):
    with pytest.raises(ValueError, match="no dropout"):
        get_model(name, dropout=0.2)


def _conv_block(cin, cout, k=1, groups=1):
    return k * k * cin // groups * cout + 3 * cout  # conv, BN weight+bias, PReLU


def _depthwise(cin, cout, g):
    return _conv_block(cin, g) + _conv_block(g, g, 3, g) + g * cout + 2 * cout


def closed_form_mbf_params(blocks, scale, d=512):
    """MobileFaceNet parameters from the layer rules: stem, second layer (grouped ConvBlock when
    blocks[0] == 1, else blocks[0] residual bottlenecks of width 128), strided and residual
    bottlenecks (groups 128, 128, 256, 256, 512, 256), conv_sep to 512, GDC head."""
    c1, c2 = 64 * scale, 128 * scale
    total = _conv_block(3, c1, 3)
    total += _conv_block(c1, c1, 3, 64) if blocks[0] == 1 else blocks[0] * _depthwise(c1, c1, 128)
    total += _depthwise(c1, c1, 128) + blocks[1] * _depthwise(c1, c1, 128)
    total += _depthwise(c1, c2, 256) + blocks[2] * _depthwise(c2, c2, 256)
    total += _depthwise(c2, c2, 512) + blocks[3] * _depthwise(c2, c2, 256)
    total += _conv_block(c2, 512)
    return total + (49 * 512 + 2 * 512) + 512 * d + 2 * d


@pytest.mark.parametrize("name,blocks,scale", [("mbf", (1, 4, 6, 2), 2), ("mbf_large", (2, 8, 12, 4), 4)])
def test_mbf_parameter_counts_in_closed_form(name, blocks, scale):
    model = _meta_model(name)
    assert sum(p.numel() for p in model.parameters()) == closed_form_mbf_params(blocks, scale)
    # ConvBlock 7 keys, DepthWise 20, GDC 12; the second layer is a ConvBlock or blocks[0] DepthWise
    second = 7 if blocks[0] == 1 else 20 * blocks[0]
    assert len(model.state_dict()) == 7 + second + 20 * (3 + sum(blocks[1:])) + 7 + 12


def test_mbf_large_layout_and_output():
    model = get_model("mbf_large")
    sd = model.state_dict()
    assert sd["layers.0.layers.0.weight"].shape == (256, 3, 3, 3)
    # second layer: two residual bottlenecks 256 -> 128 (1x1), depthwise 3x3, 128 -> 256 (1x1)
    assert sd["layers.1.layers.0.layers.0.layers.0.weight"].shape == (128, 256, 1, 1)
    assert sd["layers.1.layers.1.layers.1.layers.0.weight"].shape == (128, 1, 3, 3)
    assert sd["layers.1.layers.1.layers.2.layers.0.weight"].shape == (256, 128, 1, 1)
    assert "layers.1.layers.2.layers.0.layers.0.weight" not in sd
    assert sd["layers.2.layers.1.layers.0.weight"].shape == (128, 1, 3, 3)
    assert sd["layers.3.layers.7.layers.0.layers.0.weight"].shape == (128, 256, 1, 1)
    assert sd["layers.4.layers.0.layers.0.weight"].shape == (256, 256, 1, 1)
    assert sd["layers.4.layers.2.layers.0.weight"].shape == (512, 256, 1, 1)
    assert sd["layers.5.layers.11.layers.1.layers.0.weight"].shape == (256, 1, 3, 3)
    assert sd["layers.7.layers.3.layers.2.layers.0.weight"].shape == (512, 256, 1, 1)
    assert sd["conv_sep.layers.0.weight"].shape == (512, 512, 1, 1)
    assert model.eval()(torch.randn(2, 3, 112, 112)).shape == (2, 512)


@pytest.fixture(scope="module")
def r2060():
    return _meta_model("r2060")


def test_r2060_state_dict_and_parameter_count(r2060):
    assert _signature(r2060) == expected_iresnet_state(STAGES["r2060"])
    n = sum(p.numel() for p in r2060.parameters())
    assert n == closed_form_iresnet_params(STAGES["r2060"])
    assert 1.12e9 < n < 1.13e9


def _record_checkpoints(monkeypatch):
    iresnet_module = importlib.import_module("protomem_plugin.backbones.iresnet")  # the name is also a function
    calls = []

    def record(stage, segments, x, use_reentrant):
        calls.append((len(stage), segments))
        return stage[0](x)  # the first block alone gives the stage's output shape

    monkeypatch.setattr(iresnet_module, "checkpoint_sequential", record)
    return calls


def test_r2060_checkpoints_layer2_and_layer3_in_training(r2060, monkeypatch):
    calls = _record_checkpoints(monkeypatch)
    x = torch.randn(2, 3, 112, 112, device="meta", requires_grad=True)
    assert r2060.train()(x).shape == (2, 512)
    assert calls == [(128, 20), (896, 100)]


def test_iresnet_checkpoints_only_in_training_with_gradients(monkeypatch):
    calls = _record_checkpoints(monkeypatch)
    with torch.device("meta"):
        model = IResNet((1, 3, 4, 1), checkpoint_segments=(0, 2, 3, 0))
    x = torch.randn(2, 3, 112, 112, device="meta")
    model.train()(x)
    assert calls == [(3, 2), (4, 3)]
    calls.clear()
    with torch.no_grad():
        model(x)
    model.eval()(x)
    assert calls == []
    assert _meta_model("r50").checkpoint_segments == (0, 0, 0, 0)


def test_iresnet_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = IResNet((1, 2, 3, 1), num_features=32)
    checkpointed = IResNet((1, 2, 3, 1), num_features=32, checkpoint_segments=(0, 2, 2, 0))
    checkpointed.load_state_dict(plain.state_dict())
    calls = {"plain": 0, "checkpointed": 0}
    # pre-hooks: a recomputation may stop once it has what the backward pass needs
    plain.layer3[0].register_forward_pre_hook(lambda *_: calls.__setitem__("plain", calls["plain"] + 1))
    checkpointed.layer3[0].register_forward_pre_hook(
        lambda *_: calls.__setitem__("checkpointed", calls["checkpointed"] + 1))
    x = torch.randn(2, 3, 112, 112)
    outputs = [m.train()(x) for m in (plain, checkpointed)]
    torch.testing.assert_close(outputs[0], outputs[1])
    for out in outputs:
        out.pow(2).sum().backward()
    assert calls == {"plain": 1, "checkpointed": 2}  # recomputed in the backward pass
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        if a.grad is None:
            assert b.grad is None, name
        else:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        get_model("r42")
    for name in BACKBONE_NAMES:
        assert name in str(err.value)
    assert set(BACKBONE_NAMES) == {
        "r18", "r34", "r50", "r100", "r200", "r2060", "mbf", "mbf_large", "vit_t", "vit_t_dp005_mask0", "vit_s",
        "vit_s_dp005_mask_0", "vit_b", "vit_b_dp005_mask_005", "vit_l_dp005_mask_005", "vit_h", "tiny"}


def _randomise_bn_stats(model):
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


@pytest.mark.parametrize("name", ["r18", "mbf", "tiny"])
def test_saved_state_dict_loads_strictly_into_fresh_model(name, tmp_path):
    torch.manual_seed(0)
    src = get_model(name)
    _randomise_bn_stats(src)
    torch.save(src.state_dict(), tmp_path / "model.pt")
    torch.manual_seed(123)
    dst = get_model(name)
    result = dst.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        assert torch.equal(src.eval()(x), dst.eval()(x))


@pytest.mark.parametrize("name", ["r18", "tiny"])
def test_fp16_runs_trunk_in_low_precision_and_head_in_fp32(name):
    torch.manual_seed(0)
    mixed, full = get_model(name, fp16=True).eval(), get_model(name).eval()
    _randomise_bn_stats(mixed)
    full.load_state_dict(mixed.state_dict())
    seen = {}
    def record(module, inputs, output):
        seen["dtype"] = output.dtype

    mixed.bn2.register_forward_hook(record)
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        a, b = mixed(x), full(x)
    assert seen["dtype"] == torch.bfloat16  # CPU autocast
    assert a.dtype == torch.float32
    rel = (a - b).norm() / b.norm()
    assert 0 < rel < 0.05
