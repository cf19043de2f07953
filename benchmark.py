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
"""Side-by-side throughput: the reference's way of computing a DINO step or a sample, against this package's.

--what step: one training step (teacher forward, student forward and backward, loss, clipping, AdamW, EMA) on
    synthetic crops, computed A) as the reference does (explicit-softmax attention, the last block for every
    token, drop path masking branches computed for every sample, the head's weight-norm weight built every
    forward, the loss as a double loop over view pairs, per-parameter clipping and EMA loops with host syncs,
    AdamW without foreach, fp16 autocast with a GradScaler on GPUs and fp32 on CPUs) and B) as this package's
    trainer does (SDPA attention, explicit on CPUs in bf16, the last block for the class token only, on CPUs
    the branches of the samples drop path keeps only and oneDNN's fp32 linear layers (x86), the head's outputs
    scaled (and the norm's gradient added in place), the loss as one matmul, fused clipping and EMA, the fastest
    exact AdamW, the precision of utils.resolve_precision_mode).
    Same initial weights, crops and batch; A and B alternate (A, B, A, B, ...), medians reported.
--what data: images/s of one process (one core, no DataLoader) turning JPEG files into the multi-crop views:
    the reference's augmentation, the same inside the seeding wrapper main_dino.MultiCropDataset, and the
    --use_color_jitter_opti fast path (unwrapped and wrapped); then both wrapped pipelines as the workers of a
    GPU or NPU run them, handing over uint8 crops that the device normalizes.
"""
import argparse
import copy
import ctypes
import json
import math
import os
import statistics
import tempfile
import threading
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import main_dino
import utils
import vision_transformer as vits
from utils import UserError

# Dense tensor-core peaks (TFLOP/s) for MFU, by the name torch reports; fp32 is without TF32 (off here).
PEAK_TFLOPS = [
    ("H200", {"fp16": 989.0, "bf16": 989.0, "fp32": 67.0}),
    ("H100 PCIe", {"fp16": 756.0, "bf16": 756.0, "fp32": 51.0}),
    ("H100", {"fp16": 989.0, "bf16": 989.0, "fp32": 67.0}),
    ("A100", {"fp16": 312.0, "bf16": 312.0, "fp32": 19.5}),
    ("L40S", {"fp16": 362.0, "bf16": 362.0, "fp32": 91.6}),
    ("V100", {"fp16": 125.0, "fp32": 15.7}),
]


def get_args_parser():
    p = main_dino.OneLineErrorParser("benchmark", allow_abbrev=False, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", default="all", choices=["step", "data", "all"])
    p.add_argument("--arch", default="vit_small", choices=main_dino.VIT_ARCHS)
    p.add_argument("--patch_size", default=16, type=int)
    p.add_argument("--out_dim", default=65536, type=int)
    p.add_argument("--batch_size", default=64, type=int, help="images per step (each gives all the crops)")
    p.add_argument("--local_crops_number", default=8, type=int)
    p.add_argument("--global_crop_size", default=224, type=int)
    p.add_argument("--local_crop_size", default=96, type=int)
    p.add_argument("--drop_path_rate", default=0.1, type=float)
    p.add_argument("--device", default="auto", choices=utils.DEVICE_CHOICES)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="precision of this package's step; auto: what main_dino.py picks from --amp/--use_fp16")
    p.add_argument("--amp", action="store_true", help="as main_dino.py --amp (bf16 on GPUs and CPUs)")
    p.add_argument("--use_fp16", default=True, type=utils.bool_flag, help="as main_dino.py --use_fp16")
    p.add_argument("--steps", default=5, type=int, help="timed steps of each side per round")
    p.add_argument("--warmup", default=2, type=int, help="untimed steps of each side before the rounds")
    p.add_argument("--rounds", default=5, type=int, help="A,B alternations; medians over rounds")
    p.add_argument("--round_warmup", default=0, type=int,
                   help="untimed steps of each side right before its timed steps in every round, so that these "
                        "follow the side's own step, as in training, not the other side's (memory the other "
                        "side freed and the host took back, caches); 0: plain alternation")
    p.add_argument("--compile", action="store_true",
                   help="add side C: B with main_dino.py --compile (each transformer block compiled)")
    p.add_argument("--cuda_graph", action="store_true",
                   help="add side G: B with main_dino.py --cuda_graph (the backbones replayed as CUDA graphs; GPUs)")
    p.add_argument("--threads", default=0, type=int, help="torch threads for the step (0: torch's default)")
    p.add_argument("--peak_tflops", default=0.0, type=float,
                   help="device peak for MFU when the device is not in the built-in table")
    p.add_argument("--data_images", default=30, type=int, help="images per pipeline per round (--what data)")
    p.add_argument("--photos_dir", default="", help="JPEG files to augment (default: scikit-image photos)")
    p.add_argument("--profile", default=0, type=int, metavar="N",
                   help="after the rounds, profile one step of each side and print its N costliest ops (device "
                        "time on GPUs, with the host's total beside it: a step whose host time exceeds its device "
                        "time waits on kernel launches)")
    p.add_argument("--json", default="", help="also write the results to this JSON file")
    return p


def median(values):
    return statistics.median(values) if values else float("nan")


# ---------------------------------------------------------------------------
# The reference's computation (for side A)
# ---------------------------------------------------------------------------

class ReferenceDINOLoss(nn.Module):
    """The reference's DINOLoss, computed as it computes it: a log-softmax per (teacher view, student view) pair."""
    def __init__(self, out_dim, ncrops, teacher_temp=0.04, student_temp=0.1, center_momentum=0.9):
        super().__init__()
        self.student_temp = student_temp
        self.teacher_temp = teacher_temp
        self.center_momentum = center_momentum
        self.ncrops = ncrops
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_output, teacher_output):
        student_out = (student_output / self.student_temp).chunk(self.ncrops)
        teacher_out = F.softmax((teacher_output - self.center) / self.teacher_temp, dim=-1)
        teacher_out = teacher_out.detach().chunk(2)
        total_loss = 0
        n_loss_terms = 0
        for iq, q in enumerate(teacher_out):
            for v in range(len(student_out)):
                if v == iq:
                    continue
                loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
                total_loss += loss.mean()
                n_loss_terms += 1
        total_loss /= n_loss_terms
        self.update_center(teacher_output)
        return total_loss

    @torch.no_grad()
    def update_center(self, teacher_output):
        batch_center = utils.all_reduce_sum(torch.sum(teacher_output, dim=0, keepdim=True))
        batch_center = batch_center / (len(teacher_output) * utils.get_world_size())
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)


def reference_weight_norm_forward(layer):
    """The reference's head output layer (nn.utils.weight_norm): build the weight g v / ||v||, then a linear."""
    def forward(x):
        return F.linear(x, layer.weight)
    return forward


# Steady-state schedule values: epoch 1, so the last layer is not frozen (freeze_last_layer=1).
EPOCH, LR, WD, MOMENTUM, CLIP, FREEZE_LAST_LAYER = 1, 5e-4, 0.04, 0.996, 3.0, 1


def set_lr_and_wd(optimizer):
    """The trainer's per-step schedule update, with fixed values (only the first group is regularized)."""
    for i, param_group in enumerate(optimizer.param_groups):
        param_group["lr"] = LR
        if i == 0:
            param_group["weight_decay"] = WD


def set_backbone_fast_paths(backbone, enabled):
    """SDPA attention, q/k/v by unbind, the class-token-only last block, drop path's sample skipping and oneDNN's
    fp32 linear layers on CPUs, or the reference's forms."""
    backbone.set_fused_attention(enabled)
    backbone.last_block_cls_only = enabled
    for block in backbone.blocks:
        block.skip_dropped_samples = enabled
        block.attn.unbind_qkv = enabled
    for module in backbone.modules():
        if isinstance(module, vits.Linear):
            module.onednn_on_cpu = enabled


class ReferenceStep(object):
    """Side A: one step of the reference's train_one_epoch, single process."""
    def __init__(self, student, teacher, args, accel):
        self.name = "reference-equivalent"
        self.accel = accel
        self.student, self.teacher = student, teacher
        for m in (student, teacher):
            set_backbone_fast_paths(m.backbone, False)
            m.head.last_layer.forward = reference_weight_norm_forward(m.head.last_layer)
        self.loss = accel.to(ReferenceDINOLoss(args.out_dim, args.local_crops_number + 2))
        self.optimizer = torch.optim.AdamW(utils.get_params_groups(student), foreach=False)
        self.mode = "fp16" if accel.kind in ("cuda", "npu") else "fp32"  # the reference: --use_fp16 on GPUs
        self.precision = utils.Precision(self.mode, accel)
        self.ema = utils.TeacherEMA(student, teacher, fused=False)

    def __call__(self, images):
        set_lr_and_wd(self.optimizer)
        with self.precision.autocast():
            teacher_output = self.teacher(images[:2])
            student_output = self.student(images)
            loss = self.loss(student_output, teacher_output)
        if not math.isfinite(loss.item()):
            raise UserError(f"reference-equivalent step: loss is {loss.item()}")
        self.optimizer.zero_grad()
        scaler = self.precision.scaler
        if scaler is None:
            loss.backward()
            utils.clip_gradients(self.student, CLIP, fused=False)
            utils.cancel_gradients_last_layer(EPOCH, self.student, FREEZE_LAST_LAYER)
            self.optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.unscale_(self.optimizer)
            utils.clip_gradients(self.student, CLIP, fused=False)
            utils.cancel_gradients_last_layer(EPOCH, self.student, FREEZE_LAST_LAYER)
            scaler.step(self.optimizer)
            scaler.update()
        self.ema.update(MOMENTUM)
        self.accel.synchronize()
        loss.item()  # the reference logs the loss every step
        return loss.detach()


class PackageStep(object):
    """Side B: one step as main_dino.Trainer.train_one_epoch runs it."""
    def __init__(self, student, teacher, args, accel, mode, compiled=False, graphed=False):
        self.name = ("this package, compiled blocks" if compiled else
                     "this package, CUDA graphs" if graphed else "this package")
        self.accel = accel
        self.student, self.teacher = student, teacher
        for m in (student, teacher):
            set_backbone_fast_paths(m.backbone, True)
        self.loss = accel.to(main_dino.DINOLoss(args.out_dim, args.local_crops_number + 2, 0.04, 0.04, 0,
                                                EPOCH + 1))
        self.optimizer = utils.build_optimizer("adamw", utils.get_params_groups(student), accel)
        self.mode = mode
        self.precision = utils.Precision(mode, accel)
        self.ema = utils.TeacherEMA(student, teacher, fused=True)
        self.pending_nonfinite = None
        if compiled:
            utils.compile_repeated_blocks([student, teacher], accel)
        self.graphs_pending = graphed

    def __call__(self, images):
        if self.graphs_pending:  # as main_dino.Trainer.capture_graphs, at the first step
            self.graphs_pending = False
            utils.graph_backbones(utils.backbone_calls_of_step(self.student, self.teacher, images), self.accel,
                                  self.precision)
        set_lr_and_wd(self.optimizer)
        with self.precision.autocast():
            with torch.no_grad():
                teacher_output = self.teacher(images[:2])
            student_output = self.student(images)
            loss = self.loss(student_output, teacher_output, EPOCH)
        self.precision.zero_grad(self.optimizer)
        self.precision.backward(loss, self.optimizer)
        if self.pending_nonfinite is not None and self.pending_nonfinite.get().item():  # the previous step's flag
            raise UserError("this package's step: loss is not finite")
        self.pending_nonfinite = self.accel.host_copy(~torch.isfinite(loss.detach()))
        main_dino.clip_freeze_and_step(self.precision, self.optimizer, self.student, EPOCH, CLIP, FREEZE_LAST_LAYER)
        self.ema.update(MOMENTUM)
        return loss.detach()


def uses_onednn_linear(side, key, accel):
    """Whether the side's backbone computes its linear layers with oneDNN: asks one of its layers
    (vision_transformer.Linear) about an fp32 input on the side's device; a compiled side (C) never does."""
    layer = next((m for m in side.student.modules() if isinstance(m, vits.Linear)), None)
    return (key != "C" and side.mode == "fp32" and layer is not None
            and layer._onednn_suits(torch.zeros(1, layer.in_features, device=accel.device)))


def resolve_package_mode(args, accel):
    if args.precision != "auto":
        return args.precision
    return utils.resolve_precision_mode(accel.kind, amp=args.amp, use_fp16=args.use_fp16,
                                        apex_available=False, bf16_supported=accel.bf16_supported)


def peak_tflops(args, accel, mode):
    if args.peak_tflops > 0:
        return args.peak_tflops
    if accel.kind != "cuda":
        return None
    name = accel.describe()
    for key, peaks in PEAK_TFLOPS:
        if key in name:
            return peaks.get(mode)
    return None


def step_flops(step, images):
    """FLOPs of one training step (teacher forward, student forward and backward), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        step(images)
    return counter.get_total_flops()


def _rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _trim_heap():
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def cpu_step_memory_mb(step, images):
    """Resident memory growth during one step (sampled every millisecond), after returning free heap pages."""
    if not os.path.exists("/proc/self/statm"):
        return None
    _trim_heap()
    base = _rss_mb()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.001)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        step(images)
    finally:
        done.set()
        sampler.join()
    return max(peak[0], _rss_mb()) - base


def profile_step(step, images, accel, rows):
    """torch.profiler's table of one step: (table text, host milliseconds, device milliseconds or None)."""
    from torch.profiler import ProfilerActivity, profile
    on_gpu = accel.kind == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    accel.synchronize()
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        step(images)
        accel.synchronize()
    host_ms = 1e3 * (time.perf_counter() - start)
    events = prof.key_averages()
    device_ms = kernel_time_ms(events) if on_gpu else None
    table = events.table(sort_by="self_cuda_time_total" if on_gpu else "self_cpu_time_total", row_limit=rows)
    return table, host_ms, device_ms


def kernel_time_ms(events):
    """Milliseconds the device spent in kernels and copies, as the profiler table's footer counts them: device-side
    events only (the CPU ops that launched them carry the same time again), without user annotations (spans such
    as the optimizer step's, which contain kernels already counted)."""
    total = 0.0
    for e in events:
        device_type = getattr(e, "device_type", None)
        if device_type is None or getattr(device_type, "name", "") == "CPU" or getattr(e, "is_user_annotation", False):
            continue
        total += getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)
    return total / 1e3


def time_steps(step, images, n, accel):
    """(wall-clock seconds, CPU seconds of this process) for n steps."""
    accel.synchronize()
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(n):
        step(images)
    accel.synchronize()
    return time.perf_counter() - start, time.process_time() - cpu_start


def build_sides(args, accel, mode_b):
    """Sides A and B (and C, B compiled, with --compile) from the same initial weights, and one batch of
    synthetic crops on the device."""
    ns = argparse.Namespace(arch=args.arch, patch_size=args.patch_size, out_dim=args.out_dim,
                            drop_path_rate=args.drop_path_rate, use_bn_in_head=False, norm_last_layer=True)
    torch.manual_seed(0)
    student, teacher = main_dino.build_student_teacher(ns)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    sides = {"B": PackageStep(accel.to(copy.deepcopy(student)), accel.to(copy.deepcopy(teacher)), args, accel,
                              mode_b)}
    if getattr(args, "compile", False):
        sides["C"] = PackageStep(accel.to(copy.deepcopy(student)), accel.to(copy.deepcopy(teacher)), args, accel,
                                 mode_b, compiled=True)
    if getattr(args, "cuda_graph", False):
        sides["G"] = PackageStep(accel.to(copy.deepcopy(student)), accel.to(copy.deepcopy(teacher)), args, accel,
                                 mode_b, graphed=True)
    sides = {"A": ReferenceStep(accel.to(student), accel.to(teacher), args, accel), **sides}
    g = torch.Generator().manual_seed(0)
    images = [accel.to(torch.randn(args.batch_size, 3, s, s, generator=g)) for s in main_dino.crop_sizes(args)]
    return sides, images


def bench_step(args, accel):
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    mode_b = resolve_package_mode(args, accel)
    if mode_b == "fp16" and accel.kind == "cpu":
        raise UserError("--precision fp16 needs a GPU or NPU (CPUs: fp32 or bf16)")
    if args.cuda_graph:
        reason = utils.cuda_graph_unsupported_reason(accel.kind, False, mode_b)
        if reason:
            raise UserError(reason)
    sides, images = build_sides(args, accel, mode_b)
    sizes = [im.shape[-1] for im in images]
    keys = list(sides)
    fast = [k for k in keys if k != "A"]

    threads = torch.get_num_threads() if accel.kind == "cpu" else None
    print(f"step: {args.arch}/{args.patch_size}, batch {args.batch_size}, crops 2x{args.global_crop_size}"
          f" + {args.local_crops_number}x{args.local_crop_size}, out_dim {args.out_dim}, on "
          f"{accel.describe()}" + (f" ({threads} threads)" if threads else "")
          + (f"; in every round, {args.round_warmup} untimed step(s) of each side before its timed ones"
             if args.round_warmup else ""), flush=True)
    print(f"  A {sides['A'].name}: {sides['A'].mode}, explicit attention, last block for every token, drop path masks "
          f"branches, weight-norm weight built, loss double loop, per-parameter clip/EMA loops, AdamW(foreach=False)")
    for key in fast:
        side = sides[key]
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(side.mode, torch.float32)
        attention = "SDPA attention" if vits.Attention.sdpa_suits(accel.kind, dtype) else "explicit attention"
        onednn = ", oneDNN linear layers" if uses_onednn_linear(side, key, accel) else ""
        print(f"  {key} {side.name}: {side.mode}, {attention}{onednn}, last block for the class token, "
              f"drop path skips samples (CPU), weight-norm by output scaling (hand-written backward), DINOLoss matmul, "
              f"fused clip/EMA, {type(side.optimizer).__name__}({_optimizer_kind(side.optimizer)})"
              + ((", torch.compile of each block's attention and MLP" if accel.kind == "cpu" else
                  ", torch.compile of each block") if key == "C" else "")
              + (", backbones replayed as CUDA graphs" if key == "G" else ""), flush=True)

    def leave_out_g(err):
        # G (never run on a GPU before) must not cost the A/B measurement of the same run
        print(f"  G left out: {first_line(err)}", flush=True)
        del sides["G"]
        keys.remove("G")
        fast.remove("G")

    # memory each side holds beyond the shared weights: optimizer state, gradients and CUDA-graph pools, made
    # during its warm-up, and what one step allocates on top (all sides' weights stay resident in one process)
    state_mb, step_mb = {}, {key: [] for key in keys}
    for key in list(keys):
        before = accel.memory_mb()
        try:
            for _ in range(args.warmup if key not in ("C", "G") else max(args.warmup, 2)):  # C compiles, G captures
                sides[key](images)
        except Exception as err:
            if key != "G":
                raise
            leave_out_g(err)
            continue
        accel.synchronize()
        state_mb[key] = accel.memory_mb() - before if before is not None else None
    flops = step_flops(sides["A"], images)  # explicit attention: every matmul is visible to the counter

    results = {key: {"img_s": [], "img_cpu_s": [], "mem_mb": []} for key in keys}
    ratios = {key: [] for key in fast}
    cpu_ratios = {key: [] for key in fast}
    for r in range(args.rounds):
        rates, cpu_rates = {}, {}
        for key in list(keys):  # A, B(, C, G), A, B(, C, G), ...
            accel.reset_peak_memory()
            before = accel.memory_mb()
            try:
                for _ in range(args.round_warmup):
                    sides[key](images)
                elapsed, cpu_elapsed = time_steps(sides[key], images, args.steps, accel)
            except Exception as err:
                if key != "G":
                    raise
                leave_out_g(err)
                del results["G"], ratios["G"], cpu_ratios["G"]
                continue
            rates[key] = args.steps * args.batch_size / elapsed
            cpu_rates[key] = args.steps * args.batch_size / max(cpu_elapsed, 1e-9)
            results[key]["img_s"].append(rates[key])
            results[key]["img_cpu_s"].append(cpu_rates[key])
            if accel.kind != "cpu":
                results[key]["mem_mb"].append(accel.max_memory_mb())
                step_mb[key].append(accel.max_memory_mb() - before)
        for key in fast:
            ratios[key].append(rates[key] / rates["A"])
            cpu_ratios[key].append(cpu_rates[key] / cpu_rates["A"])
        text = ", ".join(f"{k} {rates[k]:.2f}" for k in keys) + " img/s, " + ", ".join(
            f"{k}/A {ratios[k][-1]:.2f}x" for k in fast)
        if accel.kind == "cpu":
            text += " (per CPU-second: " + ", ".join(f"{k}/A {cpu_ratios[k][-1]:.2f}x" for k in fast) + ")"
        print(f"  round {r + 1}/{args.rounds}: {text}", flush=True)
    if accel.kind == "cpu":
        for key in keys:
            grown = cpu_step_memory_mb(sides[key], images)
            results[key]["mem_mb"] = [grown] if grown is not None else []

    summary = {"what": "step", "device": accel.describe(), "threads": threads, "arch": args.arch,
               "patch_size": args.patch_size, "batch_size": args.batch_size, "out_dim": args.out_dim,
               "crops": sizes, "round_warmup": args.round_warmup, "compile": "C" in sides,
               "cuda_graph": "G" in sides, "step_gflop": flops / 1e9,
               **{f"{k}_precision": sides[k].mode for k in keys},
               **{f"{k}_onednn_linear": uses_onednn_linear(sides[k], k, accel) for k in keys}}
    print(f"  model FLOPs per step: {flops / 1e9:.1f} GFLOP")
    for key in keys:
        side = sides[key]
        rate = median(results[key]["img_s"])
        tflops = flops * rate / args.batch_size / 1e12
        peak = peak_tflops(args, accel, side.mode)
        mem = max(results[key]["mem_mb"]) if results[key]["mem_mb"] else None
        own_step = max(step_mb[key]) if step_mb.get(key) else None
        own_state = state_mb.get(key)
        own = own_state + own_step if own_state is not None and own_step is not None else None
        if mem is None:
            mem_text = "n/a"
        elif accel.kind == "cpu":
            mem_text = f"{mem:.0f} MB resident growth in one step"
        else:
            mem_text = f"{mem:.0f} MB peak allocated (all sides' weights resident)"
            if own is not None:
                mem_text += (f"; its own {own:.0f} MB = state {own_state:.0f} (optimizer, gradients"
                             + (", graph pools" if key == "G" else "") + f") + step {own_step:.0f}")
        mfu = f", MFU {100 * tflops / peak:.1f}% of {peak:.0f} TFLOP/s" if peak else ""
        print(f"  {key} {side.name}: median {rate:.2f} img/s, {tflops:.3f} TFLOP/s{mfu}, memory {mem_text}")
        summary[key] = {"img_s_median": rate, "img_s_rounds": results[key]["img_s"], "tflops": tflops,
                        "mfu": tflops / peak if peak else None, "memory_mb": mem, "memory_own_mb": own,
                        "memory_state_mb": own_state, "memory_step_mb": own_step,
                        "img_per_cpu_s_rounds": results[key]["img_cpu_s"]}
    for key in fast:
        suffix = "" if key == "B" else f"_{key}"
        summary[f"ratio{suffix}_median"] = median(ratios[key])
        summary[f"ratio{suffix}_rounds"] = ratios[key]
        summary[f"cpu_time_ratio{suffix}_median"] = median(cpu_ratios[key])
        summary[f"cpu_time_ratio{suffix}_rounds"] = cpu_ratios[key]
        print(f"  speed-up {key}/A: {median(ratios[key]):.2f}x (median of per-round ratios; ratio of medians "
              f"{summary[key]['img_s_median'] / summary['A']['img_s_median']:.2f}x)", flush=True)
        if accel.kind == "cpu":
            print(f"  speed-up {key}/A in CPU time: {median(cpu_ratios[key]):.2f}x (median of per-round ratios; "
                  f"robust to other processes when --threads 1)", flush=True)
    if args.json:  # the numbers are safe before the profiler runs
        write_json(args.json, [summary])
    profiles = {}
    for key in keys if args.profile > 0 else ():
        try:
            table, host_ms, device_ms = profile_step(sides[key], images, accel, args.profile)
        except Exception as err:
            print(f"  profile of {key} failed: {first_line(err)}", flush=True)
            continue
        profiles[key] = {"host_ms": host_ms, "device_ms": device_ms}
        device_text = "" if device_ms is None else f", kernels {device_ms:.1f} ms"
        print(f"  profile of one step of {key} (wall {host_ms:.1f} ms under the profiler{device_text}):\n{table}",
              flush=True)
    if profiles:
        summary["profile"] = profiles
    return summary


def first_line(err):
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def write_json(path, results):
    with open(path, "w") as f:
        json.dump(results, f, indent=1)


def _optimizer_kind(optimizer):
    d = optimizer.defaults
    return "fused" if d.get("fused") else "foreach" if d.get("foreach") else "for-loop"


# ---------------------------------------------------------------------------
# Data pipeline
# ---------------------------------------------------------------------------

def write_photos(folder):
    try:
        from skimage import data
    except ImportError as err:
        raise UserError("--what data needs scikit-image for its test photos (pip install scikit-image), "
                        "or pass --photos_dir with JPEG files") from err
    from PIL import Image
    paths = []
    for name in ("astronaut", "coffee", "chelsea"):
        path = os.path.join(folder, f"{name}.jpg")
        Image.fromarray(getattr(data, name)()).save(path, quality=95)
        paths.append(path)
    return paths


def list_photos(folder):
    if not os.path.isdir(folder):
        raise UserError(f"--photos_dir is not a folder: {folder}")
    paths = sorted(os.path.join(folder, f) for f in os.listdir(folder)
                   if f.lower().endswith((".jpg", ".jpeg", ".png")))
    if not paths:
        raise UserError(f"--photos_dir has no .jpg/.jpeg/.png files: {folder}")
    return paths


def bench_data(args):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    try:
        with tempfile.TemporaryDirectory() as tmp:
            paths = list_photos(args.photos_dir) if args.photos_dir else write_photos(tmp)
            return _bench_data(args, paths)
    finally:
        torch.set_num_threads(threads)


def _bench_data(args, paths):
    def augmentation(fast, normalize=True):
        return main_dino.DataAugmentationDINO((0.4, 1.), (0.05, 0.4), args.local_crops_number, fast,
                                              global_crop_size=args.global_crop_size,
                                              local_crop_size=args.local_crop_size, normalize=normalize)
    samples = [(p, 0) for p in paths]

    def unwrapped(aug):
        def run(i):
            return aug(main_dino.load_rgb(paths[i % len(paths)]))
        return run

    def wrapped(aug):
        dataset = main_dino.MultiCropDataset(samples, aug, seed=0)

        def run(i):  # a new (epoch, index) per call, so that each call draws other crops
            return dataset[(i // len(samples), i % len(samples))]
        return run

    fast_available = hasattr(utils, "FastColorJitter") or hasattr(utils, "FastCropTransform")
    pipelines = [
        ("reference", unwrapped(augmentation(False))),
        ("faithful (MultiCropDataset)", wrapped(augmentation(False))),
        ("fast", unwrapped(augmentation(True))),
        ("fast (MultiCropDataset)", wrapped(augmentation(True))),
        # what a GPU's or NPU's workers make: uint8 crops, normalized on the device (utils.normalize_uint8_crops)
        ("faithful, uint8 (MultiCropDataset)", wrapped(augmentation(False, normalize=False))),
        ("fast, uint8 (MultiCropDataset)", wrapped(augmentation(True, normalize=False))),
    ]
    print(f"data: {len(paths)} JPEG files, 2x{args.global_crop_size} + {args.local_crops_number}x"
          f"{args.local_crop_size} crops, one process, 1 torch thread, {args.data_images} images per pipeline "
          f"per round, pipelines interleaved image by image", flush=True)
    if not fast_available:
        print("  note: this utils.py has no fast colour jitter; 'fast' runs the faithful pipeline")
    for _, run in pipelines:
        run(0)
    wall = {name: [] for name, _ in pipelines}
    cpu = {name: [] for name, _ in pipelines}
    for r in range(args.rounds):
        spent_wall = {name: 0.0 for name, _ in pipelines}
        spent_cpu = {name: 0.0 for name, _ in pipelines}
        for i in range(r * args.data_images, (r + 1) * args.data_images):
            for name, run in pipelines:  # image by image, so that all pipelines see the same machine load
                w0, c0 = time.perf_counter(), time.process_time()
                run(i)
                spent_wall[name] += time.perf_counter() - w0
                spent_cpu[name] += time.process_time() - c0
        for name, _ in pipelines:
            wall[name].append(args.data_images / spent_wall[name])
            cpu[name].append(args.data_images / max(spent_cpu[name], 1e-9))
        print(f"  round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {cpu[n][-1]:.1f}" for n, _ in pipelines)
              + " img/s per CPU-second", flush=True)
    summary = {"what": "data", "files": [os.path.basename(p) for p in paths], "fast_available": fast_available}
    for name, _ in pipelines:
        c, w = median(cpu[name]), median(wall[name])
        paired = median([x / y for x, y in zip(cpu[name], cpu["reference"])])
        summary[name] = {"img_s_cpu": c, "img_s_wall": w, "vs_reference_cpu": paired, "img_s_cpu_rounds": cpu[name]}
        print(f"  {name:34s} {c:7.1f} img/s per CPU-second ({w:.1f} wall-clock), {paired:.2f}x reference "
              f"(median of per-round ratios)")
    return summary


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    utils.run_cli(run, args)


def run(args):
    for name in ("batch_size", "steps", "rounds", "data_images", "out_dim", "patch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1")
    if min(args.warmup, args.round_warmup, args.local_crops_number) < 0:
        raise UserError("--warmup, --round_warmup and --local_crops_number must be 0 or more")
    results = []
    if args.what in ("step", "all"):
        accel = utils.Accelerator.create(args.device)
        results.append(bench_step(args, accel))
    if args.what in ("data", "all"):
        results.append(bench_data(args))
    if args.json:
        write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
