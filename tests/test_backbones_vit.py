"""ViT backbones: arcface_torch names, state_dict layout, parameter counts, training-mode behaviour."""
import contextlib

import pytest
import torch

from protomem_plugin.backbones import get_model
from protomem_plugin.backbones.precision import cuda_autocast
from protomem_plugin.backbones.vit import DropPath, VisionTransformer

# arcface_torch's ViT names: embed dim, depth, heads, drop-path rate, masked share in training,
# gradient checkpointing. The two "_mask_005" names are configured with 0.05 in arcface_torch, but
# its forward pass masks 10% of the tokens (its masking routine is called with the default share).
SPECS = {
    "vit_t": (256, 12, 8, 0.1, 0.1, False),
    "vit_t_dp005_mask0": (256, 12, 8, 0.05, 0.0, False),
    "vit_s": (512, 12, 8, 0.1, 0.1, False),
    "vit_s_dp005_mask_0": (512, 12, 8, 0.05, 0.0, False),
    "vit_b": (512, 24, 8, 0.1, 0.1, True),
    "vit_b_dp005_mask_005": (512, 24, 8, 0.05, 0.1, True),
    "vit_l_dp005_mask_005": (768, 24, 8, 0.05, 0.1, True),
    "vit_h": (1024, 48, 8, 0.1, 0.0, True),
}
TOKENS = (112 // 9) ** 2  # 9x9 patches, stride 9: a 12x12 grid


def _bn(prefix, c):
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
            f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}


def expected_vit_state(dim, depth, d=512):
    """name -> shape of every state_dict entry, from the architecture rules."""
    out = {"pos_embed": (1, TOKENS, dim), "mask_token": (1, 1, dim),
           "patch_embed.proj.weight": (dim, 3, 9, 9), "patch_embed.proj.bias": (dim,)}
    for i in range(depth):
        p = f"blocks.{i}"
        out.update({f"{p}.norm1.weight": (dim,), f"{p}.norm1.bias": (dim,),
                    f"{p}.attn.qkv.weight": (3 * dim, dim),  # no qkv bias
                    f"{p}.attn.proj.weight": (dim, dim), f"{p}.attn.proj.bias": (dim,),
                    f"{p}.norm2.weight": (dim,), f"{p}.norm2.bias": (dim,),
                    f"{p}.mlp.fc1.weight": (4 * dim, dim), f"{p}.mlp.fc1.bias": (4 * dim,),
                    f"{p}.mlp.fc2.weight": (dim, 4 * dim), f"{p}.mlp.fc2.bias": (dim,)})
    out.update({"norm.weight": (dim,), "norm.bias": (dim,), "feature.0.weight": (dim, TOKENS * dim),
                "feature.2.weight": (d, dim)})
    out.update(_bn("feature.1", dim))
    out.update(_bn("feature.3", d))
    return out


def closed_form_vit_params(dim, depth, d=512):
    """Per block 12 dim^2 + 10 dim (qkv 3 dim^2, proj dim^2 + dim, MLP 8 dim^2 + 5 dim, 2 LayerNorms);
    patch embedding 243 dim + dim, position embedding 144 dim, mask token dim, final norm 2 dim,
    head 144 dim^2 + 2 dim + dim d + 2 d."""
    return depth * (12 * dim * dim + 10 * dim) + 244 * dim + TOKENS * dim + dim + 2 * dim \
        + TOKENS * dim * dim + 2 * dim + dim * d + 2 * d


def _meta(name, **kw):
    with torch.device("meta"):
        return get_model(name, **kw)


@pytest.mark.parametrize("name", list(SPECS))
def test_vit_layout_parameters_and_hyperparameters(name):
    dim, depth, heads, drop_path, mask, ckpt = SPECS[name]
    model = _meta(name)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected_vit_state(dim, depth)
    assert sum(p.numel() for p in model.parameters()) == closed_form_vit_params(dim, depth)
    assert len(model.blocks) == depth and {b.attn.num_heads for b in model.blocks} == {heads}
    rates = [b.drop_path.p for b in model.blocks]
    assert rates == pytest.approx([drop_path * i / (depth - 1) for i in range(depth)], abs=1e-7)
    assert model.mask_ratio == mask and model.using_checkpoint is ckpt


def test_vit_parameter_counts_of_published_sizes():
    # vit_t ~19.1M, vit_s ~76.0M, vit_l ~256M, vit_h ~756M parameters
    counts = {n: sum(p.numel() for p in _meta(n).parameters()) for n in ("vit_t", "vit_s", "vit_l_dp005_mask_005", "vit_h")}
    assert counts == {"vit_t": 19_137_792, "vit_s": 76_023_296, "vit_l_dp005_mask_005": 255_684_352,
                      "vit_h": 756_393_984}


def test_vit_other_embedding_size_and_overrides():
    model = _meta("vit_s", num_features=128, using_checkpoint=True)
    assert model.feature[2].weight.shape == (128, 512) and model.using_checkpoint


def test_vit_rejects_dropout_accepts_fp16():
    with pytest.raises(ValueError, match="no dropout"):
        get_model("vit_t", dropout=0.1)
    assert isinstance(_meta("vit_t", fp16=True, dropout=0.0), VisionTransformer)


def test_vit_t_output_shape_and_strict_reload(tmp_path):
    torch.manual_seed(0)
    src = get_model("vit_t", num_features=128)
    with torch.no_grad():
        src.feature[1].running_var.uniform_(0.5, 1.5)
        src.feature[3].running_mean.uniform_(-0.1, 0.1)
    torch.save(src.state_dict(), tmp_path / "model.pt")
    torch.manual_seed(1)
    dst = get_model("vit_t", num_features=128)
    result = dst.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        out = src.eval()(x)
        assert out.shape == (2, 128) and out.dtype == torch.float32
        assert torch.equal(out, dst.eval()(x))


def test_vit_rejects_other_image_sizes():
    with pytest.raises(ValueError, match="112x112"):
        small_vit().eval()(torch.randn(1, 3, 96, 96))


def small_vit(**kw):
    torch.manual_seed(0)
    args = dict(embed_dim=32, depth=3, num_heads=4, num_features=16)
    return VisionTransformer(**{**args, **kw})


def _tokens(model, x):
    """The (B, tokens, dim) sequence the head sees."""
    return model.forward_features(x).reshape(x.shape[0], TOKENS, model.embed_dim)


def test_masking_replaces_a_random_share_of_tokens_by_the_mask_token_in_training_only():
    model = small_vit(mask_ratio=0.25)
    x = torch.randn(3, 3, 112, 112)
    with torch.no_grad():
        masked = (_tokens(model.train(), x) == model.mask_token).all(-1)
        # int(144 * 0.75) = 108 tokens kept, 36 masked, different ones per sample
        assert masked.sum(1).tolist() == [36, 36, 36]
        assert not torch.equal(masked[0], masked[1])
        assert not (_tokens(model.eval(), x) == model.mask_token).all(-1).any()
        torch.manual_seed(5)
        a = model.eval()(x)
        torch.manual_seed(6)
        assert torch.equal(a, model(x))


def test_masked_tokens_get_the_mask_token_gradient():
    model = small_vit(mask_ratio=0.5).train()
    probe = torch.randn(2, 16)  # (a plain sum after the training-mode BatchNorm has no gradient)
    (model(torch.randn(2, 3, 112, 112)) * probe).sum().backward()
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0
    unmasked = small_vit(mask_ratio=0.0).train()
    (unmasked(torch.randn(2, 3, 112, 112)) * probe).sum().backward()
    assert unmasked.mask_token.grad is None


def test_drop_path_zeroes_whole_samples_and_rescales_the_rest():
    x = torch.ones(4000, 3, 2)
    layer = DropPath(0.25).train()
    torch.manual_seed(0)
    out = layer(x)
    per_sample = out.flatten(1)
    assert ((per_sample == 0).all(1) | (per_sample == 1 / 0.75).all(1)).all()
    assert abs(float((per_sample[:, 0] == 0).float().mean()) - 0.25) < 0.03
    assert layer.eval()(x) is x
    state = torch.random.get_rng_state()
    assert DropPath(0.0).train()(x) is x
    assert torch.equal(state, torch.random.get_rng_state())  # a zero rate draws no random numbers


def test_vit_drop_path_is_stochastic_in_training_and_off_in_eval():
    model = small_vit(drop_path_rate=0.5)
    assert [b.drop_path.p for b in model.blocks] == pytest.approx([0.0, 0.25, 0.5])
    x = torch.randn(4, 3, 112, 112)
    with torch.no_grad():
        outs = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            model.train()
            model.feature.eval()  # the head's BatchNorms on running statistics: only drop path differs
            outs.append(model(x))
        assert not torch.allclose(outs[0], outs[1])
        model.eval()
        torch.manual_seed(0)
        a = model(x)
        torch.manual_seed(1)
        assert torch.equal(a, model(x))


def test_vit_checkpointing_gives_the_same_outputs_and_gradients():
    plain = small_vit(drop_path_rate=0.3, mask_ratio=0.2)
    checkpointed = small_vit(drop_path_rate=0.3, mask_ratio=0.2, using_checkpoint=True)
    checkpointed.load_state_dict(plain.state_dict())
    runs = {}
    for label, model in (("plain", plain), ("checkpointed", checkpointed)):
        calls = []
        handle = model.blocks[1].register_forward_pre_hook(lambda *_: calls.append(1))
        torch.manual_seed(3)  # same masks and drop-path decisions in both runs
        out = model.train()(torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(0)))
        out.pow(2).sum().backward()
        handle.remove()
        runs[label] = (out.detach(), len(calls))
    assert runs["plain"][1] == 1 and runs["checkpointed"][1] == 2  # recomputed in the backward pass
    torch.testing.assert_close(runs["plain"][0], runs["checkpointed"][0], rtol=0, atol=0)
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_cpu_stays_float32_even_with_fp16():
    model = get_model("vit_t", fp16=True, num_features=64).eval()
    dtypes = set()
    for block in model.blocks:
        for module in (block.attn.qkv, block.attn.proj, block.mlp.fc2):
            module.register_forward_hook(lambda m, i, o: dtypes.add(o.dtype))
    with torch.no_grad():
        assert model(torch.randn(1, 3, 112, 112)).dtype == torch.float32
    assert dtypes == {torch.float32}
    assert isinstance(cuda_autocast(torch.zeros(1), True), contextlib.nullcontext)
