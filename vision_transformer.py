# Copyright (c) Facebook, Inc. and its affiliates.
# Copyright 2026 the DINO for PyTorch authors
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Vision Transformer and DINO projection head.

Parameter names and shapes match the reference (facebookresearch/dino) so that
its released checkpoints load with strict=True.
"""
import contextlib
import math
import platform
import warnings
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils import trunc_normal_

# SDPA arrived in torch 2.0 and took `scale=` in 2.1; older torch (some Ascend stacks) use the explicit path.
_HAS_SDPA = hasattr(F, "scaled_dot_product_attention")


def drop_path(x, drop_prob: float = 0., training: bool = False):
    """Stochastic depth: drops the residual branch of whole samples."""
    if drop_prob == 0. or not training:
        return x
    return _drop_samples(x, 1 - drop_prob)


def _drop_samples(x, keep_prob):
    """x / keep_prob for the samples kept, 0 for those dropped (keep_prob: a float or a 0-dim tensor)."""
    return x.div(keep_prob) * _keep_mask(x, keep_prob)


def _keep_mask(x, keep_prob, dtype=None):
    """Drop path's 0/1 draw per sample of x, shaped to broadcast over it."""
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    return (keep_prob + torch.rand(shape, dtype=dtype or x.dtype, device=x.device)).floor_()


class DropPath(nn.Module):
    RATE_BUFFER = "keep_prob_tensor"  # the name utils.compile_repeated_blocks tells DDP not to broadcast

    def __init__(self, drop_prob=None):
        super().__init__()
        self.drop_prob = drop_prob

    @property
    def drop_prob(self):
        return self._drop_prob

    @drop_prob.setter
    def drop_prob(self, value):
        self._drop_prob = value
        if self.RATE_BUFFER in self._buffers:
            with torch.no_grad():
                self.keep_prob_tensor.fill_(1. - (value or 0.))

    def use_tensor_rate(self, device=None):
        """For torch.compile (utils.compile_repeated_blocks): keep the keep probability in a tensor too. A float rate
        is baked into each block's graph (one recompilation per block); as a buffer, all blocks share a graph. Not
        persistent, so checkpoints keep the reference's keys; eager models never get it."""
        if self.RATE_BUFFER not in self._buffers:
            self.register_buffer(self.RATE_BUFFER, torch.tensor(1. - (self.drop_prob or 0.), device=device),
                                 persistent=False)

    def forward(self, x):
        if self.training and self.RATE_BUFFER in self._buffers and _compiling():
            # a rate of 0 gives x / 1 * 1: the same x, so no branch on the rate here
            return _drop_samples(x, self.keep_prob_tensor)
        return drop_path(x, self.drop_prob, self.training)


def _compiling():
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(is_compiling and is_compiling())


def _linear_output_dtype(x):
    """The dtype a linear layer fed with x returns: autocast's when autocast is on for x's device."""
    device_type = x.device.type
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except (TypeError, AttributeError):  # torch < 2.4: per-device functions, CPU only needed here
        if device_type == "cpu" and torch.is_autocast_cpu_enabled():
            return torch.get_autocast_cpu_dtype()
    return x.dtype


def _find_onednn_linear():
    """oneDNN's matrix product with bias (the op torch's CPU compiler uses), or None where this torch or CPU
    lacks it. Only on x86: elsewhere torch's oneDNN may sit on other backends, not measured here."""
    if platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None


_onednn_linear = _find_onednn_linear()
_onednn_linear_checked = False


def _onednn_linear_works():
    """Whether the op exists and, checked once on a tiny product, takes these arguments and computes x W^T + b.
    A torch whose private op differs warns once and keeps nn.Linear's path."""
    global _onednn_linear, _onednn_linear_checked
    op = _onednn_linear
    if op is None or _onednn_linear_checked:
        return op is not None
    x = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    weight, bias = torch.arange(12, dtype=torch.float32).reshape(4, 3), torch.arange(4, dtype=torch.float32)
    try:
        works = torch.equal(op(x, weight, bias, "none", [], ""), torch.addmm(bias, x, weight.t()))
        problem = "other numbers than torch's"
    except (RuntimeError, TypeError) as err:
        works, problem = False, str(err).splitlines()[0] if str(err) else type(err).__name__
    if not works:
        _onednn_linear = None
        warnings.warn(f"oneDNN's linear kernel is unusable in this torch ({problem}); the linear layers use torch's")
    _onednn_linear_checked = True  # last: a thread that sees it set finds the op, or None, final
    return works


_fx_tracer = getattr(torch.fx, "_symbolic_trace", None)  # newer torch warns in is_fx_tracing, not here
_is_fx_tracing = (getattr(_fx_tracer, "is_fx_symbolic_tracing", None) or getattr(_fx_tracer, "is_fx_tracing", None)
                  or (lambda: False))


def _plain_eager():
    """No tracer, compiler, functorch transform or dispatch mode (FlopCounterMode, fake tensors) is watching:
    they know nn.Linear's ops, not oneDNN's private one."""
    if _compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return False
    transforms_active = getattr(torch._C, "_are_functorch_transforms_active", None)
    if transforms_active is not None and transforms_active():
        return False
    current_mode = getattr(torch.utils._python_dispatch, "_get_current_dispatch_mode", None)
    return current_mode is None or current_mode() is None


class _OneDnnLinearFunction(torch.autograd.Function):
    """x W^T + b by oneDNN, and x's gradient g W by oneDNN too; W's gradient g^T x stays torch's (MKL's), which is
    the faster there (BENCHMARKS.md)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        # what each gradient needs, as nn.Linear keeps: x for W's, W for x's
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight if ctx.needs_input_grad[0] else None)
        ctx.has_bias = bias is not None
        return _onednn_linear(x, weight, bias, "none", [], "")

    @staticmethod
    @torch.autograd.function.once_differentiable  # oneDNN's op has no derivative: a double backward must fail
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _onednn_linear(grad, weight.t(), None, "none", [], "")  # reads W transposed in place
        if ctx.needs_input_grad[1]:
            grad_weight = grad.t().mm(x)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum(0)
        return grad_x, grad_weight, grad_bias


class Linear(nn.Linear):
    """nn.Linear (the same parameters, names and maths) whose fp32 product on x86 CPUs, forward and input
    gradient, runs oneDNN's kernel instead of MKL's: 2-10 % off the fp32 CPU training step on Zen 4 (BENCHMARKS.md),
    results equal up to rounding order. Autocast, other devices and dtypes, non-contiguous inputs, tracing
    (`torch.jit.trace`, `torch.onnx.export`, fx), `torch.compile`, `torch.func` transforms and dispatch modes
    (FlopCounterMode) take nn.Linear's path, and so does every input with `onednn_on_cpu = False` (on the class
    or on one layer). Code that selects layers by exact type, such as `quantize_dynamic(model, {nn.Linear})`,
    must name this class too."""
    onednn_on_cpu = True

    def forward(self, x):
        if self._onednn_suits(x):
            out = _OneDnnLinearFunction.apply(x.reshape(-1, x.shape[-1]), self.weight, self.bias)
            return out.reshape(*x.shape[:-1], out.shape[-1])
        return F.linear(x, self.weight, self.bias)

    def _onednn_suits(self, x):
        # fx's proxies before any look at x; other devices leave after three checks (a GPU step is host-bound);
        # the compiler before any flag is read (no graph break); a wrong input width gets nn.Linear's error
        return (self.onednn_on_cpu and _onednn_linear is not None and not _is_fx_tracing()
                and x.device.type == "cpu" and x.dtype == torch.float32 and _plain_eager()
                and torch.backends.mkldnn.enabled and self.weight.dtype == torch.float32 and x.dim() >= 2
                and x.shape[-1] == self.in_features and x.numel() > 0 and x.is_contiguous()
                and _linear_output_dtype(x) == torch.float32 and _onednn_linear_works())


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU, drop=0.):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Attention(nn.Module):
    # CPUs' SDPA kernels in bf16/fp16 are slower than two matmuls and a softmax (1.7-6x in the forward and
    # backward of DINO's crops, BENCHMARKS.md), so there the explicit path runs, with the same maths; True: SDPA.
    sdpa_for_reduced_precision_on_cpu = False
    # q, k, v by one unbind: its backward stacks the three gradients in one write, where the reference's
    # qkv[0], qkv[1], qkv[2] zero-fill three qkv-sized tensors and add them up. False: the reference's form.
    unbind_qkv = True

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0., proj_drop=0.):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim ** -0.5
        self.qkv = Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        # Set to False to force the explicit softmax path (benchmarks, equivalence tests).
        self.use_sdpa = True

    @classmethod
    def sdpa_suits(cls, device_type, dtype):
        """Whether SDPA is the faster attention path for q of this device type and dtype."""
        return cls.sdpa_for_reduced_precision_on_cpu or not (device_type == "cpu" and dtype != torch.float32)

    def _sdpa_fits(self, q):
        return self.use_sdpa and _HAS_SDPA and self.sdpa_suits(q.device.type, q.dtype)

    def forward(self, x, return_attention=False, cls_only=False):
        """Returns (output, attention); attention is None unless asked for. With `cls_only`, only the class
        token attends (keys and values still come from every token) and the output has one token."""
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0) if self.unbind_qkv else (qkv[0], qkv[1], qkv[2])
        if cls_only:
            q = q[:, :, :1]
        if self._sdpa_fits(q) and not return_attention:
            drop = self.attn_drop.p if self.training else 0.
            try:
                out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, scale=self.scale)
            except TypeError:  # torch 2.0 has no `scale`: fold it into q
                default_scale = (C // self.num_heads) ** -0.5
                out = F.scaled_dot_product_attention(q * (self.scale / default_scale), k, v, dropout_p=drop)
            attn = None
        else:
            attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
            attn = self.attn_drop(attn)
            out = attn @ v
        out = out.transpose(1, 2).reshape(B, q.shape[2], C)
        return self.proj_drop(self.proj(out)), attn


class Block(nn.Module):
    # On CPUs, run each branch only for the samples drop path keeps (see _add_branch); False: the reference's
    # masked form (benchmarks).
    skip_dropped_samples = True

    def __init__(self, dim, num_heads, mlp_ratio=4., qkv_bias=False, qk_scale=None, drop=0., attn_drop=0.,
                 drop_path=0., act_layer=nn.GELU, norm_layer=nn.LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale,
                              attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=drop)

    def forward(self, x, return_attention=False, cls_only=False):
        """With `cls_only`, returns the class token alone: (B, 1, C)."""
        if return_attention:
            return self.attn(self.norm1(x), return_attention=True)[1]
        shortcut = x[:, :1] if cls_only else x
        x = self._add_branch(shortcut, x, lambda t: self.attn(self.norm1(t), cls_only=cls_only)[0])
        return self._add_branch(x, x, lambda t: self.mlp(self.norm2(t)))

    def _add_branch(self, shortcut, x, branch):
        """shortcut + drop_path(branch(x)).

        On CPUs the branch runs only for the samples drop path keeps: a dropped sample's branch output is
        multiplied by zero, and everything in a branch is computed per sample, so the kept samples get the
        same numbers (with drop path 0.1, about 5 % of the student's work is skipped). The keep draw comes
        before the branch instead of after it, the same draw when the branch itself draws nothing (no
        dropout). Accelerators keep the masked form: the kept count would wait for the device.
        """
        draw = self._draw_kept_samples(x)
        if draw is None:
            return shortcut + self.drop_path(branch(x))
        keep, kept, keep_prob = draw
        if kept.numel() == x.shape[0]:
            return shortcut + branch(x).div(keep_prob)
        if kept.numel() == 0:  # the masked form, so that the branch's parameters still get (zero) gradients
            return shortcut + branch(x).div(keep_prob) * keep
        return shortcut.index_add(0, kept, branch(x.index_select(0, kept)).div(keep_prob).to(shortcut.dtype))

    def _draw_kept_samples(self, x):
        """(drop path's 0/1 mask, indices of the kept samples, keep probability), or None for the masked form."""
        dp = self.drop_path
        # compiled: a graph cannot skip samples, and the rate must not be read (see DropPath)
        if not (self.skip_dropped_samples and isinstance(dp, DropPath) and dp.training and x.device.type == "cpu"
                and not _compiling() and dp.drop_prob > 0):
            return None
        if self.attn.attn_drop.p > 0 or self.attn.proj_drop.p > 0 or self.mlp.drop.p > 0:
            return None
        keep_prob = 1 - dp.drop_prob
        keep = _keep_mask(x, keep_prob, dtype=_linear_output_dtype(x))  # drop_path() draws in the branch's dtype
        return keep, keep.flatten().nonzero().squeeze(1), keep_prob


class PatchEmbed(nn.Module):
    """Image to patch embedding."""
    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768):
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.num_patches = (img_size // patch_size) * (img_size // patch_size)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    # forward() returns the class token only, so its last block needs keys and values of every token but its
    # attention output, projection and MLP for the class token alone: the same output with 1/16 fewer FLOPs
    # (ViT-S/16) and no zero gradients pushed back through the unused tokens. Set to False on a model to run the
    # last block in full, as the reference does (benchmarks, equivalence tests). A class attribute, so models
    # pickled whole by earlier versions get it too.
    last_block_cls_only = True

    def __init__(self, img_size=[224], patch_size=16, in_chans=3, num_classes=0, embed_dim=768, depth=12,
                 num_heads=12, mlp_ratio=4., qkv_bias=False, qk_scale=None, drop_rate=0., attn_drop_rate=0.,
                 drop_path_rate=0., norm_layer=nn.LayerNorm, **kwargs):
        super().__init__()
        self.num_features = self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(img_size=img_size[0], patch_size=patch_size, in_chans=in_chans,
                                      embed_dim=embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(p=drop_rate)

        rates = torch.linspace(0, drop_path_rate, depth).tolist()  # stochastic depth grows with depth
        self.blocks = nn.ModuleList([
            Block(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale,
                  drop=drop_rate, attn_drop=attn_drop_rate, drop_path=rates[i], norm_layer=norm_layer)
            for i in range(depth)])
        self.norm = norm_layer(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        trunc_normal_(self.pos_embed, std=.02)
        trunc_normal_(self.cls_token, std=.02)
        self.apply(self._init_weights)

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def set_fused_attention(self, enabled: bool):
        for blk in self.blocks:
            blk.attn.use_sdpa = enabled

    def interpolate_pos_encoding(self, x, w, h):
        npatch = x.shape[1] - 1
        N = self.pos_embed.shape[1] - 1
        if npatch == N and w == h:
            return self.pos_embed
        class_pos_embed = self.pos_embed[:, 0]
        patch_pos_embed = self.pos_embed[:, 1:]
        dim = x.shape[-1]
        w0 = w // self.patch_embed.patch_size
        h0 = h // self.patch_embed.patch_size
        # The reference adds 0.1 so that floor(scale * side) lands on the wanted size; kept for identical numbers.
        w0, h0 = w0 + 0.1, h0 + 0.1
        side = int(math.sqrt(N))
        patch_pos_embed = F.interpolate(
            patch_pos_embed.reshape(1, side, side, dim).permute(0, 3, 1, 2),
            scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)),
            mode='bicubic',
        )
        assert int(w0) == patch_pos_embed.shape[-2] and int(h0) == patch_pos_embed.shape[-1]
        patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)

    def prepare_tokens(self, x):
        B, nc, w, h = x.shape
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(x, w, h)
        return self.pos_drop(x)

    def forward(self, x):
        x = self.prepare_tokens(x)
        last = len(self.blocks) - 1
        for i, blk in enumerate(self.blocks):
            x = blk(x, cls_only=self.last_block_cls_only and i == last)
        x = self.norm(x)
        return x[:, 0]

    def get_last_selfattention(self, x):
        x = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            x = blk(x)
        return self.blocks[-1](x, return_attention=True)

    def get_intermediate_layers(self, x, n=1):
        """Normalised output tokens of the `n` last blocks."""
        x = self.prepare_tokens(x)
        output = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if len(self.blocks) - i <= n:
                output.append(self.norm(x))
        return output


def vit_tiny(patch_size=16, **kwargs):
    return VisionTransformer(patch_size=patch_size, embed_dim=192, depth=12, num_heads=3, mlp_ratio=4,
                             qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)


def vit_small(patch_size=16, **kwargs):
    return VisionTransformer(patch_size=patch_size, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4,
                             qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)


def vit_base(patch_size=16, **kwargs):
    return VisionTransformer(patch_size=patch_size, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4,
                             qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)


def _autocast_off(device_type):
    # Ascend's older torch has no torch.autocast (apex O1 casts instead), or none for its device type
    try:
        return torch.autocast(device_type=device_type, enabled=False)
    except (AttributeError, RuntimeError, ValueError):
        return contextlib.nullcontext()


class _WeightNormLinearFunction(torch.autograd.Function):
    """(x v^T) * (g / ||v||)^T with a hand-written backward.

    Autograd's backward of the row norm makes three passes over the (out, in) weight, each into a new
    tensor (65536 x 256 floats in DINO's head); here its term is added into the matmul's gradient in place.
    Same maths, gradients equal to rounding. Dtypes follow autocast as F.linear's own backward would.
    """

    @staticmethod
    def forward(ctx, x, weight_v, weight_g):
        norm = weight_v.norm(dim=1, keepdim=True)
        # v in the matmul's dtype (autocast's cast, made here), kept for the backward as F.linear's own backward
        # keeps it, instead of casting the (out, in) weight a second time there
        v_matmul = weight_v.to(_linear_output_dtype(x))
        raw = F.linear(x, v_matmul)
        ctx.save_for_backward(x, weight_v, weight_g, norm, raw, v_matmul)
        return raw * (weight_g / norm).t().to(raw.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight_v, weight_g, norm, raw, v_matmul = ctx.saved_tensors
        need_x, need_v, need_g = ctx.needs_input_grad
        grad_x = grad_v = grad_g = None
        dtype = grad_out.dtype
        with _autocast_off(grad_out.device.type):
            scale = weight_g / norm
            grad_raw = grad_out * scale.t().to(dtype)
            if need_x:
                grad_x = (grad_raw @ v_matmul.to(dtype)).to(x.dtype)
            if need_v or need_g:
                grad_scale = (grad_out * raw).sum(0).to(norm.dtype).unsqueeze(1)
            if need_g:
                grad_g = (grad_scale / norm).to(weight_g.dtype)
            if need_v:
                grad_v = (grad_raw.t() @ x.to(dtype)).to(weight_v.dtype)
                # d(g / ||v||)/dv = -g v / ||v||^3; rows of zero norm get no such term, as in torch's norm backward
                norm_term = (-grad_scale * weight_g / norm.pow(3)).masked_fill(norm == 0, 0)
                grad_v.addcmul_(weight_v, norm_term.to(grad_v.dtype))
        return grad_x, grad_v, grad_g


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight = g * v / ||v|| (row norm).

    Same parameters (`weight_g` of shape (out, 1), `weight_v`) and maths as
    torch.nn.utils.weight_norm(nn.Linear(..., bias=False)), which is deprecated
    in recent torch and whose parametrised replacement renames the keys that
    released DINO checkpoints use.
    """
    # False: autograd differentiates the same forward (the plain form, for comparison)
    fused_backward = True

    def __init__(self, in_features, out_features):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        bound = 1 / math.sqrt(in_features)  # nn.Linear's default init
        nn.init.uniform_(self.weight_v, -bound, bound)

    @property
    def weight(self):
        return self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))

    def forward(self, x):
        # (x v^T) * (g / ||v||)^T: same maths without building the (out, in) weight
        if self.fused_backward and torch.is_grad_enabled() and (
                x.requires_grad or self.weight_v.requires_grad or self.weight_g.requires_grad):
            return _WeightNormLinearFunction.apply(x, self.weight_v, self.weight_g)
        out = F.linear(x, self.weight_v)
        return out * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True)).t().to(out.dtype)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias=False"


class DINOHead(nn.Module):
    def __init__(self, in_dim, out_dim, use_bn=False, norm_last_layer=True, nlayers=3, hidden_dim=2048,
                 bottleneck_dim=256):
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers = [nn.Linear(in_dim, hidden_dim)]
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            for _ in range(nlayers - 2):
                layers.append(nn.Linear(hidden_dim, hidden_dim))
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        self.last_layer.weight_g.data.fill_(1)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)

    def forward(self, x):
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)
