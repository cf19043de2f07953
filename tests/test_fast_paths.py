"""The fast paths compute what the reference's slow paths compute (fp32, within rounding)."""
import copy
import json
import os
import platform
import random

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter
from torchvision import transforms

import benchmark
import main_dino
import utils
import vision_transformer as vits
from helpers import run_py

PHOTOS = ("astronaut", "coffee", "chelsea")


def load_photos(photos_dir):
    return [main_dino.load_rgb(os.path.join(photos_dir, f"{name}.jpg")) for name in PHOTOS]


def mean_abs_diff_levels(a, b):
    """Mean absolute difference of two 8-bit RGB images, in grey levels (1 level = 1/255)."""
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).mean())


@pytest.fixture
def one_thread():
    """Tiny tensors: one torch thread is fastest, and is not stalled by other busy processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_vit():
    torch.manual_seed(0)
    return vits.vit_tiny(patch_size=8)


def output_and_gradients(model, x):
    """The model's output on x, and the gradients of a fixed weighted sum of it."""
    model.zero_grad(set_to_none=True)
    out = model(x)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same_output_and_gradients(a, b):
    torch.testing.assert_close(b[0], a[0], rtol=1e-4, atol=1e-5)
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        # fp32 rounding of a sum scales with the sum's largest terms: an element near zero in a gradient of
        # magnitude 100 may be off by 1e-5 (the class token's, seen with AVX2 kernels)
        atol = 1e-5 * max(1.0, a[1][name].abs().max().item())
        torch.testing.assert_close(b[1][name], a[1][name], rtol=1e-3, atol=atol, msg=name)


def test_sdpa_attention_matches_explicit_softmax_forward_and_gradients(one_thread):
    model = tiny_vit()
    x = torch.randn(3, 3, 32, 32)
    results = []
    for fused in (False, True):
        model.set_fused_attention(fused)
        results.append(output_and_gradients(model, x))
    assert_same_output_and_gradients(*results)
    # the explicit path is the one that exposes attention maps
    assert model.get_last_selfattention(x).shape == (3, 3, 17, 17)


def test_qkv_unbind_gives_the_reference_indexing_output_and_gradients_exactly(one_thread):
    """q, k, v by unbind (one stacked gradient) against the reference's qkv[0], qkv[1], qkv[2]: the same numbers."""
    model = tiny_vit()
    x = torch.randn(3, 3, 32, 32)
    results = []
    for unbind in (False, True):
        for blk in model.blocks:
            blk.attn.unbind_qkv = unbind
        results.append(output_and_gradients(model, x))
    assert torch.equal(results[1][0], results[0][0])
    for name, grad in results[0][1].items():
        assert torch.equal(results[1][1][name], grad), name


def test_attention_on_cpu_uses_sdpa_in_fp32_and_the_explicit_path_in_bf16(one_thread, monkeypatch):
    """CPUs' reduced-precision SDPA kernels are slower than the explicit path, so bf16 autocast takes the explicit
    path there (the same maths: as close to the fp32 outputs and gradients as SDPA in bf16 is); fp32 keeps SDPA."""
    model = tiny_vit()
    x = torch.randn(3, 3, 32, 32)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    calls = []
    monkeypatch.setattr(vits.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))

    def run(amp, sdpa_in_bf16):
        monkeypatch.setattr(vits.Attention, "sdpa_for_reduced_precision_on_cpu", sdpa_in_bf16)
        calls.clear()
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = model(x)
        (out.float() * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        return len(calls), out.detach().float(), {n: p.grad.clone() for n, p in model.named_parameters()}

    fp32_calls, out_fp32, grads_fp32 = run(amp=False, sdpa_in_bf16=False)
    explicit_calls, out_explicit, grads_explicit = run(amp=True, sdpa_in_bf16=False)
    sdpa_calls, out_sdpa, grads_sdpa = run(amp=True, sdpa_in_bf16=True)
    assert fp32_calls == sdpa_calls == len(model.blocks) and explicit_calls == 0

    def error(a, b):
        return float((a - b).abs().max())
    for name, expected, explicit, fused in [("output", out_fp32, out_explicit, out_sdpa)] + [
            (n, grads_fp32[n], grads_explicit[n], grads_sdpa[n]) for n in grads_fp32]:
        bound = max(2 * error(fused, expected), 0.01 * float(expected.abs().max()))
        assert error(explicit, expected) <= bound, name


def _linear_outputs_and_grads(layer, x):
    x = x.detach().clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    out = layer(x)
    out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
    return [out.detach(), x.grad] + [p.grad for p in layer.parameters()]


@pytest.mark.skipif(vits._onednn_linear is None, reason="oneDNN's linear kernel: x86 CPUs with torch's oneDNN")
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(37, 48), (4, 37, 48)])
def test_onednn_linear_matches_nn_linear_in_fp32(one_thread, monkeypatch, bias, shape):
    """vits.Linear's fp32 CPU path (oneDNN's product for the output and the input gradient) gives nn.Linear's
    numbers to rounding, the same weight gradient to the bit, the same numbers on every run, and nn.Linear's
    parameters."""
    calls = []
    kernel = vits._onednn_linear
    monkeypatch.setattr(vits, "_onednn_linear", lambda *a: calls.append(1) or kernel(*a))
    monkeypatch.setattr(vits, "_onednn_linear_checked", True)  # count the layer's calls only
    torch.manual_seed(0)
    layer = vits.Linear(48, 96, bias=bias)
    plain = nn.Linear(48, 96, bias=bias)
    plain.load_state_dict(layer.state_dict())
    assert list(layer.state_dict()) == list(plain.state_dict())
    x = torch.randn(*shape)
    fast = _linear_outputs_and_grads(layer, x)
    assert len(calls) == 2  # the forward and the input gradient
    again = _linear_outputs_and_grads(layer, x)
    reference = _linear_outputs_and_grads(plain, x)
    for got, rerun, want in zip(fast, again, reference):
        assert torch.equal(got, rerun)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(fast[2], reference[2])  # the weight gradient is torch's product
    with torch.no_grad():  # the teacher's forward
        torch.testing.assert_close(layer(x), plain(x), rtol=1e-5, atol=1e-5)


def test_onednn_linear_is_used_only_where_it_suits(monkeypatch):
    """Autocast, other dtypes, non-contiguous inputs, the switch off, oneDNN disabled or missing: nn.Linear's path
    and its exact numbers; a kernel that fails warns once and leaves the rest of the run on nn.Linear's path."""
    calls = []
    monkeypatch.setattr(vits, "_onednn_linear", lambda *a: calls.append(1) or torch.ops.mkldnn._linear_pointwise(*a))
    monkeypatch.setattr(vits, "_onednn_linear_checked", True)
    torch.manual_seed(0)
    layer = vits.Linear(16, 8)
    x = torch.randn(5, 16)

    def plain_path(x):
        calls.clear()
        out = layer(x)
        return not calls and torch.equal(out, torch.nn.functional.linear(x, layer.weight, layer.bias))
    if platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available():
        assert not plain_path(x)  # fp32 on an x86 CPU: oneDNN
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert plain_path(x)
    assert plain_path(torch.randn(16, 5).t())  # non-contiguous
    with torch.backends.mkldnn.flags(enabled=False):
        assert plain_path(x)
    layer.onednn_on_cpu = False
    assert plain_path(x)
    layer.onednn_on_cpu = True
    monkeypatch.setattr(vits, "_onednn_linear", None)  # non-x86, or a torch without the op
    assert plain_path(x)

    def failing(*args):
        raise RuntimeError("mkldnn::_linear_pointwise() Expected 6 arguments\nmore")
    monkeypatch.setattr(vits, "_onednn_linear", failing)
    monkeypatch.setattr(vits, "_onednn_linear_checked", False)
    with pytest.warns(UserWarning, match="oneDNN's linear kernel is unusable in this torch .*Expected 6 arguments"):
        assert plain_path(x)
    assert vits._onednn_linear is None  # checked once: nn.Linear's path for the rest of the run
    monkeypatch.setattr(vits, "_onednn_linear", lambda *a: torch.zeros(2, 4))  # wrong numbers
    monkeypatch.setattr(vits, "_onednn_linear_checked", False)
    with pytest.warns(UserWarning, match="unusable in this torch \\(other numbers than torch's\\)"):
        assert plain_path(x)


@pytest.mark.skipif(vits._onednn_linear is None, reason="oneDNN's linear kernel: x86 CPUs with torch's oneDNN")
def test_onednn_linear_steps_aside_for_tracers_transforms_and_modes(monkeypatch):
    """What watches the ops (jit and fx tracing, torch.func, FlopCounterMode) sees nn.Linear's ops and counts
    nn.Linear's FLOPs; a double backward fails loudly instead of giving zero; the one-time check ignores the
    default dtype."""
    from torch.utils.flop_counter import FlopCounterMode
    calls = []
    kernel = vits._onednn_linear
    monkeypatch.setattr(vits, "_onednn_linear", lambda *a: calls.append(1) or kernel(*a))
    monkeypatch.setattr(vits, "_onednn_linear_checked", True)
    torch.manual_seed(0)
    mlp = vits.Mlp(16, 32)
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        traced = torch.jit.trace(mlp, x, check_trace=False)  # the check would rerun the eager module
    assert calls == [] and "aten::linear" in str(traced.inlined_graph) and "mkldnn" not in str(traced.inlined_graph)
    torch.testing.assert_close(traced(x), mlp(x), rtol=1e-5, atol=1e-6)
    graph_module = torch.fx.symbolic_trace(mlp)
    torch.testing.assert_close(graph_module(x), mlp.forward(x), rtol=1e-5, atol=1e-6)
    calls.clear()
    per_sample = torch.func.vmap(mlp)(x)
    assert calls == []
    torch.testing.assert_close(per_sample, mlp(x), rtol=1e-5, atol=1e-6)

    def counted_flops(model):
        counter = FlopCounterMode(display=False)
        inputs = x.clone().requires_grad_(True)
        with counter:
            model(inputs).sum().backward()
        return counter.get_total_flops()
    plain = copy.deepcopy(mlp)
    for layer in (plain.fc1, plain.fc2):
        layer.onednn_on_cpu = False
    calls.clear()
    assert counted_flops(mlp) == counted_flops(plain) > 0 and calls == []

    inputs = x.clone().requires_grad_(True)
    assert mlp(inputs) is not None and calls  # plain eager: oneDNN
    (grad,) = torch.autograd.grad(mlp.fc1(inputs).pow(2).sum(), inputs, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|differentiate twice"):
        grad.sum().backward()

    monkeypatch.setattr(vits, "_onednn_linear", kernel)
    monkeypatch.setattr(vits, "_onednn_linear_checked", False)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert vits._onednn_linear_works() and vits._onednn_linear is kernel
    finally:
        torch.set_default_dtype(default)


def test_onednn_linear_leaves_a_wrong_input_width_to_nn_linear(recwarn):
    """A user's shape error is nn.Linear's own error, and does not turn oneDNN off or warn."""
    layer = vits.Linear(16, 8)
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        layer(torch.randn(5, 12))
    assert not [w for w in recwarn if "oneDNN" in str(w.message)]
    assert vits._onednn_linear is vits._find_onednn_linear()


def test_vision_transformer_linear_layers_are_vits_linear_under_the_reference_names():
    model = vits.vit_tiny(patch_size=16)
    kinds = {name: type(m) for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert kinds and all(kind is vits.Linear for kind in kinds.values())
    assert {"blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"} <= set(kinds)
    assert "blocks.0.attn.qkv.weight" in model.state_dict()


@pytest.mark.parametrize("fused", [False, True])
def test_class_token_only_last_block_matches_full_last_block(one_thread, fused):
    """forward() returns the class token, so the last block runs its attention output, projection and MLP for
    that token alone: same output and gradients as the full block, the same drop-path draws (train mode)."""
    torch.manual_seed(0)
    model = vits.vit_tiny(patch_size=8, drop_path_rate=0.3)
    model.set_fused_attention(fused)
    for shape in ((3, 3, 32, 32), (4, 3, 16, 16)):  # both crop resolutions of a step
        x = torch.randn(*shape)
        results = []
        for cls_only in (False, True):
            model.last_block_cls_only = cls_only
            torch.manual_seed(1)
            results.append(output_and_gradients(model, x))
            results[-1] += (torch.rand(1),)  # the random stream goes on from the same place
        assert_same_output_and_gradients(*results)
        assert torch.equal(results[0][2], results[1][2])
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    last = model.blocks[-1]
    tokens = model.prepare_tokens(x)
    assert last(tokens, cls_only=True).shape == (2, 1, model.embed_dim)
    torch.testing.assert_close(last(tokens, cls_only=True), last(tokens)[:, :1], rtol=1e-4, atol=1e-5)
    # the per-token outputs keep the full last block
    assert model.get_intermediate_layers(x)[0].shape == (2, 17, model.embed_dim)
    torch.testing.assert_close(model.get_intermediate_layers(x)[0][:, 0], model(x), rtol=1e-4, atol=1e-5)


def reference_block_forward(block, x):
    """The reference's Block.forward: both branches computed for every sample, then masked by drop path."""
    x = x + block.drop_path(block.attn(block.norm1(x))[0])
    return x + block.drop_path(block.mlp(block.norm2(x)))


@pytest.mark.parametrize("amp", [False, True])
def test_drop_path_skipping_dropped_samples_matches_masked_branches(one_thread, amp):
    """On CPUs a block runs its branches only for the samples drop path keeps: same outputs, gradients and random
    stream as the reference's masked form, in fp32 and under bf16 autocast (where the draw is in bf16)."""
    torch.manual_seed(0)
    block = vits.vit_tiny(patch_size=8, drop_path_rate=1.0).blocks[-1].train()
    block.drop_path.drop_prob = 0.5
    weights = torch.randn(7, 17, 192)
    dropped_some = kept_some = False
    for seed in range(6):
        results = []
        for forward in (reference_block_forward, vits.Block.forward):
            x = torch.randn(7, 17, 192, generator=torch.Generator().manual_seed(seed), requires_grad=True)
            block.zero_grad(set_to_none=True)
            torch.manual_seed(seed)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                out = forward(block, x)
            (out.float() * weights).sum().backward()
            grads = {n: p.grad.clone() for n, p in block.named_parameters()}
            results.append((out.detach().float(), x.grad.clone(), grads, torch.rand(2)))
        (out_a, dx_a, grads_a, after_a), (out_b, dx_b, grads_b, after_b) = results
        assert torch.equal(after_a, after_b)  # the same number of draws, in the same order
        assert torch.equal(out_b, out_a)  # kept rows: the same ops; dropped rows: the shortcut itself
        tol = dict(rtol=2e-2, atol=2e-3) if amp else dict(rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(dx_b, dx_a, **tol)
        for name in grads_a:
            torch.testing.assert_close(grads_b[name], grads_a[name], **tol, msg=name)
        unchanged = (out_a - x.detach()).flatten(1).abs().amax(1) == 0  # samples whose two branches both dropped
        dropped_some |= bool(unchanged.any())
        kept_some |= bool((~unchanged).any())
    assert dropped_some and kept_some


def test_drop_path_with_every_sample_dropped_still_gives_the_branches_gradients(monkeypatch):
    """DistributedDataParallel expects a gradient for every parameter: a branch that drops all its samples runs
    in the masked form (zero gradients) rather than being left out of the graph."""
    torch.manual_seed(0)
    block = vits.vit_tiny(patch_size=8, drop_path_rate=1.0).blocks[-1].train()
    block.drop_path.drop_prob = 0.5
    monkeypatch.setattr(torch, "rand", lambda shape, **kw: torch.zeros(shape, **kw))  # keep 0.5 + 0 -> floor 0
    x = torch.randn(3, 17, 192)
    out = vits.Block.forward(block, x)
    assert torch.equal(out, x)
    out.sum().backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and not p.grad.any(), name


@pytest.mark.parametrize("amp", [False, True])
@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_weight_norm_head_backward_matches_autograd(one_thread, amp, norm_last_layer, monkeypatch):
    """The head's output layer with its hand-written backward against autograd on the same forward: outputs and
    gradients of the input, weight_v and (when trained) weight_g. (test_vision_transformer.py compares the layer
    with torch's own weight_norm.)"""
    torch.manual_seed(0)
    head = vits.DINOHead(24, 300, norm_last_layer=norm_last_layer, hidden_dim=40, bottleneck_dim=16)
    with torch.no_grad():
        head.last_layer.weight_g.uniform_(0.5, 1.5)
    x = torch.randn(9, 24)
    weights = torch.randn(9, 300)

    def run(fused):
        monkeypatch.setattr(vits.WeightNormLinear, "fused_backward", fused)
        head.zero_grad(set_to_none=True)
        inputs = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = head(inputs)
        (out.float() * weights).sum().backward()
        grads = {n: p.grad.clone() for n, p in head.named_parameters() if p.grad is not None}
        return out.detach().float(), inputs.grad.clone(), grads

    out_plain, dx_plain, grads_plain = run(False)
    out_fused, dx_fused, grads_fused = run(True)
    assert torch.equal(out_fused, out_plain)
    assert grads_fused.keys() == grads_plain.keys()
    assert ("last_layer.weight_g" in grads_fused) == (not norm_last_layer)
    tol = dict(rtol=2e-2, atol=1e-3) if amp else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx_fused, dx_plain, **tol)
    for name in grads_plain:
        torch.testing.assert_close(grads_fused[name], grads_plain[name], **tol, msg=name)


@pytest.mark.parametrize("fused", [False, True])
def test_weight_norm_head_casts_its_weight_once_per_step_under_autocast(fused, monkeypatch):
    """Under bf16 autocast, forward and backward of the head's output layer cast the (out, in) weight to bf16
    once, as autograd's plain layer does (its backward reuses the forward's cast)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    monkeypatch.setattr(vits.WeightNormLinear, "fused_backward", fused)
    layer = vits.WeightNormLinear(16, 300)
    x = torch.randn(5, 16, requires_grad=True)

    class WeightCasts(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if (isinstance(out, torch.Tensor) and out.dtype == torch.bfloat16 and tuple(out.shape) == (300, 16)
                    and isinstance(args[0], torch.Tensor) and args[0].dtype == torch.float32):
                WeightCasts.count += 1
            return out

    with WeightCasts():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
        out.float().sum().backward()
    assert WeightCasts.count == 1


def test_weight_norm_backward_ignores_an_autocast_region_around_it(monkeypatch):
    """backward() called inside autocast computes in the forward's dtypes (fp32 here), as autograd's own
    backward does; where torch.autocast is missing (Ascend's older torch) the backward runs without it."""
    torch.manual_seed(0)
    layer = vits.WeightNormLinear(16, 64)
    x = torch.randn(5, 16, requires_grad=True)
    weights = torch.randn(5, 64)
    autocast = torch.autocast

    def gradients(inside_autocast):
        layer.zero_grad(set_to_none=True)
        x.grad = None
        loss = (layer(x) * weights).sum()
        with autocast("cpu", dtype=torch.bfloat16, enabled=inside_autocast):
            loss.backward()
        return x.grad.clone(), layer.weight_v.grad.clone()

    outside = gradients(False)
    for ours, expected in zip(gradients(True), outside):
        torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-7)

    def no_autocast(*args, **kwargs):
        raise RuntimeError("autocast: unsupported device type")
    monkeypatch.setattr(vits.torch, "autocast", no_autocast)
    for ours, expected in zip(gradients(False), outside):
        assert torch.equal(ours, expected)


def test_weight_norm_head_without_gradients_uses_the_plain_forward(monkeypatch):
    """The teacher (no_grad) never builds the autograd Function's saved tensors."""
    layer = vits.WeightNormLinear(8, 12)
    calls = []
    monkeypatch.setattr(vits._WeightNormLinearFunction, "apply", lambda *a: calls.append(a))
    with torch.no_grad():
        out = layer(torch.randn(3, 8))
    assert out.shape == (3, 12) and not calls
    layer(torch.randn(3, 8))
    assert len(calls) == 1


def test_fused_teacher_ema_matches_parameter_loop():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(7, 5), nn.LayerNorm(5), nn.Linear(5, 3))
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(torch.randn_like(p))
    teacher_loop = copy.deepcopy(teacher)
    fused, loop = utils.TeacherEMA(student, teacher, fused=True), utils.TeacherEMA(student, teacher_loop,
                                                                                   fused=False)
    assert fused.fused and not loop.fused
    for m in (0.996, 0.9, 0.5):
        fused.update(m)
        loop.update(m)
    for a, b in zip(teacher.parameters(), teacher_loop.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not torch.equal(next(teacher.parameters()), next(student.parameters()))


def test_ema_and_clipping_fall_back_where_the_device_lacks_multi_tensor_kernels(monkeypatch):
    """A backend without _foreach_lerp_/_foreach_norm (older torch_npu) gets the loop, with the same result."""
    def missing(*args, **kwargs):
        raise NotImplementedError("Could not run '_foreach_x' with arguments from the 'PrivateUse1' backend")
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(7, 5), nn.Linear(5, 3))
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(1.0)
    teacher_loop = copy.deepcopy(teacher)
    expected = utils.TeacherEMA(student, teacher_loop, fused=False)
    ema = utils.TeacherEMA(student, teacher, fused=True)
    monkeypatch.setattr(torch, "_foreach_lerp_", missing)
    monkeypatch.setattr(torch, "_foreach_norm", missing)
    for m in (0.9, 0.5):
        ema.update(m)
        expected.update(m)
    assert not ema.fused
    for a, b in zip(teacher.parameters(), teacher_loop.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for p in student.parameters():
        p.grad = torch.full_like(p, 10.0)
    norms = utils.clip_gradients(student, 3.0, fused=True)
    torch.testing.assert_close(norms, torch.stack([torch.full_like(p, 10.0).norm() for p in student.parameters()]))
    assert all(p.grad.norm() <= 3.0 * (1 + 1e-5) for p in student.parameters())


def test_fused_gradient_clipping_matches_per_parameter_clipping():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    model_loop = copy.deepcopy(model)
    scales = [10.0, 0.01, 1.0, 100.0, 0.001, 5.0]  # some gradients above the clip norm, some below
    for m in (model, model_loop):
        for p, s in zip(m.parameters(), scales):
            p.grad = torch.full_like(p, s) * torch.linspace(0.5, 1.5, p.numel()).view_as(p)
        m[1].bias.grad = None  # parameters without gradients are skipped
    clip = 3.0
    norms_fused = utils.clip_gradients(model, clip, fused=True)
    norms_loop = utils.clip_gradients(model_loop, clip, fused=False)
    assert torch.is_tensor(norms_fused) and isinstance(norms_loop, list) and len(norms_loop) == 5
    torch.testing.assert_close(norms_fused, torch.tensor(norms_loop), rtol=1e-6, atol=1e-6)
    for a, b in zip(model.parameters(), model_loop.parameters()):
        if a.grad is None:
            assert b.grad is None
            continue
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)
        assert a.grad.norm() <= clip * (1 + 1e-5)
    assert any(n > clip for n in norms_loop) and any(n < clip for n in norms_loop)


@pytest.mark.parametrize("local_crops", [0, 2, 8])
def test_dino_loss_matches_reference_double_loop(local_crops):
    torch.manual_seed(local_crops)
    ncrops, batch, out_dim = local_crops + 2, 3, 64
    fast = main_dino.DINOLoss(out_dim, ncrops, 0.04, 0.04, 0, 2)
    slow = benchmark.ReferenceDINOLoss(out_dim, ncrops, teacher_temp=0.04)
    center = torch.randn(1, out_dim)
    fast.center, slow.center = center.clone(), center.clone()
    student = torch.randn(ncrops * batch, out_dim, requires_grad=True)
    student_slow = student.detach().clone().requires_grad_(True)
    teacher = torch.randn(2 * batch, out_dim)
    loss_fast = fast(student, teacher, epoch=1)
    loss_slow = slow(student_slow, teacher)
    torch.testing.assert_close(loss_fast, loss_slow, rtol=1e-5, atol=1e-5)
    loss_fast.backward()
    loss_slow.backward()
    torch.testing.assert_close(student.grad, student_slow.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(fast.center, slow.center)
    assert not torch.equal(fast.center, center)


def tv_jitter(img, params):
    """torchvision's ColorJitter.forward with given parameters."""
    fn_idx, b, c, s, h = params
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for fn_id in fn_idx.tolist():
        img = ops[fn_id](img, (b, c, s, h)[fn_id])
    return img


def test_fast_color_jitter_matches_torchvision_on_photos(photos_dir):
    photos = load_photos(photos_dir)
    fast = utils.FastColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
    reference = transforms.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
    orders = set()
    for seed in range(8):
        torch.manual_seed(seed)
        params = fast.get_params()
        orders.add(tuple(params[0].tolist()))
        torch.manual_seed(seed)
        assert str(params) == str(reference.get_params(reference.brightness, reference.contrast,
                                                       reference.saturation, reference.hue))
        for img in photos:
            expected = tv_jitter(img, params)
            x = utils._planar_float(img)
            got = utils._hwc_uint8(fast.apply_(x, params))
            assert mean_abs_diff_levels(got, expected) <= 1.0
    assert len(orders) >= 4  # several random orders of the four operations were covered
    # the transform itself: same draws as torchvision's, PIL in and out, arrays in and out
    img = photos[1]
    torch.manual_seed(123)
    expected = reference(img)
    state = torch.get_rng_state()
    torch.manual_seed(123)
    got = fast(img)
    assert torch.equal(torch.get_rng_state(), state)
    assert isinstance(got, Image.Image) and got.mode == "RGB" and got.size == img.size
    assert mean_abs_diff_levels(got, expected) <= 1.0
    torch.manual_seed(123)
    arr = fast(np.asarray(img))
    assert arr.dtype == np.uint8 and np.array_equal(arr, np.asarray(got))


@pytest.mark.parametrize("factor", [0.0, 0.6, 1.4])
def test_fast_color_ops_extremes_match_pil(photos_dir, factor):
    img = load_photos(photos_dir)[0]
    for op, tv in ((utils._pil_brightness_, TF.adjust_brightness), (utils._pil_contrast_, TF.adjust_contrast),
                   (utils._pil_saturation_, TF.adjust_saturation)):
        got = utils._hwc_uint8(op(utils._planar_float(img), factor))
        assert mean_abs_diff_levels(got, tv(img, factor)) <= 0.05, op.__name__


@pytest.mark.parametrize("hue", [-0.5, -0.1, 0.0, 0.03, 0.5])
def test_fast_hue_matches_pil_hsv_shift(photos_dir, hue):
    img = load_photos(photos_dir)[1]
    got = utils._hwc_uint8(utils._pil_hue_(utils._planar_float(img), hue))
    assert mean_abs_diff_levels(got, TF.adjust_hue(img, hue)) <= 0.1


@pytest.mark.parametrize("radius", [0.1, 0.8, 1.5, 2.0])
def test_fast_blur_matches_pil_gaussian_blur(photos_dir, radius):
    for img in load_photos(photos_dir):
        expected = np.asarray(img.filter(ImageFilter.GaussianBlur(radius)), dtype=np.int64)
        got = utils._hwc_uint8(utils._pil_gaussian_blur_(utils._planar_float(img), radius)).astype(np.int64)
        diff = np.abs(got - expected)
        assert diff.mean() <= 0.6  # PIL rounds after each of its six passes, this once
        assert diff.max() <= 4  # edges handled as PIL does (per-pass edge replication)


def test_fast_views_match_faithful_views_with_same_seed(photos_dir):
    photos = load_photos(photos_dir)
    faithful = main_dino.DataAugmentationDINO((0.4, 1.), (0.05, 0.4), 2, False, global_crop_size=64,
                                              local_crop_size=32)
    fast = main_dino.DataAugmentationDINO((0.4, 1.), (0.05, 0.4), 2, True, global_crop_size=64,
                                          local_crop_size=32)
    std = torch.tensor((0.229, 0.224, 0.225)).view(3, 1, 1)
    for seed in range(6):
        img = photos[seed % 3]
        views = []
        for aug in (faithful, fast):
            random.seed(seed)
            torch.manual_seed(seed)
            views.append(aug(img))
            views.append((random.random(), torch.rand(1).item()))  # the draws that follow
        (slow_views, slow_next), (fast_views, fast_next) = views[:2], views[2:]
        assert slow_next == fast_next  # same number and order of random draws
        assert [v.shape for v in fast_views] == [v.shape for v in slow_views]
        for a, b in zip(slow_views, fast_views):
            assert b.dtype == torch.float32 and b.is_contiguous()
            assert float(((a - b).abs() * std * 255).mean()) <= 1.0  # in grey levels


@pytest.mark.skipif(not utils.has_cxx_compiler(), reason="side C (--compile) on a CPU needs a C++ compiler")
def test_benchmark_sides_compute_the_same_training_steps(one_thread):
    """benchmark.py's A (reference-equivalent), B (this package) and C (B with compiled blocks) are the same
    maths: same losses, same teacher, with drop path on (B and C skip the dropped samples, A masks them)."""
    args = benchmark.get_args_parser().parse_args([
        "--arch", "vit_tiny", "--patch_size", "16", "--out_dim", "64", "--batch_size", "4", "--drop_path_rate", "0.5",
        "--global_crop_size", "32", "--local_crop_size", "16", "--local_crops_number", "2", "--device", "cpu",
        "--compile"])
    accel = utils.Accelerator.create("cpu")
    sides, images = benchmark.build_sides(args, accel, "fp32")
    side_a = sides["A"]
    assert list(sides) == ["A", "B", "C"] and all(side.mode == "fp32" for side in sides.values())
    assert not side_a.student.backbone.blocks[0].attn.use_sdpa and sides["B"].student.backbone.blocks[0].attn.use_sdpa
    assert not side_a.teacher.backbone.last_block_cls_only and sides["B"].teacher.backbone.last_block_cls_only
    assert not side_a.student.backbone.blocks[5].skip_dropped_samples
    assert sides["C"].student.backbone.blocks[5].skip_dropped_samples
    for step in range(2):
        torch.manual_seed(step)
        loss_a = side_a(images)
        for key in ("B", "C"):
            torch.manual_seed(step)  # the same drop-path draws
            torch.testing.assert_close(sides[key](images), loss_a, rtol=1e-4, atol=1e-5, msg=f"{key}, step {step}")
    for key in ("B", "C"):
        side = sides[key]
        torch.testing.assert_close(side.loss.center, side_a.loss.center, rtol=1e-4, atol=1e-6)
        for (name, a), b in zip(side_a.teacher.named_parameters(), side.teacher.parameters()):
            torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-5, msg=f"{key}: {name}")
        moved = [not torch.equal(p, q) for p, q in zip(side.teacher.parameters(), side.student.parameters())]
        assert any(moved)  # the steps did update the student


def test_benchmark_script_reports_both_sides(photos_dir, tmp_path):
    out = tmp_path / "bench.json"
    proc = run_py("benchmark.py", "--what", "all", "--arch", "vit_tiny", "--patch_size", "16", "--out_dim", "64",
                  "--batch_size", "2", "--global_crop_size", "32", "--local_crop_size", "16",
                  "--local_crops_number", "2", "--steps", "1", "--rounds", "2", "--warmup", "0", "--threads", "1",
                  "--data_images", "2", "--photos_dir", photos_dir, "--device", "cpu", "--profile", "4", "--json", out,
                  timeout=300)
    assert proc.returncode == 0, proc.stderr
    step, data = json.loads(out.read_text())
    assert step["what"] == "step" and step["A_precision"] == "fp32" and step["step_gflop"] > 0
    assert step["A_onednn_linear"] is False  # the reference's nn.Linear path
    assert step["B_onednn_linear"] is (vits._onednn_linear is not None)  # fp32 on this CPU
    assert ("oneDNN linear layers" in proc.stdout) is step["B_onednn_linear"]
    for side in ("A", "B"):
        assert len(step[side]["img_s_rounds"]) == 2 and step[side]["img_s_median"] > 0
    assert step["ratio_median"] > 0 and "speed-up B/A" in proc.stdout
    for side in ("A", "B"):  # --profile: one profiled step of each side, its costliest ops
        assert step["profile"][side]["host_ms"] > 0 and step["profile"][side]["device_ms"] is None
        table = proc.stdout.split(f"profile of one step of {side} ")[1]
        assert "Self CPU" in table and "aten::" in table
    assert data["what"] == "data" and sorted(data["files"]) == ["astronaut.jpg", "chelsea.jpg", "coffee.jpg"]
    for name in ("reference", "faithful (MultiCropDataset)", "fast", "fast (MultiCropDataset)",
                 "faithful, uint8 (MultiCropDataset)", "fast, uint8 (MultiCropDataset)"):
        assert data[name]["img_s_cpu"] > 0


@pytest.mark.parametrize("round_warmup", [0, 1])
def test_benchmark_round_warmup_runs_untimed_steps_of_each_side_before_its_timed_ones(monkeypatch, round_warmup):
    """--round_warmup N: in every round each side first runs N untimed steps, so that its timed steps follow its
    own step; the timed steps stay --steps."""
    calls, timed = [], []
    for cls, key in ((benchmark.ReferenceStep, "A"), (benchmark.PackageStep, "B")):
        def counting(self, images, _original=cls.__call__, _key=key):
            calls.append(_key)
            return _original(self, images)
        monkeypatch.setattr(cls, "__call__", counting)
    original_time_steps = benchmark.time_steps

    def recording_time_steps(step, images, n, accel):
        timed.append((len(calls), n))
        return original_time_steps(step, images, n, accel)
    monkeypatch.setattr(benchmark, "time_steps", recording_time_steps)
    args = benchmark.get_args_parser().parse_args(
        ["--what", "step", "--device", "cpu", "--arch", "vit_tiny", "--patch_size", "16", "--out_dim", "64",
         "--batch_size", "2", "--global_crop_size", "32", "--local_crop_size", "16", "--local_crops_number", "2",
         "--steps", "1", "--rounds", "2", "--warmup", "0", "--threads", "1", "--round_warmup", str(round_warmup)])
    summary = benchmark.run(args)[0]
    per_side = ["A"] * (round_warmup + 1) + ["B"] * (round_warmup + 1)
    # the FLOP count (one step of A), the rounds, then one step of each side for its memory
    assert calls == ["A"] + per_side * 2 + ["A", "B"]
    # each timed call starts after the side's untimed steps of its round and times --steps steps
    starts = [1 + round_warmup, 1 + 2 * round_warmup + 1]
    starts += [s + len(per_side) for s in starts]
    assert timed == [(s, 1) for s in starts]
    assert summary["round_warmup"] == round_warmup and len(summary["B"]["img_s_rounds"]) == 2


def test_benchmark_kernel_time_counts_device_events_once():
    """--profile's kernel time on GPUs: kernels and copies once, not again through the CPU ops that launched
    them, and not the annotated spans (the optimizer step's) that contain them, as the profiler's own table."""
    from types import SimpleNamespace as Event
    from torch.autograd import DeviceType
    events = [Event(device_type=DeviceType.CPU, is_user_annotation=False, self_device_time_total=700.0),  # aten::mm
              Event(device_type=DeviceType.CUDA, is_user_annotation=False, self_device_time_total=700.0),  # its kernel
              Event(device_type=DeviceType.CUDA, is_user_annotation=False, self_device_time_total=300.0),  # a copy
              Event(device_type=DeviceType.CUDA, is_user_annotation=True, self_device_time_total=5000.0)]  # a span
    assert benchmark.kernel_time_ms(events) == pytest.approx(1.0)


def test_benchmark_bad_input_is_one_line_error(tmp_path):
    proc = run_py("benchmark.py", "--what", "data", "--photos_dir", tmp_path / "missing", timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "--photos_dir is not a folder" in proc.stderr
    with pytest.raises(utils.UserError, match="--steps must be at least 1"):
        benchmark.run(benchmark.get_args_parser().parse_args(["--steps", "0"]))
    with pytest.raises(utils.UserError, match="--round_warmup and --local_crops_number must be 0 or more"):
        benchmark.run(benchmark.get_args_parser().parse_args(["--round_warmup", "-1"]))


def test_drop_path_under_the_compiler_reads_its_rate_from_a_buffer_with_the_same_maths():
    """Prepared for compilation, DropPath takes its keep probability from a non-persistent buffer (one graph for
    every rate): each sample is 0 or x / keep_prob, about drop_prob of them dropped; a rate of 0 returns x; the
    buffer follows drop_prob and stays out of checkpoints; eager DropPath has no buffer."""
    dp = vits.DropPath(0.25)
    assert list(dp.buffers()) == []
    dp.use_tensor_rate()
    assert float(dp.keep_prob_tensor) == 0.75 and "keep_prob_tensor" not in dp.state_dict()
    dp.drop_prob = 0.4
    assert float(dp.keep_prob_tensor) == pytest.approx(0.6)
    compiled = torch.compile(dp, backend="eager", dynamic=False)
    torch.manual_seed(0)
    x = torch.randn(4000, 3, 5)
    out = compiled(x)
    kept = (out != 0).flatten(1).all(1)
    assert torch.equal(out[kept], x[kept].div(0.6)) and not out[~kept].any()
    assert abs(1 - kept.float().mean().item() - 0.4) < 0.03
    dp.drop_prob = 0.0
    assert torch.equal(compiled(x), x)
    dp.eval()
    dp.drop_prob = 0.4
    assert torch.equal(compiled(x), x)


@pytest.mark.skipif(not utils.has_cxx_compiler(), reason="--compile on a CPU needs a C++ compiler")
def test_compiled_whole_blocks_share_graphs_across_drop_path_rates(one_thread):
    """Each block has its own drop-path rate; compiled whole blocks still share their graphs (the rate is a
    buffer, shapes static), instead of one compilation per block."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = vits.vit_tiny(patch_size=8, drop_path_rate=0.5)
    assert list(model.buffers()) == []
    keys = list(model.state_dict())
    utils.compile_repeated_blocks([model], utils.Accelerator.create("cpu"), units="blocks")
    for _ in range(2):
        model(torch.randn(4, 3, 16, 16)).sum().backward()
    # block 0 (no drop path: rate 0), blocks 1-10, and the last block (the class token only): three graphs
    assert counters["stats"]["unique_graphs"] == 3
    # the rate buffers stay out of checkpoints, and DistributedDataParallel is told not to broadcast them
    rate_buffers = [name for name, _ in model.named_buffers()]
    assert len(rate_buffers) == 11 and all(name.endswith("drop_path.keep_prob_tensor") for name in rate_buffers)
    assert list(model.state_dict()) == keys
    assert sorted(model._ddp_params_and_buffers_to_ignore) == sorted(rate_buffers)


@pytest.mark.skipif(not utils.has_cxx_compiler(), reason="--compile on a CPU needs a C++ compiler")
def test_compiled_branches_do_not_recompile_for_each_count_of_kept_samples(one_thread):
    """On CPUs the compiled branches see only the samples drop path keeps, a different count at each step; they
    keep dynamic shapes, so the graphs stay a handful (static shapes: one more per new count, 25 in 8 steps)."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = vits.vit_tiny(patch_size=8, drop_path_rate=0.5)
    utils.compile_repeated_blocks([model], utils.Accelerator.create("cpu"), units="branches")
    for _ in range(8):
        model(torch.randn(8, 3, 16, 16)).sum().backward()
    assert counters["stats"]["unique_graphs"] <= 10


@pytest.mark.skipif(not utils.has_cxx_compiler(), reason="--compile on a CPU needs a C++ compiler")
@pytest.mark.parametrize("units", ["blocks", "branches"])
def test_compiled_blocks_match_eager_forward_and_gradients_and_keep_checkpoint_names(one_thread, units):
    """--compile: blocks compiled in place compute what eager blocks compute. Whole blocks draw drop path from the
    compiler's random stream, so they are compared without it; with compiled branches (the CPU default) the block's
    drop path stays eager: same draws, same skipped samples."""
    from torch._dynamo.utils import counters
    counters.clear()
    torch.manual_seed(0)
    eager = vits.vit_tiny(patch_size=8, drop_path_rate=0.0 if units == "blocks" else 0.5)
    compiled = copy.deepcopy(eager)
    eager_names = list(eager.state_dict())
    assert utils.compile_repeated_blocks([compiled], utils.Accelerator.create("cpu"), units=units) == 12
    assert list(compiled.state_dict()) == eager_names  # checkpoints keep the reference's keys
    for shape in ((3, 3, 32, 32), (6, 3, 16, 16), (6, 3, 16, 16)):  # both crop resolutions of a step, twice
        x = torch.randn(*shape)
        results = []
        for model in (eager, compiled):
            torch.manual_seed(1)
            results.append(output_and_gradients(model, x))
        assert_same_output_and_gradients(*results)
    with torch.no_grad():  # the teacher's graph
        x = torch.randn(2, 3, 32, 32)
        outputs = []
        for model in (eager, compiled):
            torch.manual_seed(2)
            outputs.append(model(x))
        torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-4, atol=1e-5)
    assert counters["stats"]["unique_graphs"] >= 3  # really compiled: train at two sizes, and no-grad
    block = compiled.blocks[0]
    compiled_parts = [m for m in (block, block.attn, block.mlp) if getattr(m, "_compiled_call_impl", None)]
    assert compiled_parts == ([block] if units == "blocks" else [block.attn, block.mlp])
