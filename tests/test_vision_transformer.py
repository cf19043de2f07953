"""The ViT and DINO head keep the reference's parameters and numbers."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import vision_transformer as vits


def reference_keys(depth, dim, patch, n_pos, in_chans=3, mlp_ratio=4):
    """Parameter names and shapes of the reference's ViT (fused qkv)."""
    keys = {
        "cls_token": (1, 1, dim), "pos_embed": (1, n_pos, dim),
        "patch_embed.proj.weight": (dim, in_chans, patch, patch), "patch_embed.proj.bias": (dim,),
        "norm.weight": (dim,), "norm.bias": (dim,),
    }
    hidden = dim * mlp_ratio
    for i in range(depth):
        b = f"blocks.{i}."
        keys.update({
            b + "norm1.weight": (dim,), b + "norm1.bias": (dim,),
            b + "attn.qkv.weight": (3 * dim, dim), b + "attn.qkv.bias": (3 * dim,),
            b + "attn.proj.weight": (dim, dim), b + "attn.proj.bias": (dim,),
            b + "norm2.weight": (dim,), b + "norm2.bias": (dim,),
            b + "mlp.fc1.weight": (hidden, dim), b + "mlp.fc1.bias": (hidden,),
            b + "mlp.fc2.weight": (dim, hidden), b + "mlp.fc2.bias": (dim,),
        })
    return keys


def test_vit_small_parameters_match_the_reference():
    model = vits.vit_small(patch_size=16)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == reference_keys(depth=12, dim=384, patch=16, n_pos=197)
    model8 = vits.vit_base(patch_size=8)
    got8 = {k: tuple(v.shape) for k, v in model8.state_dict().items()}
    assert got8 == reference_keys(depth=12, dim=768, patch=8, n_pos=785)


def test_dino_head_parameters_match_the_reference():
    head = vits.DINOHead(384, 65536)
    got = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert got == {
        "mlp.0.weight": (2048, 384), "mlp.0.bias": (2048,),
        "mlp.2.weight": (2048, 2048), "mlp.2.bias": (2048,),
        "mlp.4.weight": (256, 2048), "mlp.4.bias": (256,),
        "last_layer.weight_g": (65536, 1), "last_layer.weight_v": (65536, 256),
    }
    assert not head.last_layer.weight_g.requires_grad  # norm_last_layer=True freezes g
    assert vits.DINOHead(384, 10, norm_last_layer=False).last_layer.weight_g.requires_grad


def test_released_checkpoint_layout_loads_strictly():
    """A state dict laid out like dino_deitsmall16_pretrain.pth (backbone only) loads with strict=True."""
    torch.manual_seed(0)
    released = {k: torch.randn(shape) for k, shape in reference_keys(12, 384, 16, 197).items()}
    model = vits.vit_small(patch_size=16)
    model.load_state_dict(released, strict=True)
    assert torch.equal(model.blocks[3].attn.qkv.weight, released["blocks.3.attn.qkv.weight"])


# the reference's (deprecated) layer, compared on purpose
@pytest.mark.filterwarnings("ignore:.*weight_norm. is deprecated:FutureWarning")
def test_weight_norm_linear_equals_torch_weight_norm():
    torch.manual_seed(0)
    ours = vits.WeightNormLinear(16, 32)
    theirs = nn.utils.weight_norm(nn.Linear(16, 32, bias=False))
    with torch.no_grad():
        ours.weight_g.copy_(torch.rand(32, 1) + 0.5)
        theirs.weight_g.copy_(ours.weight_g)
        theirs.weight_v.copy_(ours.weight_v)
    x = torch.randn(5, 16)
    assert torch.allclose(ours(x), theirs(x), atol=1e-6)
    ours(x).square().sum().backward()
    theirs(x).square().sum().backward()
    assert torch.allclose(ours.weight_v.grad, theirs.weight_v.grad, atol=1e-5)
    assert torch.allclose(ours.weight_g.grad, theirs.weight_g.grad, atol=1e-5)


# ---- a plain re-implementation of the reference's forward, from the module's own weights ----

def naive_attention(blk, x):
    B, N, C = x.shape
    h = blk.attn.num_heads
    qkv = F.linear(x, blk.attn.qkv.weight, blk.attn.qkv.bias).reshape(B, N, 3, h, C // h).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = torch.softmax((q @ k.transpose(-2, -1)) * (C // h) ** -0.5, dim=-1)
    out = (attn @ v).transpose(1, 2).reshape(B, N, C)
    return F.linear(out, blk.attn.proj.weight, blk.attn.proj.bias), attn


def naive_block(blk, x):
    y, attn = naive_attention(blk, F.layer_norm(x, x.shape[-1:], blk.norm1.weight, blk.norm1.bias, eps=1e-6))
    x = x + y
    z = F.layer_norm(x, x.shape[-1:], blk.norm2.weight, blk.norm2.bias, eps=1e-6)
    z = F.linear(F.gelu(F.linear(z, blk.mlp.fc1.weight, blk.mlp.fc1.bias)), blk.mlp.fc2.weight, blk.mlp.fc2.bias)
    return x + z, attn


def naive_tokens(model, img):
    B, _, w, h = img.shape
    p = model.patch_embed.patch_size
    x = F.conv2d(img, model.patch_embed.proj.weight, model.patch_embed.proj.bias, stride=p).flatten(2).transpose(1, 2)
    x = torch.cat([model.cls_token.expand(B, -1, -1), x], dim=1)
    pos = model.pos_embed
    N = pos.shape[1] - 1
    if x.shape[1] - 1 != N or w != h:
        side = int(math.sqrt(N))
        w0, h0 = w // p + 0.1, h // p + 0.1  # the reference's offset
        grid = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)), mode="bicubic")
        pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, pos.shape[-1])], dim=1)
    return x + pos


def naive_forward(model, img):
    x = naive_tokens(model, img)
    outs, attn = [], None
    for blk in model.blocks:
        x, attn = naive_block(blk, x)
        outs.append(F.layer_norm(x, x.shape[-1:], model.norm.weight, model.norm.bias, eps=1e-6))
    return outs, attn


@pytest.mark.parametrize("size", [(224, 224), (96, 96), (64, 112)])
def test_forward_matches_the_reference_maths(size):
    torch.manual_seed(0)
    model = vits.vit_tiny(patch_size=16).eval()
    with torch.no_grad():
        model.pos_embed.normal_(0, 0.5)  # make the interpolation matter
        img = torch.randn(2, 3, *size)
        outs, attn = naive_forward(model, img)
        assert torch.allclose(model(img), outs[-1][:, 0], atol=1e-4)
        assert torch.allclose(model.get_last_selfattention(img), attn, atol=1e-4)
        inter = model.get_intermediate_layers(img, n=3)
        assert len(inter) == 3
        for ours, ref in zip(inter, outs[-3:]):
            assert torch.allclose(ours, ref, atol=1e-4)
        expected_tokens = 1 + (size[0] // 16) * (size[1] // 16)
        assert attn.shape == (2, 3, expected_tokens, expected_tokens)


def test_fused_attention_equals_explicit_softmax_path_with_gradients():
    torch.manual_seed(0)
    model = vits.vit_tiny(patch_size=16)
    img = torch.randn(3, 3, 64, 64)
    # not .sum(): the sum of a LayerNorm's outputs does not depend on its input, so every gradient below the
    # final norm would be rounding noise
    weights = torch.randn(3, 192)
    model.set_fused_attention(True)
    fused = model(img)
    (fused * weights).sum().backward()
    grads_fused = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_fused_attention(False)
    explicit = model(img)
    (explicit * weights).sum().backward()
    torch.testing.assert_close(fused, explicit, rtol=1e-5, atol=1e-5)
    for a, (name, p) in zip(grads_fused, model.named_parameters()):
        scale = p.grad.abs().max().item()  # rounding noise grows with the gradient's size
        assert (a - p.grad).abs().max().item() <= 1e-5 * scale + 1e-6, name


def test_drop_path_drops_whole_samples():
    torch.manual_seed(0)
    x = torch.ones(256, 5, 4)
    out = vits.drop_path(x, 0.5, training=True)
    per_sample = out.reshape(256, -1)
    kept = per_sample[:, 0] > 0
    # every sample is either dropped entirely or kept entirely and rescaled
    assert torch.all(per_sample[kept] == 2.0)
    assert torch.all(per_sample[~kept] == 0.0)
    assert 64 < kept.sum().item() < 192
    assert torch.equal(vits.drop_path(x, 0.5, training=False), x)


def test_drop_path_rates_grow_with_depth():
    model = vits.vit_small(drop_path_rate=0.1)
    rates = [blk.drop_path.drop_prob if isinstance(blk.drop_path, vits.DropPath) else 0.0 for blk in model.blocks]
    assert rates[0] == 0.0 and abs(rates[-1] - 0.1) < 1e-7
    assert rates == sorted(rates)
