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
"""Helpers shared by training and evaluation.

Sections: maths and model helpers; logging; devices, precision and process
groups (the only place that knows about NPU/CUDA/CPU); checkpoints.
"""
import argparse
import builtins
import contextlib
import datetime
import importlib
import inspect
import math
import os
import random
import re
import shutil
import subprocess
import sys
import time
from collections import defaultdict, deque

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms


class UserError(Exception):
    """A problem with the user's input: reported as one line, without a traceback."""


MIN_TORCH = (1, 13)  # torch.load(weights_only=True), used for every checkpoint


def torch_version_problem(version=None):
    """Why this torch cannot run the package (checked before any work starts), or None."""
    version = str(torch.__version__ if version is None else version)
    match = re.match(r"(\d+)\.(\d+)", version)
    if match and tuple(int(x) for x in match.groups()) < MIN_TORCH:
        return (f"this package needs torch >= {MIN_TORCH[0]}.{MIN_TORCH[1]} (checkpoints are read with "
                f"weights_only=True); this is torch {version}")
    return None


def run_cli(main, *args):
    """Runs `main`, turning UserError (and Ctrl-C) into a one-line message and exit code."""
    try:
        problem = torch_version_problem()
        if problem:
            raise UserError(problem)
        return main(*args)
    except UserError as err:
        prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "dino"
        msg = str(err).rstrip()
        last = msg.splitlines()[-1] if msg else msg
        if "Original Traceback" in msg and "UserError: " in last:  # raised in a DataLoader worker
            msg = last.split("UserError: ", 1)[1]
        msg = msg.replace("\n", " ")
        builtins.print(f"{prog}: error: {msg}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        builtins.print("interrupted", file=sys.stderr, flush=True)
        sys.exit(130)


def make_output_dir(path, flag="--output_dir"):
    """Creates an output folder before any long work, so that a bad path fails at once, in one line."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path} is a file, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create {flag} {path}: {err.strerror or err}") from err
    if not os.access(path, os.W_OK):
        raise UserError(f"{flag} {path} is not writable")


# ---------------------------------------------------------------------------
# Maths and model helpers
# ---------------------------------------------------------------------------

def bool_flag(s):
    """Parses boolean command-line values."""
    falsy, truthy = {"off", "false", "0"}, {"on", "true", "1"}
    if s.lower() in falsy:
        return False
    if s.lower() in truthy:
        return True
    raise argparse.ArgumentTypeError("invalid value for a boolean flag")


def trunc_normal_(tensor, mean=0., std=1., a=-2., b=2.):
    """Normal(mean, std) truncated to [a, b], in place."""
    return _no_grad_trunc_normal_(tensor, mean, std, a, b)


@torch.no_grad()
def _no_grad_trunc_normal_(tensor, mean, std, a, b):
    """Inverse-CDF sampling (works on every torch version)."""
    def norm_cdf(x):
        return (1. + math.erf(x / math.sqrt(2.))) / 2.
    lo, hi = norm_cdf((a - mean) / std), norm_cdf((b - mean) / std)
    tensor.uniform_(2 * lo - 1, 2 * hi - 1)
    tensor.erfinv_()
    tensor.mul_(std * math.sqrt(2.)).add_(mean)
    tensor.clamp_(min=a, max=b)
    return tensor


def fix_random_seeds(seed=31):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0):
    """Per-iteration values: linear warm-up, then a half cosine from base_value to final_value."""
    warmup_iters = warmup_epochs * niter_per_ep
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_iters > 0 else np.array([])
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    schedule = np.concatenate((warmup, cosine))
    assert len(schedule) == epochs * niter_per_ep
    return schedule


class GaussianBlur(object):
    """PIL Gaussian blur with a random radius, applied with probability p."""
    def __init__(self, p=0.5, radius_min=0.1, radius_max=2.):
        self.prob = p
        self.radius_min = radius_min
        self.radius_max = radius_max

    def __call__(self, img):
        if random.random() > self.prob:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.radius_min, self.radius_max)))


class Solarization(object):
    def __init__(self, p):
        self.p = p

    def __call__(self, img):
        if random.random() < self.p:
            return ImageOps.solarize(img)
        return img


# ---- fast multi-crop views (--use_color_jitter_opti): torchvision's semantics on arrays ----

# PIL's convert("L"): L = (19595 R + 38470 G + 7471 B + 2^15) >> 16. In float32 every product and partial
# sum is an integer below 2^24, so the arithmetic below is exact in any summation order.
_LUMA_WEIGHTS = (19595.0, 38470.0, 7471.0)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_NORMALIZE_CONSTANTS = {}  # (device, mean, std) -> tensors, so that no step copies them to the device again


def normalize_uint8_crops(crops, mean=_IMAGENET_MEAN, std=_IMAGENET_STD):
    """torchvision's ToTensor and Normalize on (N, 3, H, W) uint8 crops, on whatever device they are: the same
    float32 operations in the same order (divide by 255, subtract the mean, divide by the std), so the result is
    what the loader's workers would have made. Float crops are returned unchanged."""
    out = []
    for crop in crops:
        if crop.dtype != torch.uint8:
            out.append(crop)
            continue
        key = (crop.device, mean, std)
        if key not in _NORMALIZE_CONSTANTS:
            # 255 as a tensor: CUDA turns division by a host scalar into a product with its reciprocal
            _NORMALIZE_CONSTANTS[key] = tuple(torch.tensor(v, dtype=torch.float32).view(-1, 1, 1).to(crop.device)
                                              for v in ((255.0,), mean, std))
        scale, mean_t, std_t = _NORMALIZE_CONSTANTS[key]
        out.append(crop.to(torch.float32).div_(scale).sub_(mean_t).div_(std_t))
    return out


def _pil_luma(x):
    """PIL's 8-bit luma of a planar (3, H, W) float32 image holding integers; returns (H, W) float32.

    Elementwise on purpose: numpy's BLAS would start threads inside DataLoader workers.
    """
    y = x[0] * np.float32(_LUMA_WEIGHTS[0])
    y += x[1] * np.float32(_LUMA_WEIGHTS[1])
    y += x[2] * np.float32(_LUMA_WEIGHTS[2])
    y += np.float32(32768.0)
    y *= np.float32(1.0 / 65536.0)
    return np.floor(y, out=y)


def _pil_blend_(x, base, factor):
    """x <- PIL Image.blend(base, x, factor): base + factor * (x - base) in float32, clipped, truncated."""
    x -= base
    x *= np.float32(factor)
    x += base
    np.clip(x, np.float32(0.0), np.float32(255.0), out=x)
    return np.floor(x, out=x)


def _pil_brightness_(x, factor):
    """PIL's ImageEnhance.Brightness (blend with black). These ops work in place on planar float32."""
    x *= np.float32(factor)
    np.clip(x, np.float32(0.0), np.float32(255.0), out=x)
    return np.floor(x, out=x)


def _pil_contrast_(x, factor):
    """PIL's ImageEnhance.Contrast: blend with the rounded mean of the grey image."""
    luma = _pil_luma(x)
    mean = float(int(luma.sum(dtype=np.float64) / luma.size + 0.5))
    return _pil_blend_(x, np.float32(mean), factor)


def _pil_saturation_(x, factor):
    """PIL's ImageEnhance.Color: blend with the grey image."""
    return _pil_blend_(x, _pil_luma(x), factor)


def _pil_hue_shift(hue_factor):
    """torchvision's PIL shift: int(hue * 255) (towards zero), added to PIL's 8-bit hue modulo 256."""
    return int(np.int32(hue_factor * 255).astype(np.uint8))


def _pil_hue_(x, hue_factor):
    """torchvision's adjust_hue on PIL images: RGB -> PIL HSV (8-bit H, S, V), H += shift, back to RGB.

    PIL's conversions, vectorised without branches: H = trunc(255 * hue), S = trunc(255 * chroma / max),
    V = max; back with round(V * (1 - S/255 * w)), w the hexcone weight of each channel. In place.
    """
    f32 = np.float32
    shift = _pil_hue_shift(hue_factor)
    r, g, b = x[0], x[1], x[2]
    vmax = np.maximum(r, g)
    np.maximum(vmax, b, out=vmax)
    chroma = np.minimum(r, g)
    np.minimum(chroma, b, out=chroma)
    np.subtract(vmax, chroma, out=chroma)
    # hue * chroma in sextants, PIL's branch order: blue max 4 + (r - g)/c, green max 2 + (b - r)/c,
    # red max (g - b)/c; selected with 0/1 masks (exact on these integer values)
    twice_chroma = chroma + chroma
    hue = r - g
    hue += twice_chroma
    hue += twice_chroma
    tmp = b - r
    tmp += twice_chroma
    tmp -= hue
    tmp *= np.equal(g, vmax)
    hue += tmp
    np.subtract(g, b, out=tmp)
    tmp -= hue
    tmp *= np.equal(r, vmax)
    hue += tmp
    grey = np.equal(chroma, 0)
    np.add(chroma, grey, out=tmp)  # grey pixels: 0 / 1
    hue /= tmp
    hue *= f32(1.0 / 6.0)
    hue += np.less(hue, 0)  # fmod(h / 6 + 1, 1) for h / 6 in (-1, 1)
    hue *= f32(255.0)
    np.floor(hue, out=hue)  # PIL's 8-bit hue
    hue += f32(shift)
    hue -= f32(256.0) * np.greater_equal(hue, 256.0)  # uint8 wrap-around
    hue *= f32(6.0 / 255.0)
    # PIL's 8-bit saturation, then V * S / 255
    np.add(vmax, grey, out=tmp)
    sat = np.divide(chroma, tmp, out=chroma)
    sat *= f32(255.0)
    np.floor(sat, out=sat)
    sat *= f32(1.0 / 255.0)
    sat *= vmax
    # hexcone weights: red 0 at hue 0..1, ramps to 1 at 2..4 (centred on 3); green centred on 5 (wrapping
    # through 0); blue centred on 1 (wrapping through 6)
    for channel, centre in ((0, 3.0), (1, 5.0), (2, 1.0)):
        np.subtract(hue, f32(centre), out=tmp)
        np.abs(tmp, out=tmp)
        if centre == 5.0:
            np.minimum(tmp, hue + f32(1.0), out=tmp)
        elif centre == 1.0:
            np.minimum(tmp, f32(7.0) - hue, out=tmp)
        np.subtract(f32(2.0), tmp, out=tmp)
        np.clip(tmp, f32(0.0), f32(1.0), out=tmp)
        tmp *= sat
        out = x[channel]
        np.subtract(vmax, tmp, out=out)
        out += f32(0.5)
        np.floor(out, out=out)
    return x


_PIL_COLOR_OPS = (_pil_brightness_, _pil_contrast_, _pil_saturation_, _pil_hue_)


def _planar_float(img):
    """PIL RGB image or (H, W, 3) uint8 array -> C-contiguous (3, H, W) float32."""
    arr = np.asarray(img)
    out = np.empty((3,) + arr.shape[:2], dtype=np.float32)
    np.copyto(out, arr.transpose(2, 0, 1))
    return out


def _hwc_uint8(x):
    """Planar float32 holding integers 0..255 -> (H, W, 3) uint8."""
    return np.ascontiguousarray(x.transpose(1, 2, 0), dtype=np.uint8)


class FastColorJitter(object):
    """torchvision.transforms.ColorJitter for 8-bit RGB images, computed with numpy in a few passes.

    Same parameter sampling and random order as ColorJitter.get_params (the same torch RNG draws give the
    same factors and order); each operation follows PIL's definition as torchvision applies it. Accepts a
    PIL image (returns one) or an (H, W, 3) uint8 array (returns one).
    """
    def __init__(self, brightness=0, contrast=0, saturation=0, hue=0):
        ranges = transforms.ColorJitter(brightness, contrast, saturation, hue)  # validates like torchvision
        self.brightness, self.contrast = ranges.brightness, ranges.contrast
        self.saturation, self.hue = ranges.saturation, ranges.hue

    def get_params(self):
        return transforms.ColorJitter.get_params(self.brightness, self.contrast, self.saturation, self.hue)

    @staticmethod
    def apply_(x, params):
        """Applies sampled params to a planar float32 image holding integers 0..255, in place."""
        fn_idx, *factors = params
        for fn_id in fn_idx.tolist():
            if factors[fn_id] is not None:
                _PIL_COLOR_OPS[fn_id](x, factors[fn_id])
        return x

    def __call__(self, img):
        params = self.get_params()
        if isinstance(img, Image.Image):
            if img.mode != "RGB":
                raise ValueError(f"FastColorJitter needs an RGB image, got mode {img.mode}")
            return Image.fromarray(_hwc_uint8(self.apply_(_planar_float(img), params)), "RGB")
        return _hwc_uint8(self.apply_(_planar_float(img), params))

    def __repr__(self):
        return (f"{type(self).__name__}(brightness={self.brightness}, contrast={self.contrast}, "
                f"saturation={self.saturation}, hue={self.hue})")


def _pil_box_radius(radius, passes=3):
    """PIL's extended-box radius for a Gaussian of std `radius` made of `passes` box blurs."""
    sigma2 = radius * radius / passes
    whole = math.floor((math.sqrt(12.0 * sigma2 + 1.0) - 1.0) / 2.0)
    frac = (2 * whole + 1) * (whole * (whole + 1) - 3 * sigma2) / (6 * (sigma2 - (whole + 1) * (whole + 1)))
    return whole + frac


def _pil_box_weights(radius, passes=3):
    """Taps of one of PIL's box passes for GaussianBlur(radius): 24-bit weights, fractional end taps."""
    box_radius = _pil_box_radius(radius, passes)
    whole = int(box_radius)
    ww = int((1 << 24) / (box_radius * 2 + 1))
    fw = ((1 << 24) - (whole * 2 + 1) * ww) // 2
    return np.array([fw] + [ww] * (2 * whole + 1) + [fw], dtype=np.float64) / (1 << 24)


def _clamped_blur_matrix(box, passes, n):
    """The n x n operator of `passes` box passes, each replicating the edge pixel as PIL does."""
    half = len(box) // 2
    index = np.arange(n)
    one = np.zeros((n, n))
    for offset, weight in zip(range(-half, half + 1), box):
        one[index, np.clip(index + offset, 0, n - 1)] += weight
    out = one
    for _ in range(passes - 1):
        out = one @ out
    return out


def _pil_blur_plan(radius, n, passes=3):
    """(kernel, left edge rows, right edge rows) of PIL's GaussianBlur along an axis of length n."""
    box = _pil_box_weights(radius, passes)
    kernel = box
    for _ in range(passes - 1):
        kernel = np.convolve(kernel, box)
    half = len(kernel) // 2
    if n < 4 * half:  # tiny images: the whole operator
        return kernel.astype(np.float32), _clamped_blur_matrix(box, passes, n).astype(np.float32), None
    edge = _clamped_blur_matrix(box, passes, 4 * half)
    left = edge[:half, :2 * half].astype(np.float32)
    right = edge[-half:, -2 * half:].astype(np.float32)
    return kernel.astype(np.float32), left, right


def _blur_axis(x, out, kernel, left, right, axis):
    """out <- x filtered along `axis` (1 or 2 of a (3, H, W) array): interior by taps, edges by matrices."""
    n = x.shape[axis]
    if right is None:
        if axis == 1:
            np.matmul(left, x, out=out)
        else:
            np.matmul(x, left.T, out=out)
        return out
    half = len(kernel) // 2

    def sl(a, start, stop):
        return a[:, start:stop] if axis == 1 else a[:, :, start:stop]
    inner = sl(out, half, n - half)
    np.multiply(sl(x, half, n - half), kernel[half], out=inner)
    tmp = np.empty_like(inner)
    for d in range(1, half + 1):
        np.add(sl(x, half - d, n - half - d), sl(x, half + d, n - half + d), out=tmp)
        tmp *= kernel[half + d]
        inner += tmp
    if axis == 1:
        np.matmul(left, x[:, :2 * half], out=out[:, :half])
        np.matmul(right, x[:, n - 2 * half:], out=out[:, n - half:])
    else:
        np.matmul(x[:, :, :2 * half], left.T, out=out[:, :, :half])
        np.matmul(x[:, :, n - 2 * half:], right.T, out=out[:, :, n - half:])
    return out


def _pil_gaussian_blur_(x, radius):
    """PIL's GaussianBlur(radius) on a planar (3, H, W) float32 image, in place; rounded to integers.

    PIL runs three box passes per axis, each replicating the edge pixel and rounding to 8 bits. Here the
    three passes are one kernel inside the image and exact small operators near its edges; rounding once
    instead of six times moves pixels by well under one grey level on average.
    """
    _, h, w = x.shape
    cols = np.empty_like(x)
    plan_h = _pil_blur_plan(radius, h)
    _blur_axis(x, cols, *plan_h, axis=1)
    _blur_axis(cols, x, *(plan_h if w == h else _pil_blur_plan(radius, w)), axis=2)
    x += np.float32(0.5)
    return np.floor(x, out=x)


def _uint8_resize_supported():
    """torch >= 2.1 resizes uint8 images with PIL's antialiased bicubic kernel; older torch falls back to PIL."""
    try:
        probe = torch.zeros(1, 3, 8, 8, dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
        F.interpolate(probe, size=(4, 4), mode="bicubic", antialias=True, align_corners=False)
        return True
    except (RuntimeError, TypeError, NotImplementedError):
        return False


_UINT8_RESIZE = _uint8_resize_supported()


def as_uint8_chw(img):
    """A decoded RGB image as a (3, H, W) uint8 tensor view of HWC memory (what FastCropTransform reads)."""
    if isinstance(img, Image.Image):
        img = np.array(img.convert("RGB") if img.mode != "RGB" else img)
    if isinstance(img, np.ndarray):
        img = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)
    return img


class FastCropTransform(object):
    """One DINO view (RandomResizedCrop, flip, colour jitter, grayscale, blur, solarization, normalize).

    Same random draws, in the same order, as the reference's torchvision/PIL composition, so a seeded view
    has the same crop box and parameters; the image work runs on uint8 tensors and float32 arrays:
    torch's antialiased bicubic resize on uint8 (PIL's kernel), FastColorJitter's arithmetic, PIL's box
    blur as one separable kernel. Returns the normalized (3, size, size) float32 tensor, or with normalize=False
    the (3, size, size) uint8 crop before normalization (utils.normalize_uint8_crops).
    """
    def __init__(self, size, scale, blur_p, solarize_p=0.0, jitter_p=0.8, grayscale_p=0.2, flip_p=0.5,
                 ratio=(3. / 4., 4. / 3.), blur_radius=(0.1, 2.0),
                 mean=_IMAGENET_MEAN, std=_IMAGENET_STD, normalize=True):
        self.size = (size, size)
        self.normalize = normalize
        self.scale, self.ratio = scale, ratio
        self.blur_p, self.blur_radius = blur_p, blur_radius
        self.solarize_p, self.jitter_p, self.grayscale_p, self.flip_p = solarize_p, jitter_p, grayscale_p, flip_p
        self.jitter = FastColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
        # torchvision's float32 constants, used as ToTensor and Normalize use them (normalize_uint8_crops too)
        self.mean = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)

    def _resized_crop(self, chw):
        top, left, height, width = transforms.RandomResizedCrop.get_params(chw, self.scale, self.ratio)
        crop = chw[:, top:top + height, left:left + width]
        if _UINT8_RESIZE:
            out = F.interpolate(crop.unsqueeze(0), size=self.size, mode="bicubic", antialias=True,
                                align_corners=False)[0]
            return out.numpy()  # (3, h, w) view of HWC memory
        pil = Image.fromarray(np.ascontiguousarray(crop.permute(1, 2, 0).numpy()), "RGB")
        pil = pil.resize(self.size[::-1], Image.BICUBIC)
        return np.asarray(pil).transpose(2, 0, 1)

    def __call__(self, img):
        chw = as_uint8_chw(img)
        resized = self._resized_crop(chw)
        flip = torch.rand(1) < self.flip_p
        x = np.empty(resized.shape, dtype=np.float32)
        np.copyto(x, resized[:, :, ::-1] if flip else resized)  # the flip commutes with everything below
        if torch.rand(1) <= self.jitter_p:  # RandomApply's test
            self.jitter.apply_(x, self.jitter.get_params())
        if torch.rand(1) < self.grayscale_p:
            x[:] = _pil_luma(x)
        if random.random() <= self.blur_p:  # utils.GaussianBlur's test
            _pil_gaussian_blur_(x, random.uniform(*self.blur_radius))
        if self.solarize_p and random.random() < self.solarize_p:
            np.subtract(np.float32(255.0), x, out=x, where=x >= 128.0)
        if not self.normalize:  # every step above leaves whole numbers 0..255
            return torch.from_numpy(x.astype(np.uint8))
        x /= np.float32(255.0)
        x -= self.mean
        x /= self.std
        return torch.from_numpy(x)


class MultiCropWrapper(nn.Module):
    """Runs the backbone once per run of consecutive crops of equal resolution, then the head once."""
    def __init__(self, backbone, head):
        super().__init__()
        backbone.fc, backbone.head = nn.Identity(), nn.Identity()
        self.backbone = backbone
        self.head = head

    @staticmethod
    def resolution_groups(crops):
        """(start, end) of each run of consecutive crops of equal resolution."""
        groups, start = [], 0
        for i in range(1, len(crops) + 1):
            if i == len(crops) or crops[i].shape[-1] != crops[start].shape[-1]:
                groups.append((start, i))
                start = i
        return groups

    def forward(self, x):
        if not isinstance(x, (list, tuple)):
            x = [x]
        outputs = []
        for start, end in self.resolution_groups(x):
            out = self.backbone(torch.cat(x[start:end]))
            if isinstance(out, tuple):  # XCiT-style backbones return (cls, patches)
                out = out[0]
            outputs.append(out)
        return self.head(torch.cat(outputs))


def get_params_groups(model):
    regularized, not_regularized = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # no weight decay on biases and norm parameters
        if name.endswith(".bias") or len(param.shape) == 1:
            not_regularized.append(param)
        else:
            regularized.append(param)
    return [{'params': regularized}, {'params': not_regularized, 'weight_decay': 0.}]


def has_batchnorms(model):
    bn_types = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
    return any(isinstance(m, bn_types) for m in model.modules())


def clip_gradients(model, clip, fused=False):
    """Clips each parameter's gradient to norm `clip` (per parameter, not global).

    fused=False is the reference loop (one host sync per parameter) and returns
    a list of floats; fused=True does the same maths in a few batched kernels
    without any host sync and returns the norms as one tensor.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    if not fused:
        norms = []
        for p in params:
            norm = p.grad.data.norm(2)
            norms.append(norm.item())
            coef = clip / (norm + 1e-6)
            if coef < 1:
                p.grad.data.mul_(coef)
        return norms
    if not params:
        return torch.zeros(0)
    grads = [p.grad for p in params]
    norms = torch.stack(_foreach_norm(grads))
    coefs = clip / (norms + 1e-6)
    if norms.device.type == "cpu":  # reading on the host costs nothing here: touch only what shrinks
        for grad, coef, shrink in zip(grads, coefs.unbind(0), (coefs < 1).tolist()):
            if shrink:
                grad.mul_(coef)
        return norms
    _foreach_mul_tensors(grads, coefs.clamp_(max=1.0))
    return norms


def _foreach_norm(tensors):
    if hasattr(torch, "_foreach_norm"):
        try:
            return list(torch._foreach_norm(tensors))
        except RuntimeError:  # a device backend without this multi-tensor kernel (NotImplementedError included)
            pass
    return [t.norm(2) for t in tensors]


def _foreach_mul_tensors(tensors, scalars_tensor):
    """tensors[i] *= scalars_tensor[i], without moving the scalars to the host."""
    coefs = scalars_tensor.to(tensors[0].dtype).unbind(0)
    if hasattr(torch, "_foreach_mul_"):
        try:
            torch._foreach_mul_(tensors, coefs)
            return
        except (RuntimeError, TypeError):  # older torch: no tensor-list overload
            pass
    for t, c in zip(tensors, coefs):
        t.mul_(c)


def cancel_gradients_last_layer(epoch, model, freeze_last_layer, in_place=False):
    """Keeps the last layer out of the optimizer step during the first `freeze_last_layer` epochs.

    As the reference, its gradients become None. With `in_place` (gradients in one combined buffer, as under
    Ascend apex) they are zeroed instead and copies of the weights are returned for restore_last_layer after
    the step: a zero gradient would still let weight decay move them and advance the optimizer's state."""
    if epoch >= freeze_last_layer:
        return None
    frozen = []
    for name, p in model.named_parameters():
        if "last_layer" in name:
            if not in_place:
                p.grad = None
                continue
            if p.grad is not None:
                p.grad.zero_()
            frozen.append((p, p.detach().clone()))
    return frozen or None


@torch.no_grad()
def restore_last_layer(frozen, optimizer):
    """After the step: the weights that cancel_gradients_last_layer(in_place=True) copied go back, and their
    optimizer state returns to zeros, which AdamW, SGD and LARS treat as no state yet (the reference's frozen
    layer never gets any). In place, so that views into combined buffers stay valid."""
    for p, value in frozen or ():
        p.copy_(value)
        state = optimizer.state.get(p, {})
        for key, entry in state.items():
            if torch.is_tensor(entry):
                entry.zero_()
            elif isinstance(entry, (int, float)) and not isinstance(entry, bool):
                state[key] = type(entry)(0)


class TeacherEMA(object):
    """teacher = m * teacher + (1 - m) * student, over matching parameter lists.

    fused=True uses the multi-tensor kernels (a handful of launches instead of
    two per parameter); fused=False is the reference per-parameter loop.
    """
    def __init__(self, student, teacher, fused=True):
        self.student_params = [p for p in student.parameters()]
        self.teacher_params = [p for p in teacher.parameters()]
        if len(self.student_params) != len(self.teacher_params):
            raise ValueError("student and teacher have different parameter lists")
        self.fused = fused and hasattr(torch, "_foreach_mul_")

    @torch.no_grad()
    def update(self, m):
        if self.fused:
            if hasattr(torch, "_foreach_lerp_"):  # teacher += (1 - m) * (student - teacher): one pass
                try:
                    torch._foreach_lerp_(self.teacher_params, self.student_params, 1 - m)
                    return
                except RuntimeError:  # a device backend without the kernel (older torch_npu): it wrote nothing
                    self.fused = False
            else:
                torch._foreach_mul_(self.teacher_params, m)
                torch._foreach_add_(self.teacher_params, self.student_params, alpha=1 - m)
                return
        for param_q, param_k in zip(self.student_params, self.teacher_params):
            param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)


class LARS(torch.optim.Optimizer):
    """LARS (no rate scaling or weight decay for biases and norms), for convnets with large batches."""
    def __init__(self, params, lr=0, weight_decay=0, momentum=0.9, eta=0.001,
                 weight_decay_filter=None, lars_adaptation_filter=None):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta,
                        weight_decay_filter=weight_decay_filter, lars_adaptation_filter=lars_adaptation_filter)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g['params']:
                dp = p.grad
                if dp is None:
                    continue
                if p.ndim != 1:
                    dp = dp.add(p, alpha=g['weight_decay'])
                if p.ndim != 1:
                    param_norm = torch.norm(p)
                    update_norm = torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(param_norm > 0.,
                                    torch.where(update_norm > 0, (g['eta'] * param_norm / update_norm), one), one)
                    dp = dp.mul(q)
                state = self.state[p]
                if 'mu' not in state:
                    state['mu'] = torch.zeros_like(p)
                mu = state['mu']
                mu.mul_(g['momentum']).add_(dp)
                p.add_(mu, alpha=-g['lr'])


def accuracy(output, target, topk=(1,)):
    """Top-k accuracies in percent (one tensor per k) of class scores `output` against labels `target`."""
    maxk = max(topk)
    pred = output.topk(maxk, 1, True, True)[1].t()
    correct = pred.eq(target.reshape(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum(0) * 100. / target.size(0) for k in topk]


def multi_scale(samples, model):
    """Features averaged over scales 1, 1/sqrt(2) and 1/2 of the images, divided by the norm of the whole
    batch's result, as the reference's retrieval and copy-detection evaluations compute them."""
    total = None
    for scale in (1, 1 / 2 ** 0.5, 1 / 2):
        inputs = samples if scale == 1 else F.interpolate(samples, scale_factor=scale, mode="bilinear",
                                                          align_corners=False)
        feats = model(inputs).clone()
        total = feats if total is None else total + feats
    total = total / 3
    return total / total.norm()


# ---- image retrieval metrics (revisited Oxford and Paris protocol), for the reference's eval scripts ----

class PCA():
    """PCA whitening learned from a covariance matrix: x -> diag(d^-whit) V^T (x - mean), top `dim` axes."""
    def __init__(self, dim=256, whit=0.5):
        self.dim = dim
        self.whit = whit
        self.mean = None

    def train_pca(self, cov):
        eigenvalues, eigenvectors = np.linalg.eigh(cov)
        floor = eigenvalues.max() * 1e-5  # tiny or negative eigenvalues would blow up the whitening
        eigenvalues = np.maximum(eigenvalues, floor)
        total_energy = eigenvalues.sum()
        keep = np.argsort(eigenvalues)[::-1][:self.dim]
        eigenvalues, eigenvectors = eigenvalues[keep], eigenvectors[:, keep]
        print("keeping %.2f %% of the energy" % (eigenvalues.sum() / total_energy * 100.0))
        self.dvt = np.dot(np.diag(1. / eigenvalues ** self.whit), eigenvectors.T)

    def apply(self, x):
        """Rows of x (numpy array, or tensor on any device) projected; x itself is left unchanged."""
        if isinstance(x, np.ndarray):
            centred = x - self.mean if self.mean is not None else x
            return np.dot(self.dvt, centred.T).T
        if self.mean is not None:
            x = x - torch.as_tensor(self.mean, dtype=torch.float32, device=x.device)
        return torch.mm(torch.as_tensor(self.dvt, dtype=torch.float32, device=x.device), x.t()).t()


def compute_ap(ranks, nres):
    """Average precision from the zero-based ranks (ascending) of the positives, `nres` positives in all:
    the area under the precision-recall curve by trapezoids."""
    ranks = np.asarray(ranks, dtype=np.float64)
    found = np.arange(len(ranks), dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision_before = np.where(ranks == 0, 1.0, found / ranks)
    precision_after = (found + 1) / (ranks + 1)
    return float(((precision_before + precision_after) / 2).sum() / nres)


def compute_map(ranks, gnd, kappas=[]):
    """mAP, per-query AP, mean precision at each kappa and per-query precisions.

    ranks: (database size, queries) database indices in ranked order, one column per query; gnd: one dict per
    query with 'ok' (positives) and optionally 'junk' (indices ignored: removed from the ranking). A query
    without positives counts as nan and is left out of the means."""
    queries = len(gnd)
    aps = np.zeros(queries)
    prs = np.zeros((queries, len(kappas)))
    pr = np.zeros(len(kappas))
    mean_ap, nonempty = 0., 0
    ranks = np.asarray(ranks)
    for i in range(queries):
        positives = np.array(gnd[i]['ok'])
        if positives.shape[0] == 0:
            aps[i] = float('nan')
            prs[i, :] = float('nan')
            continue
        nonempty += 1
        junk = np.array(gnd[i].get('junk', []))
        order = ranks[:, i]
        pos = np.flatnonzero(np.isin(order, positives))
        junk_pos = np.flatnonzero(np.isin(order, junk))
        pos = pos - np.searchsorted(junk_pos, pos)  # the junk ranked before a positive does not count
        aps[i] = compute_ap(pos, len(positives))
        mean_ap += aps[i]
        pos = pos + 1
        for j, kappa in enumerate(kappas):
            kq = min(pos.max(), kappa)
            prs[i, j] = (pos <= kq).sum() / kq
        pr = pr + prs[i, :]
    mean_ap = mean_ap / nonempty if nonempty else float('nan')
    pr = pr / nonempty if nonempty else pr * float('nan')
    return mean_ap, aps, pr, prs


# ---------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------

class SmoothedValue(object):
    """Tracks a series of values; gives smoothed values over a window or the global average."""
    def __init__(self, window_size=20, fmt=None):
        self.deque = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt or "{median:.6f} ({global_avg:.6f})"

    def update(self, value, n=1):
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def synchronize_between_processes(self):
        if not is_dist_avail_and_initialized():
            return
        t = torch.tensor([self.count, self.total], dtype=torch.float32, device=collective_device())  # HCCL has no float64
        dist.all_reduce(t)
        self.count, self.total = int(t[0].item()), t[1].item()

    @property
    def median(self):
        # torch's median, as the reference: the lower of the two middle values
        return torch.tensor(list(self.deque)).median().item() if self.deque else 0.0

    @property
    def avg(self):
        return float(np.mean(list(self.deque))) if self.deque else 0.0

    @property
    def global_avg(self):
        return self.total / max(self.count, 1)

    @property
    def max(self):
        return max(self.deque) if self.deque else 0.0

    @property
    def value(self):
        return self.deque[-1] if self.deque else 0.0

    def __str__(self):
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg,
                               max=self.max, value=self.value)


class MetricLogger(object):
    """The reference's metric logger; tensor values are kept on the device and read in one batch at print time."""
    def __init__(self, delimiter="\t", max_memory_fn=None):
        self.meters = defaultdict(SmoothedValue)
        self.delimiter = delimiter
        self.max_memory_fn = max_memory_fn
        self._pending = []

    def update(self, **kwargs):
        for k, v in kwargs.items():
            if torch.is_tensor(v):
                self.meters[k]  # keeps the meters in the order they were first updated
                self._pending.append((k, v.detach().reshape(())))
            else:
                self.meters[k].update(float(v))

    def flush(self):
        """Reads pending device values with a single host sync."""
        if not self._pending:
            return
        names = [k for k, _ in self._pending]
        values = torch.stack([v.float() for _, v in self._pending]).tolist()
        self._pending = []
        for k, v in zip(names, values):
            self.meters[k].update(v)

    def __getattr__(self, attr):
        if attr in ("meters", "_pending"):
            raise AttributeError(attr)
        if attr in self.meters:
            self.flush()
            return self.meters[attr]
        raise AttributeError("'{}' object has no attribute '{}'".format(type(self).__name__, attr))

    def __str__(self):
        self.flush()
        return self.delimiter.join("{}: {}".format(name, str(meter)) for name, meter in self.meters.items())

    def synchronize_between_processes(self):
        self.flush()
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def add_meter(self, name, meter):
        self.meters[name] = meter

    def log_every(self, iterable, print_freq, header=None, total=None, start_index=0):
        """Yields from `iterable`, printing progress every `print_freq` iterations in the reference's format."""
        header = header or ''
        total = len(iterable) + start_index if total is None else total
        start_time = end = time.time()
        iter_time = SmoothedValue(fmt='{avg:.6f}')
        data_time = SmoothedValue(fmt='{avg:.6f}')
        space_fmt = ':' + str(len(str(total))) + 'd'
        parts = [header, '[{0' + space_fmt + '}/{1}]', 'eta: {eta}', '{meters}', 'time: {time}', 'data: {data}']
        if self.max_memory_fn is not None:
            parts.append('max mem: {memory:.0f}')
        log_msg = self.delimiter.join(parts)
        i = start_index
        printed = True

        def print_line(i):
            eta = str(datetime.timedelta(seconds=int(iter_time.global_avg * (total - i))))
            fields = dict(eta=eta, meters=str(self), time=str(iter_time), data=str(data_time))
            if self.max_memory_fn is not None:
                fields["memory"] = self.max_memory_fn()
            print(log_msg.format(i, total, **fields))
        for obj in iterable:
            data_time.update(time.time() - end)
            yield obj
            iter_time.update(time.time() - end)
            printed = i % print_freq == 0 or i == total - 1
            if printed:
                print_line(i)
            i += 1
            end = time.time()
        if not printed:  # an iterable that ended early (--num_steps) still logs its last step
            print_line(i - 1)
        done = max(i - start_index, 1)
        total_time = time.time() - start_time
        print('{} Total time: {} ({:.6f} s / it)'.format(
            header, str(datetime.timedelta(seconds=int(total_time))), total_time / done))


def get_sha():
    here = os.path.dirname(os.path.abspath(__file__))

    def _run(command):
        return subprocess.check_output(command, cwd=here, stderr=subprocess.DEVNULL).decode('ascii').strip()
    try:
        sha = _run(['git', 'rev-parse', 'HEAD'])
        diff = "has uncommitted changes" if _run(['git', 'diff-index', 'HEAD']) else "clean"
        branch = _run(['git', 'rev-parse', '--abbrev-ref', 'HEAD'])
        return f"sha: {sha}, status: {diff}, branch: {branch}"
    except Exception:
        return "sha: N/A, status: clean, branch: N/A"


# ---------------------------------------------------------------------------
# Devices, precision and process groups. Nothing outside this section names a
# device type; everything goes through Accelerator and Precision.
# ---------------------------------------------------------------------------

DEVICE_CHOICES = ("auto", "npu", "cuda", "cpu")


def _import_optional(name):
    try:
        return importlib.import_module(name)
    except Exception:  # any failure (missing driver, ABI mismatch) means "not usable"
        return None


def npu_available():
    torch_npu = _import_optional("torch_npu")
    if torch_npu is None or not hasattr(torch, "npu"):
        return False
    try:
        return torch.npu.is_available() and torch.npu.device_count() > 0
    except Exception:
        return False


def cuda_available():
    return torch.cuda.is_available() and torch.cuda.device_count() > 0


def apex_amp_available():
    """Ascend's apex (amp with combine_grad, NpuFusedAdamW); PyPI's 'apex' is unrelated and has no amp."""
    apex = _import_optional("apex")
    return apex is not None and _import_optional("apex.amp") is not None


def resolve_device_kind(requested, has_npu, has_cuda):
    """auto picks npu, then cuda, then cpu; an explicit request for a missing device is an error."""
    if requested not in DEVICE_CHOICES:
        raise UserError(f"unknown --device {requested!r}; choose one of {', '.join(DEVICE_CHOICES)}")
    if requested == "auto":
        return "npu" if has_npu else "cuda" if has_cuda else "cpu"
    if requested == "npu" and not has_npu:
        raise UserError("--device npu was asked for, but torch_npu is not importable or sees no NPU")
    if requested == "cuda" and not has_cuda:
        raise UserError("--device cuda was asked for, but torch sees no CUDA device")
    return requested


def check_device_index(kind, local_rank, count, wrap=False):
    """The device index of a process. One process per device: a launcher that starts more processes than this
    machine has devices fails here, with the numbers, instead of in set_device. `wrap` takes the local rank
    modulo the device count (SLURM may bind one device to each task)."""
    if kind == "cpu":
        return 0
    if wrap and count > 0:
        local_rank %= count
    if local_rank >= count:
        raise UserError(f"process {local_rank} on this machine has no {kind} device of its own: {count} visible; "
                        f"start at most {count} processes per machine (torchrun --nproc_per_node, the "
                        f"launchers' --nproc)")
    return local_rank


class Accelerator(object):
    """The device a process computes on, and how to move things there."""
    def __init__(self, kind, index=0):
        self.kind = kind
        self.index = index
        self.device = torch.device(kind, index) if kind != "cpu" else torch.device("cpu")
        if kind == "cuda":
            torch.cuda.set_device(self.device)
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32, as the reference
        elif kind == "npu":
            torch.npu.set_device(self.device)

    @classmethod
    def of(cls, module):
        """The accelerator that holds a module's parameters."""
        device = next(module.parameters()).device
        return cls(device.type, device.index or 0)

    @classmethod
    def create(cls, requested="auto", local_rank=0, wrap_index=False):
        """wrap_index: the local rank modulo the visible devices (SLURM may give each task its own device)."""
        if requested == "auto":
            has_npu, has_cuda = npu_available(), cuda_available()
        else:
            has_npu = npu_available() if requested == "npu" else False
            has_cuda = cuda_available() if requested == "cuda" else False
        kind = resolve_device_kind(requested, has_npu, has_cuda)
        count = getattr(torch, kind).device_count() if kind != "cpu" else 0
        return cls(kind, check_device_index(kind, local_rank, count, wrap=wrap_index))

    @property
    def dist_backend(self):
        return {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}[self.kind]

    @property
    def pin_memory(self):
        return self.kind != "cpu"

    @property
    def normalizes_crops(self):
        """Whether the loader hands over uint8 crops for normalize_uint8_crops to finish here: a quarter of the
        bytes through the workers' shared memory, the pinned copy and the host-to-device copy. On CPUs the
        workers normalize (the main process would otherwise do their work)."""
        return self.kind != "cpu"

    @property
    def bf16_supported(self):
        """Whether --amp can use bf16 here (older GPUs get fp16 with loss scaling)."""
        return self.kind != "cuda" or torch.cuda.is_bf16_supported()

    @property
    def sync_batchnorm(self):
        """SyncBatchNorm needs an accelerator; CPU processes keep per-process statistics."""
        return self.kind != "cpu"

    @property
    def ddp_device_ids(self):
        return None if self.kind == "cpu" else [self.index]

    def to(self, obj, non_blocking=True):
        if isinstance(obj, nn.Module):
            return obj.to(self.device)
        return obj.to(self.device, non_blocking=non_blocking and self.kind != "cpu")

    def synchronize(self):
        if self.kind == "cuda":
            torch.cuda.synchronize(self.device)
        elif self.kind == "npu":
            torch.npu.synchronize()

    def _memory_stat_mb(self, stat):
        """torch.cuda/npu.<stat>() in MB; None on CPUs."""
        if self.kind == "cuda":
            return getattr(torch.cuda, stat)(self.device) / (1024 ** 2)
        if self.kind == "npu":
            return getattr(torch.npu, stat)() / (1024 ** 2)
        return None

    def max_memory_mb(self):
        """Peak memory of live tensors since reset_peak_memory."""
        return self._memory_stat_mb("max_memory_allocated")

    def memory_mb(self):
        """Memory held by live tensors now."""
        return self._memory_stat_mb("memory_allocated")

    def reset_peak_memory(self):
        if self.kind == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.kind == "npu":
            torch.npu.reset_peak_memory_stats()

    def manual_seed(self, seed):
        if self.kind == "cuda":
            torch.cuda.manual_seed_all(seed)
        elif self.kind == "npu":
            torch.npu.manual_seed_all(seed)

    def get_rng_state(self):
        if self.kind == "cuda":
            return torch.cuda.get_rng_state(self.device)
        if self.kind == "npu":
            return torch.npu.get_rng_state()
        return None

    def set_rng_state(self, state):
        if state is None:
            return
        if self.kind == "cuda":
            torch.cuda.set_rng_state(state.cpu(), self.device)
        elif self.kind == "npu":
            torch.npu.set_rng_state(state.cpu())

    def set_binary_mode(self, enabled):
        """Ascend's --bin: precompiled ('binary') operators instead of online compilation."""
        if self.kind == "npu" and hasattr(torch.npu, "set_compile_mode"):
            torch.npu.set_compile_mode(jit_compile=not enabled)

    def host_copy(self, tensor):
        """A small tensor's value for the host, read later without waiting for work queued after this call."""
        return HostCopy(tensor, self.kind)

    def describe(self):
        if self.kind == "cuda":
            return f"cuda:{self.index} ({torch.cuda.get_device_name(self.device)})"
        return str(self.device)


class HostCopy(object):
    """A device tensor's value on its way to the host.

    On CUDA the copy goes to pinned memory behind an event, so get() waits only for the work queued before the
    copy, not for the steps queued since (a plain .item() would drain the whole queue). Elsewhere get() copies
    when called: free on CPUs, and the plain synchronous copy on NPUs.
    """
    def __init__(self, tensor, kind):
        self.event = None
        if kind == "cuda":
            self.tensor = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self.tensor.copy_(tensor.detach(), non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.tensor = tensor.detach().clone()  # a snapshot, as the CUDA copy is

    def get(self):
        if self.event is not None:
            self.event.synchronize()
        return self.tensor.cpu()


def resolve_precision_mode(kind, amp=False, use_fp16=False, apex_available=False, bf16_supported=True):
    """What --amp and --use_fp16 mean on each device (the README's table).

    npu:  --amp -> apex O1 (native fp16 autocast + loss scaling without apex);
          --use_fp16 -> native fp16 autocast + loss scaling.
    cuda: --amp -> bf16 autocast (fp16 + scaling on GPUs without bf16);
          --use_fp16 -> fp16 autocast + loss scaling (the reference's default).
    cpu:  --amp -> bf16 autocast; --use_fp16 is ignored (no fp16 speed-up on CPUs).
    """
    if kind == "npu":
        if amp:
            return "apex_o1" if apex_available else "fp16"
        return "fp16" if use_fp16 else "fp32"
    if kind == "cuda":
        if amp:
            return "bf16" if bf16_supported else "fp16"
        return "fp16" if use_fp16 else "fp32"
    return "bf16" if amp else "fp32"


class Precision(object):
    """Autocast, loss scaling and the optimizer step for one precision mode."""
    def __init__(self, mode, accelerator, scaler=None):
        self.mode = mode
        self.accel = accelerator
        self.scaler = None
        self.apex_amp = None
        if mode == "fp16":
            self.scaler = scaler if scaler is not None else _make_grad_scaler(accelerator.kind)
        elif mode == "apex_o1":
            self.apex_amp = importlib.import_module("apex.amp")

    @property
    def autocast_dtype(self):
        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.mode)

    @property
    def combined_grads(self):
        """apex O1 with combine_grad keeps every gradient in one buffer: a .grad never becomes None."""
        return self.mode == "apex_o1"

    def zero_grad(self, optimizer):
        optimizer.zero_grad(set_to_none=not self.combined_grads)

    def autocast(self):
        dtype = self.autocast_dtype
        if dtype is None:  # fp32, or apex (which patches functions itself)
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.accel.kind, dtype=dtype)

    def initialize(self, models, optimizer):
        """apex O1 wraps the models and optimizer; other modes leave them as they are."""
        if self.mode != "apex_o1":
            return models, optimizer
        models, optimizer = self.apex_amp.initialize(models, optimizer, opt_level="O1", loss_scale="dynamic",
                                                     combine_grad=True)
        return models, optimizer

    def backward(self, loss, optimizer):
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        elif self.apex_amp is not None:
            with self.apex_amp.scale_loss(loss, optimizer) as scaled_loss:
                scaled_loss.backward()
        else:
            loss.backward()

    def unscale_(self, optimizer):
        """Makes .grad hold true gradients (needed before clipping)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer):
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()

    def state_dict(self):
        if self.scaler is not None:
            return self.scaler.state_dict()
        if self.apex_amp is not None:
            return self.apex_amp.state_dict()
        return None

    def load_state_dict(self, state):
        if state is None:
            return
        if self.scaler is not None:
            self.scaler.load_state_dict(state)
        elif self.apex_amp is not None:
            self.apex_amp.load_state_dict(state)


def _make_grad_scaler(kind):
    if hasattr(torch, "amp") and hasattr(torch.amp, "GradScaler"):
        try:
            return torch.amp.GradScaler(kind)
        except (TypeError, RuntimeError):
            pass
    if kind == "npu":
        return torch.npu.amp.GradScaler()
    return torch.cuda.amp.GradScaler()


def build_optimizer(name, params_groups, accelerator, precision_mode=None):
    """adamw uses the fastest exact AdamW kernel of the device; npufusedadamw is Ascend apex's, which works on
    the combined buffers of apex O1 (--amp) only."""
    if name == "npufusedadamw":
        if npu_fused_adamw_usable(accelerator.kind, apex_amp_available(), precision_mode):
            from apex.optimizers import NpuFusedAdamW
            return NpuFusedAdamW(params_groups)
        print("NpuFusedAdamW needs an NPU, Ascend apex and --amp (apex O1); using torch AdamW instead.")
        name = "adamw"
    if name == "adamw":
        # fused AdamW: one pass over memory instead of one per op (CUDA, and CPUs since torch 2.4)
        if accelerator.kind in ("cuda", "cpu"):
            try:
                return torch.optim.AdamW(params_groups, fused=True)
            except (TypeError, RuntimeError):
                pass
        try:
            return torch.optim.AdamW(params_groups, foreach=True)
        except TypeError:
            return torch.optim.AdamW(params_groups)
    if name == "sgd":
        return torch.optim.SGD(params_groups, lr=0, momentum=0.9)  # lr is set by the scheduler
    if name == "lars":
        return LARS(params_groups)
    raise UserError(f"unknown optimizer {name!r}")


def npu_fused_adamw_usable(kind, apex_available, precision_mode):
    return kind == "npu" and apex_available and precision_mode == "apex_o1"


def compile_unsupported_reason(kind, has_module_compile, has_cxx, has_triton):
    """Why --compile cannot run on this device kind, or None when it can."""
    if not has_module_compile:
        return f"--compile needs torch >= 2.2 (this is torch {torch.__version__})"
    if kind == "npu":
        return "--compile is not supported on Ascend NPUs (torch_npu compiles through torchair, not torch.compile)"
    if kind == "cpu" and not has_cxx:
        return "--compile on a CPU needs a C++ compiler (g++ or clang++ on PATH, or CXX set)"
    if kind == "cuda" and not has_triton:
        return "--compile on a GPU needs triton (pip install triton)"
    return None


def has_cxx_compiler():
    candidates = [os.environ.get("CXX", ""), "g++", "c++", "clang++"]
    return any(c and shutil.which(c) for c in candidates)


def _has_triton():
    try:
        from torch.utils._triton import has_triton
        return has_triton()
    except ImportError:
        return _import_optional("triton") is not None


# One compiled graph per (grad mode, crop size, drop path or class-token-only block); 8, the default, is too few.
# Whole blocks get static shapes (dynamic=False): DINO has two crop sizes, and dynamo's automatic switch to dynamic
# shapes at the second one would trade fixed-size kernels for slower general ones. Branches (CPUs) see the kept
# samples of drop path, a different count at each step, and keep dynamo's automatic dynamic shapes.
COMPILE_RECOMPILE_LIMIT = 32
COMPILE_UNITS = ("blocks", "branches")


def compile_repeated_blocks(models, accelerator, units=None):
    """--compile: torch.compile the transformer blocks in place.

    units="blocks" compiles each block whole (its residual adds and drop path fused in); "branches" compiles
    each block's attention and MLP and leaves the block's own few lines eager, so that on CPUs drop path can
    skip the samples it drops (vision_transformer.Block._add_branch), which a compiled graph cannot. Default:
    branches on CPUs, blocks elsewhere. All blocks share their code objects, so the few graphs compiled for
    the first block serve every block of the student and the teacher (tens of seconds instead of minutes for
    a whole-model compile). Parameter names, and so checkpoints, are unchanged. Returns the number of blocks.
    """
    reason = compile_unsupported_reason(accelerator.kind, hasattr(nn.Module, "compile"),
                                        has_cxx_compiler() if accelerator.kind == "cpu" else True,
                                        _has_triton() if accelerator.kind == "cuda" else True)
    if reason:
        raise UserError(reason)
    units = units or ("branches" if accelerator.kind == "cpu" else "blocks")
    if units not in COMPILE_UNITS:
        raise ValueError(f"units must be one of {COMPILE_UNITS}, not {units!r}")
    import torch._dynamo
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), COMPILE_RECOMPILE_LIMIT))
    # Dynamo's DDP graph splitting is for whole-model graphs; a block is far smaller than a DDP bucket, and the
    # splitter fails on the block's float input (its drop-path rate).
    torch._dynamo.config.optimize_ddp = False
    compiled = 0
    for model in models:
        for module in model.modules():
            blocks = getattr(module, "blocks", None)
            if isinstance(blocks, nn.ModuleList):
                for block in blocks:
                    if units == "blocks":
                        for sub in block.modules():
                            if hasattr(sub, "use_tensor_rate"):  # drop path: one graph for every block's rate
                                sub.use_tensor_rate(next(block.parameters()).device)
                        block.compile(dynamic=False)
                    else:  # the kept samples' count varies from step to step: dynamic shapes
                        block.attn.compile()
                        block.mlp.compile()
                    compiled += 1
    if compiled == 0:
        raise UserError("--compile applies to the transformer blocks of ViT backbones; this model has none")
    for model in models:
        _ddp_ignore_rate_buffers(model)
    return compiled


def _ddp_ignore_rate_buffers(model):
    """Drop path's rate buffers are equal on every rank by construction: DistributedDataParallel need not broadcast
    them at every forward (a collective per step that the eager model, without buffers, never had)."""
    names = [f"{name}.{module.RATE_BUFFER}" for name, module in model.named_modules()
             if getattr(module, "RATE_BUFFER", None) in getattr(module, "_buffers", {})]
    ignore = getattr(nn.parallel.DistributedDataParallel, "_set_params_and_buffers_to_ignore_for_model", None)
    if names and ignore is not None:
        ignore(model, sorted(set(getattr(model, "_ddp_params_and_buffers_to_ignore", ())) | set(names)))


def cuda_graph_unsupported_reason(kind, compiled, precision_mode, sync_batchnorm=False):
    """--cuda_graph needs CUDA and replaces the backbone's forward, which --compile and apex also take over."""
    if kind != "cuda":
        return f"--cuda_graph needs an NVIDIA GPU (CUDA graphs); this run is on {kind}"
    if compiled:
        return "--cuda_graph and --compile exclude each other: use one of them"
    if precision_mode == "apex_o1":
        return "--cuda_graph does not work with apex O1 (it patches functions at run time)"
    if sync_batchnorm:  # its collectives would be captured into the graph
        return "--cuda_graph does not work with SyncBatchNorm (a backbone with batch norms on several GPUs)"
    return None


class _BackboneCall(nn.Module):
    """The backbone's own forward as a module of its own, for one input shape: make_graphed_callables replaces
    this module's forward, not the backbone's, and its parameters are the backbone's."""
    def __init__(self, backbone, forward):
        super().__init__()
        self.backbone = backbone
        self._forward = forward

    def forward(self, x):
        return self._forward(x)


def _autocast_enabled(device_type):
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no argument, CUDA's state (the only device graphs run on)
        return torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_cpu_enabled()


def _graph_key(x, training, grad_enabled, autocast):
    """What a backbone call must match to replay a graph captured for it."""
    return tuple(x.shape), x.dtype, training, grad_enabled, autocast


def backbone_calls_of_step(student, teacher, crops):
    """The backbone calls a DINO step makes, in order, as graph_backbones takes them: the teacher on the two
    global crops (no gradients), then the student once per run of crops of one resolution."""
    calls = [(teacher.backbone, torch.cat(crops[:2]), False)]
    return calls + [(student.backbone, torch.cat(crops[start:end]), True)
                    for start, end in MultiCropWrapper.resolution_groups(crops)]


def graph_backbones(calls, accelerator, precision, make_graphed=None):
    """--cuda_graph: each backbone's forward (and backward) for the given inputs becomes a CUDA graph replay.

    calls: (backbone, sample input, grad enabled) in the order the step runs them (teacher, student's global
    crops, student's local crops). A GPU step of the eager model is host-bound (thousands of kernel launches of
    a few microseconds each); a replay launches each graph at once. The backbone keeps its parameters and names
    (checkpoints unchanged); a call with another shape, dtype, mode or precision runs the eager forward. Warm-up
    and capture run forward and backward without touching the weights, and the random state is put back, so the
    run draws what an eager run draws. Returns the number of graphed calls.
    """
    make_graphed = make_graphed or torch.cuda.make_graphed_callables
    originals = {}  # id(backbone) -> (backbone, its own forward, {graph key: graphed call})
    for backbone, _, _ in calls:
        originals.setdefault(id(backbone), (backbone, backbone.forward, {}))
    wrappers = [_BackboneCall(backbone, originals[id(backbone)][1]) for backbone, _, _ in calls]
    samples = [(sample.detach().clone().requires_grad_(False),) for _, sample, _ in calls]
    autocast_dtype = precision.autocast_dtype
    cpu_state, device_state = torch.get_rng_state(), accelerator.get_rng_state()
    try:
        # make_graphed_callables refuses autocast's weight-cast cache: a cached cast would be baked into the graph
        with torch.autocast(device_type=accelerator.kind, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None, cache_enabled=False):
            options = {}
            if "capture_error_mode" in inspect.signature(make_graphed).parameters:
                options["capture_error_mode"] = "thread_local"  # other threads' CUDA calls may go on meanwhile
            graphed = make_graphed(tuple(wrappers), tuple(samples), **options)
    except (RuntimeError, AssertionError) as err:  # an op that cannot be captured: say which, in one line
        raise UserError(f"--cuda_graph: capturing the backbones failed ({str(err).strip().splitlines()[0]}); "
                        f"run without --cuda_graph") from err
    finally:
        torch.set_rng_state(cpu_state)
        accelerator.set_rng_state(device_state)
    for (backbone, sample, grad_enabled), call in zip(calls, graphed):
        key = _graph_key(sample, backbone.training, grad_enabled, autocast_dtype is not None)
        originals[id(backbone)][2][key] = call
    for backbone, original, table in originals.values():

        def dispatch(x, _backbone=backbone, _original=original, _table=table):
            call = None
            if isinstance(x, torch.Tensor):
                call = _table.get(_graph_key(x, _backbone.training, torch.is_grad_enabled(),
                                             _autocast_enabled(x.device.type)))
            return call(x) if call is not None else _original(x)
        backbone.forward = dispatch
    return len(wrappers)


def is_dist_avail_and_initialized():
    return dist.is_available() and dist.is_initialized()


def get_world_size():
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank():
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process():
    return get_rank() == 0


_COLLECTIVE_DEVICE = torch.device("cpu")


def collective_device():
    """gloo reduces CPU tensors; nccl and hccl need device tensors."""
    return _COLLECTIVE_DEVICE


def all_reduce_sum(tensor):
    if is_dist_avail_and_initialized():
        dist.all_reduce(tensor)
    return tensor


def reduce_dict(input_dict, average=True):
    """The reference's helper: every process gets the sum (or mean) over processes of each value."""
    world_size = get_world_size()
    if world_size < 2:
        return input_dict
    with torch.no_grad():
        names = sorted(input_dict)
        values = torch.stack([torch.as_tensor(input_dict[k]) for k in names])
        reduced = all_reduce_sum(values.to(collective_device())).to(values.device)
        if average:
            reduced = reduced / world_size
    return dict(zip(names, reduced))


def setup_for_distributed(is_master):
    """Silences print on non-master processes unless print(..., force=True)."""
    builtin_print = getattr(builtins, "_dino_original_print", builtins.print)
    builtins._dino_original_print = builtin_print

    def print(*args, **kwargs):
        force = kwargs.pop('force', False)
        if is_master or force:
            builtin_print(*args, **kwargs)
    builtins.print = print


def _slurm_master_addr():
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        return "127.0.0.1"
    try:
        out = subprocess.check_output(["scontrol", "show", "hostnames", nodelist], stderr=subprocess.DEVNULL)
        return out.decode().split()[0]
    except Exception:
        return nodelist.split(",")[0].split("[")[0]


def distributed_env(environ=None):
    """(rank, world_size, local_rank) from torchrun/launch variables, SLURM, or a lone process."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", rank))
        return rank, world, local
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def init_distributed_mode(args):
    """Sets args.rank/world_size/gpu, picks the device, joins the process group; returns the Accelerator.

    A lone process (no launcher) needs no process group and no port.
    """
    rank, world_size, local_rank = distributed_env()
    under_slurm = "SLURM_PROCID" in os.environ and "RANK" not in os.environ
    accel = Accelerator.create(getattr(args, "device", "auto"), local_rank, wrap_index=under_slurm)
    args.rank, args.world_size, args.gpu = rank, world_size, accel.index
    if world_size > 1:
        if under_slurm:
            os.environ.setdefault("MASTER_ADDR", _slurm_master_addr())
            os.environ.setdefault("MASTER_PORT", "29500")
        timeout = datetime.timedelta(seconds=getattr(args, "dist_timeout", 1800))
        init_method = getattr(args, "dist_url", "env://")
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if restart is not None and init_method == "env://":
            # After a torchrun restart the agent's store still holds the dead attempt's keys, and
            # gloo would connect to the old addresses: give each attempt its own key space.
            store, _, _ = next(dist.rendezvous(init_method, rank, world_size, timeout=timeout))
            store = dist.PrefixStore(f"dino_attempt_{restart}/", store)
            dist.init_process_group(backend=accel.dist_backend, store=store, world_size=world_size, rank=rank,
                                    timeout=timeout)
        else:
            dist.init_process_group(backend=accel.dist_backend, init_method=init_method,
                                    world_size=world_size, rank=rank, timeout=timeout)
        global _COLLECTIVE_DEVICE
        _COLLECTIVE_DEVICE = accel.device
        dist.barrier()
    print(f'| distributed init (rank {rank}/{world_size}): {accel.describe()}', flush=True)
    setup_for_distributed(rank == 0)
    return accel


def cleanup_distributed():
    if is_dist_avail_and_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------

def _safe_globals():
    """Types that reference checkpoints pickle besides tensors: the argparse Namespace and numpy scalars."""
    allowed = [argparse.Namespace, np.dtype, np.ndarray]
    try:
        from numpy.core.multiarray import scalar, _reconstruct
    except ImportError:
        scalar = _reconstruct = None
    try:
        from numpy._core.multiarray import scalar as scalar2, _reconstruct as reconstruct2
        allowed += [scalar2, reconstruct2]
    except ImportError:
        pass
    allowed += [x for x in (scalar, _reconstruct) if x is not None]
    allowed += [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")]
    return allowed


def check_file_flag(path, flag):
    """A file named by a flag (a checkpoint, weights) exists and is no folder, or a UserError naming both."""
    if os.path.isdir(path):
        raise UserError(f"{flag}: {path} is a folder, not a checkpoint file")
    if not os.path.isfile(path):
        raise UserError(f"{flag}: no such file: {path}")


def load_checkpoint_file(path, map_location="cpu"):
    """Loads a checkpoint without executing code from it (weights_only with an allow-list).

    Raises UserError for a missing, truncated, corrupt or unsafe file.
    """
    if os.path.isdir(path):
        raise UserError(f"{path} is a folder, not a checkpoint file")
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive, or a bare pickle with the legacy format
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise UserError(f"{path} is not a PyTorch checkpoint (neither a torch.save archive nor a pickle)")
    scoped = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    register = getattr(torch.serialization, "add_safe_globals", None)  # torch >= 2.4, process-wide
    if scoped is None and register is not None:
        register(_safe_globals())
    try:
        with scoped(_safe_globals()) if scoped is not None else contextlib.nullcontext():
            return torch.load(path, map_location=map_location, weights_only=True)
    except TypeError as err:
        if "weights_only" in str(err):
            raise UserError(f"loading {path} safely needs torch >= 1.13 (weights_only)") from err
        raise UserError(f"{path} is not a readable checkpoint: {err}") from err
    except Exception as err:  # the pickle error types differ between torch versions
        text = str(err).splitlines()[0] if str(err) else type(err).__name__
        unsafe = re.search(r"(?:global: |unsupported )GLOBAL ([\w.]+)", str(err))
        if unsafe:
            text = f"it names {unsafe.group(1)}"
        if scoped is None and register is None and re.search(r"argparse\.Namespace|numpy", str(err)):
            # the package's own checkpoints need no allow-list; the reference's pickle its args as a Namespace
            raise UserError(f"{path} holds argparse or numpy objects (as reference checkpoints do), which torch "
                            f"{torch.__version__} cannot load safely: load it with torch >= 2.4") from err
        if "weights_only" in str(err) or unsafe or "GLOBAL" in str(err):
            raise UserError(f"refusing to load {path}: it asks to run code or build objects that are not "
                            f"plain tensors and numbers ({text})") from err
        raise UserError(f"{path} is not a readable checkpoint (truncated or corrupt?): {text}") from err


def save_atomic(obj, path, *torch_save_args, **torch_save_kwargs):
    """Writes to a temporary file in the same folder, fsyncs, then renames over `path`.

    A crash or a full disk during the save leaves the previous file intact.
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f, *torch_save_args, **torch_save_kwargs)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise UserError(f"could not write checkpoint {path}: {err.strerror or err}; "
                        f"the previous checkpoint (if any) is intact") from err
    with contextlib.suppress(OSError):  # the checkpoint is written: a failed cleanup must not fail the save
        remove_stale_temporaries(path)
    with contextlib.suppress(OSError):  # make the rename itself durable
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_stale_temporaries(path):
    """Deletes what save_atomic calls killed mid-write left beside `path` (their process is gone)."""
    folder, prefix = os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp."
    for name in os.listdir(folder):
        pid = name[len(prefix):]
        if not name.startswith(prefix) or not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)  # no error: a live process may still be writing it
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, name))
        except OSError:
            pass  # another user's live process


def save_on_master(obj, f, *args, **kwargs):
    """torch.save on the main process only, as the reference; a path is written atomically (save_atomic)."""
    if not is_main_process():
        return
    if isinstance(f, (str, os.PathLike)):
        save_atomic(obj, os.fspath(f), *args, **kwargs)
    else:
        torch.save(obj, f, *args, **kwargs)


def strip_prefixes(state_dict, prefixes=("module.", "backbone.")):
    """Removes the given prefixes, each only where a key starts with it, in order."""
    out = {}
    for k, v in state_dict.items():
        for prefix in prefixes:
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def restart_from_checkpoint(ckp_path, run_variables=None, **kwargs):
    """The reference's resume helper: loads each named entry into the given object."""
    if not os.path.isfile(ckp_path):
        return
    print("Found checkpoint at {}".format(ckp_path))
    checkpoint = load_checkpoint_file(ckp_path)
    for key, value in kwargs.items():
        if key in checkpoint and value is not None:
            try:
                msg = value.load_state_dict(checkpoint[key], strict=False)
            except TypeError:
                try:
                    msg = value.load_state_dict(checkpoint[key])
                except ValueError:
                    print("=> failed to load '{}' from checkpoint: '{}'".format(key, ckp_path))
                    continue
            print("=> loaded '{}' from checkpoint '{}' with msg {}".format(key, ckp_path, msg))
        else:
            print("=> key '{}' not found in checkpoint: '{}'".format(key, ckp_path))
    if run_variables is not None:
        for var_name in run_variables:
            if var_name in checkpoint:
                run_variables[var_name] = checkpoint[var_name]


def load_pretrained_weights(model, pretrained_weights, checkpoint_key, model_name=None, patch_size=None,
                            strict=True):
    """Loads a backbone from a training checkpoint or released weights; never downloads anything.

    Keys lose their 'module.' and 'backbone.' prefixes; head keys are ignored.
    """
    if not pretrained_weights:
        raise UserError("no --pretrained_weights given (pass a file, or ask for random weights explicitly)")
    state = load_checkpoint_file(pretrained_weights)
    if checkpoint_key is not None and isinstance(state, dict) and checkpoint_key in state:
        print(f"Take key {checkpoint_key} in provided checkpoint dict")
        state = state[checkpoint_key]
    elif isinstance(state, dict) and any(k in state for k in ("teacher", "student")) and checkpoint_key:
        raise UserError(f"{pretrained_weights} has no key {checkpoint_key!r} "
                        f"(it has: {', '.join(sorted(k for k in state if isinstance(k, str)))})")
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"{pretrained_weights} does not hold a state dict of tensors")
    state = strip_prefixes(state)
    # a classifier the backbone no longer has (a head, or a torchvision fc replaced by Identity, as the
    # reference does) has nowhere to go: left out, as the reference's non-strict load leaves it
    dropped = ("head.", "fc.") if isinstance(getattr(model, "fc", None), nn.Identity) else ("head.",)
    state = {k: v for k, v in state.items() if not k.startswith(dropped)}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if strict and (missing or unexpected or wrong_shape):
        def few(keys):
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
        problems = []
        if missing:
            problems.append(f"missing keys: {few(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {few(unexpected)}")
        if wrong_shape:
            problems.append(f"shape mismatch: {few(wrong_shape)}")
        arch = f" for {model_name}" + (f"/{patch_size}" if patch_size else "") if model_name else ""
        raise UserError(f"{pretrained_weights} does not match the backbone{arch}: " + "; ".join(problems))
    msg = model.load_state_dict(state, strict=strict)
    print('Pretrained weights found at {} and loaded with msg: {}'.format(pretrained_weights, msg))
    return msg
