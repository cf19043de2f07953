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
"""DINO pre-training (self-distillation with no labels) on NPU, GPU or CPU."""
import argparse
import datetime
import itertools
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data.dataloader import default_collate  # this path also exists in the older torch of Ascend stacks
from torchvision import datasets, transforms
from torchvision import models as torchvision_models

import utils
import vision_transformer as vits
from vision_transformer import DINOHead
from utils import UserError

VIT_ARCHS = ['vit_tiny', 'vit_small', 'vit_base']
# optimizers whose saved state another can resume from (npufusedadamw falls back to adamw off Ascend)
OPTIMIZER_STATE_KIND = {"adamw": "adamw", "npufusedadamw": "adamw", "sgd": "sgd", "lars": "lars"}


def _list_torchvision_archs():
    if hasattr(torchvision_models, "list_models"):
        return sorted(torchvision_models.list_models(module=torchvision_models))
    return sorted(name for name in torchvision_models.__dict__
                  if name.islower() and not name.startswith("__") and callable(torchvision_models.__dict__[name]))


torchvision_archs = _list_torchvision_archs()  # a list, as in the reference


def unknown_arch(arch):
    return UserError(f"unknown --arch {arch!r}: use {', '.join(VIT_ARCHS)} or a torchvision model such as resnet50")


def check_arch(arch):
    """An --arch that build_backbone knows by name (XCiT's own error comes from build_backbone)."""
    name = arch.replace("deit", "vit")
    if name not in VIT_ARCHS and name not in torchvision_archs and not name.startswith("xcit"):
        raise unknown_arch(arch)


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a bad flag is reported on one line (no usage dump)."""
    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def get_args_parser():
    parser = OneLineErrorParser('DINO', add_help=False, allow_abbrev=False)

    # Model parameters
    parser.add_argument('--arch', default='vit_small', type=str,
        help="""Name of architecture to train: vit_tiny, vit_small, vit_base (or deit_tiny/deit_small),
        or a torchvision classification model with an `fc` layer such as resnet50.""")
    parser.add_argument('--patch_size', default=16, type=int, help="""Size in pixels
        of input square patches - default 16 (for 16x16 patches). Using smaller
        values leads to better performance but requires more memory. Applies only
        for ViTs (vit_tiny, vit_small and vit_base). If <16, we recommend disabling
        mixed precision training (--use_fp16 false) to avoid unstabilities.""")
    parser.add_argument('--out_dim', default=65536, type=int, help="""Dimensionality of
        the DINO head output. For complex and large datasets large values (like 65k) work well.""")
    parser.add_argument('--norm_last_layer', default=True, type=utils.bool_flag,
        help="""Whether or not to weight normalize the last layer of the DINO head.
        Not normalizing leads to better performance but can make the training unstable.
        In our experiments, we typically set this paramater to False with vit_small and True with vit_base.""")
    parser.add_argument('--momentum_teacher', default=0.996, type=float, help="""Base EMA
        parameter for teacher update. The value is increased to 1 during training with cosine schedule.
        We recommend setting a higher value with small batches: for example use 0.9995 with batch size of 256.""")
    parser.add_argument('--use_bn_in_head', default=False, type=utils.bool_flag,
        help="Whether to use batch normalizations in projection head (Default: False)")

    # Temperature teacher parameters
    parser.add_argument('--warmup_teacher_temp', default=0.04, type=float,
        help="""Initial value for the teacher temperature: 0.04 works well in most cases.
        Try decreasing it if the training loss does not decrease.""")
    parser.add_argument('--teacher_temp', default=0.04, type=float, help="""Final value (after linear warmup)
        of the teacher temperature. For most experiments, anything above 0.07 is unstable. We recommend
        starting with the default value of 0.04 and increase this slightly if needed.""")
    parser.add_argument('--warmup_teacher_temp_epochs', default=0, type=int,
        help='Number of warmup epochs for the teacher temperature (Default: 0; the paper uses 30).')

    # Training/Optimization parameters
    parser.add_argument('--use_fp16', type=utils.bool_flag, default=True, help="""Whether or not
        to use half precision for training (fp16 autocast with loss scaling on GPUs and NPUs; ignored
        on CPUs). We recommend disabling mixed precision if the loss is unstable, if reducing the patch
        size or if training with bigger ViTs.""")
    parser.add_argument('--amp', action='store_true', help="""Mixed precision of the Ascend port: apex O1 on
        NPUs, bf16 autocast on GPUs and CPUs. Takes precedence over --use_fp16.""")
    parser.add_argument('--weight_decay', type=float, default=0.04, help="""Initial value of the
        weight decay. With ViT, a smaller value at the beginning of training works well.""")
    parser.add_argument('--weight_decay_end', type=float, default=0.4, help="""Final value of the
        weight decay. We use a cosine schedule for WD and using a larger decay by
        the end of training improves performance for ViTs.""")
    parser.add_argument('--clip_grad', type=float, default=3.0, help="""Maximal parameter
        gradient norm if using gradient clipping. Clipping with norm .3 ~ 1.0 can
        help optimization for larger ViT architectures. 0 for disabling.""")
    parser.add_argument('--batch_size_per_gpu', '--batch_size', dest='batch_size_per_gpu', default=64, type=int,
        help='Per-device batch-size: number of distinct images loaded on one device.')
    parser.add_argument('--epochs', default=100, type=int, help='Number of epochs of training.')
    parser.add_argument('--num_steps', default=-1, type=int, help="""Stop cleanly after this many
        training steps in total (counted from the start of training, across epochs); -1: no limit.""")
    parser.add_argument('--freeze_last_layer', default=1, type=int, help="""Number of epochs
        during which we keep the output layer fixed. Typically doing so during
        the first epoch helps training. Try increasing this value if the loss does not decrease.""")
    parser.add_argument("--lr", default=0.0005, type=float, help="""Learning rate at the end of
        linear warmup (highest LR used during training). The learning rate is linearly scaled
        with the batch size, and specified here for a reference batch size of 256.""")
    parser.add_argument("--warmup_epochs", default=10, type=int,
        help="Number of epochs for the linear learning-rate warm up.")
    parser.add_argument('--min_lr', type=float, default=1e-6, help="""Target LR at the
        end of optimization. We use a cosine LR schedule with linear warmup.""")
    parser.add_argument('--optimizer', default='adamw', type=str,
        choices=['adamw', 'sgd', 'lars', 'npufusedadamw'], help="""Type of optimizer. We recommend using
        adamw with ViTs. npufusedadamw is Ascend apex's fused AdamW (plain AdamW elsewhere).""")
    parser.add_argument('--drop_path_rate', type=float, default=0.1, help="stochastic depth rate")

    # Multi-crop parameters
    parser.add_argument('--global_crops_scale', type=float, nargs='+', default=(0.4, 1.),
        help="""Scale range of the cropped image before resizing, relatively to the origin image.
        Used for large global view cropping. When disabling multi-crop (--local_crops_number 0), we
        recommand using a wider range of scale ("--global_crops_scale 0.14 1." for example)""")
    parser.add_argument('--local_crops_number', type=int, default=8, help="""Number of small
        local views to generate. Set this parameter to 0 to disable multi-crop training.
        When disabling multi-crop we recommend to use "--global_crops_scale 0.14 1." """)
    parser.add_argument('--local_crops_scale', type=float, nargs='+', default=(0.05, 0.4),
        help="""Scale range of the cropped image before resizing, relatively to the origin image.
        Used for small local view cropping of multi-crop.""")
    parser.add_argument('--global_crop_size', type=int, default=224, help="Side of the global crops in pixels.")
    parser.add_argument('--local_crop_size', type=int, default=96, help="Side of the local crops in pixels.")
    parser.add_argument('--compile', action='store_true', help="""torch.compile each transformer block
        (GPUs with triton, CPUs with a C++ compiler; not NPUs). Same maths; the first steps take
        tens of seconds longer while the blocks compile.""")
    parser.add_argument('--cuda_graph', action='store_true', help="""NVIDIA GPUs: replay the student's and
        the teacher's backbone (forward and backward) as CUDA graphs, captured before the first step, instead of
        launching their thousands of kernels one by one. Same maths; fixed crop sizes (other shapes run
        eagerly).""")
    parser.add_argument('--use_color_jitter_opti', action='store_true',
        help="""Faster colour jitter on uint8 arrays with torchvision's semantics (see README).""")

    # Misc
    parser.add_argument('--data_path', default='/path/to/imagenet/train/', type=str,
        help="""ImageFolder of training images. If it holds a train/ folder (ImageNet layout), only
        train/ is used.""")
    parser.add_argument('--synthetic', action='store_true', help="""Train on generated crops of the right
        sizes instead of a dataset (throughput runs and smoke tests).""")
    parser.add_argument('--output_dir', default=".", type=str, help='Path to save logs and checkpoints.')
    parser.add_argument('--saveckp_freq', default=20, type=int, help='Save checkpoint every x epochs.')
    parser.add_argument('--saveckp_steps', default=0, type=int, help="""Also write checkpoint.pth every
        this many steps, for exact resume after a crash (0: only at the end of each epoch).""")
    parser.add_argument('--seed', default=0, type=int, help='Random seed.')
    parser.add_argument('--num_workers', default=10, type=int, help='Number of data loading workers per GPU.')
    add_process_args(parser)
    return parser


def add_process_args(parser):
    """Device and process-group flags, shared by every script."""
    parser.add_argument('--device', default='auto', choices=utils.DEVICE_CHOICES,
        help='auto: npu if torch_npu sees one, else cuda, else cpu.')
    parser.add_argument('--bin', default=True, type=utils.bool_flag,
        help='Ascend only: use precompiled (binary) operators instead of online compilation.')
    parser.add_argument("--dist_url", default="env://", type=str, help="""url used to set up
        distributed training; see https://pytorch.org/docs/stable/distributed.html""")
    parser.add_argument('--dist_timeout', default=900, type=int, help="""Seconds a collective may wait
        for the other processes before the run fails (a dead process must not hang the others).""")
    parser.add_argument("--local_rank", "--local-rank", dest="local_rank", default=0, type=int,
        help="Please ignore and do not set this argument.")


def validate_args(args):
    """Rejects impossible settings before any work starts."""
    check_arch(args.arch)
    if args.batch_size_per_gpu < 1:
        raise UserError(f"--batch_size_per_gpu must be at least 1 (got {args.batch_size_per_gpu})")
    if args.epochs < 1:
        raise UserError(f"--epochs must be at least 1 (got {args.epochs})")
    if args.local_crops_number < 0:
        raise UserError(f"--local_crops_number must be 0 or more (got {args.local_crops_number})")
    if args.global_crop_size < 1 or args.local_crop_size < 1:
        raise UserError("crop sizes must be positive")
    if args.local_crops_number > 0 and args.global_crop_size < args.local_crop_size:
        raise UserError(f"--global_crop_size {args.global_crop_size} is smaller than "
                        f"--local_crop_size {args.local_crop_size}")
    smallest = args.local_crop_size if args.local_crops_number > 0 else args.global_crop_size
    if args.arch.replace("deit", "vit") in VIT_ARCHS and args.patch_size > smallest:
        raise UserError(f"--patch_size {args.patch_size} is larger than the smallest crop ({smallest} pixels)")
    if args.patch_size < 1:
        raise UserError("--patch_size must be positive")
    if getattr(args, "compile", False) and args.arch.replace("deit", "vit") not in VIT_ARCHS:
        raise UserError(f"--compile applies to the transformer blocks of ViTs; --arch {args.arch} has none")
    for name in ("global_crops_scale", "local_crops_scale"):
        scale = getattr(args, name)
        if len(scale) != 2 or not (0 < scale[0] <= scale[1] <= 1):
            raise UserError(f"--{name} needs two numbers 0 < min <= max <= 1 (got {' '.join(map(str, scale))})")
    if not 0 <= args.warmup_teacher_temp_epochs <= args.epochs:
        raise UserError(f"--warmup_teacher_temp_epochs {args.warmup_teacher_temp_epochs} must be between 0 "
                        f"and --epochs {args.epochs}")
    if args.warmup_epochs < 0 or args.warmup_epochs > args.epochs:
        raise UserError(f"--warmup_epochs {args.warmup_epochs} must be between 0 and --epochs {args.epochs}")
    if args.out_dim < 1:
        raise UserError("--out_dim must be positive")
    if args.num_steps == 0 or args.num_steps < -1:
        raise UserError(f"--num_steps must be positive, or -1 for no limit (got {args.num_steps})")
    if args.saveckp_steps < 0:
        raise UserError("--saveckp_steps must be 0 or more")
    if args.num_workers < 0:
        raise UserError("--num_workers must be 0 or more")
    if not args.synthetic:  # before the output folder is made and the settings are printed
        check_data_path(args.data_path)


# ============ data ============

class DataAugmentationDINO(object):
    """Two global views and `local_crops_number` local views of one PIL image, as the reference."""
    def __init__(self, global_crops_scale, local_crops_scale, local_crops_number, use_color_jitter_opti=False,
                 global_crop_size=224, local_crop_size=96, normalize=True):
        # normalize=False: uint8 crops, for utils.normalize_uint8_crops on the accelerator (the same numbers)
        self.local_crops_number = local_crops_number
        self.fast = use_color_jitter_opti
        if self.fast:
            # README, "Fast paths": the same views and random draws, computed on arrays
            self.global_transfo1 = utils.FastCropTransform(global_crop_size, global_crops_scale, blur_p=1.0,
                                                           normalize=normalize)
            self.global_transfo2 = utils.FastCropTransform(global_crop_size, global_crops_scale, blur_p=0.1,
                                                           solarize_p=0.2, normalize=normalize)
            self.local_transfo = utils.FastCropTransform(local_crop_size, local_crops_scale, blur_p=0.5,
                                                         normalize=normalize)
            return
        jitter = transforms.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
        flip_and_color_jitter = transforms.Compose([
            transforms.RandomHorizontalFlip(p=0.5),
            transforms.RandomApply([jitter], p=0.8),
            transforms.RandomGrayscale(p=0.2),
        ])
        to_tensor = transforms.Compose([
            transforms.ToTensor(),
            transforms.Normalize(utils._IMAGENET_MEAN, utils._IMAGENET_STD),
        ]) if normalize else transforms.PILToTensor()
        bicubic = transforms.InterpolationMode.BICUBIC

        self.global_transfo1 = transforms.Compose([
            transforms.RandomResizedCrop(global_crop_size, scale=global_crops_scale, interpolation=bicubic),
            flip_and_color_jitter,
            utils.GaussianBlur(1.0),
            to_tensor,
        ])
        self.global_transfo2 = transforms.Compose([
            transforms.RandomResizedCrop(global_crop_size, scale=global_crops_scale, interpolation=bicubic),
            flip_and_color_jitter,
            utils.GaussianBlur(0.1),
            utils.Solarization(0.2),
            to_tensor,
        ])
        self.local_transfo = transforms.Compose([
            transforms.RandomResizedCrop(local_crop_size, scale=local_crops_scale, interpolation=bicubic),
            flip_and_color_jitter,
            utils.GaussianBlur(p=0.5),
            to_tensor,
        ])

    def __call__(self, image):
        if self.fast:
            image = utils.as_uint8_chw(image)  # one conversion for all views
        crops = [self.global_transfo1(image), self.global_transfo2(image)]
        for _ in range(self.local_crops_number):
            crops.append(self.local_transfo(image))
        return crops


def load_rgb(path):
    """Opens any image PIL reads as 8-bit RGB (16-bit and float images are rescaled, not clipped)."""
    with open(path, "rb") as f:
        img = Image.open(f)
        img.load()
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(img).astype(np.float32)
        arr = arr / 257.0 if arr.max() > 255 else arr
        img = Image.fromarray(arr.clip(0, 255).astype(np.uint8), mode="L")
    return img.convert("RGB")


def open_image(path):
    """load_rgb, with an unreadable file reported as a UserError naming it (evaluation tools)."""
    try:
        return load_rgb(path)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise UserError(f"cannot read image {path}: {err}") from err


def sample_seed(seed, epoch, index):
    """Seed of one sample's augmentation: depends on (seed, epoch, index) only, not on workers or ranks."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class MultiCropDataset(torch.utils.data.Dataset):
    """ImageFolder samples turned into DINO crops, reproducibly and robustly.

    Indexed by (epoch, index). Each sample's random draws come from its own seed,
    so a resumed run sees exactly the crops an uninterrupted run would. A file
    that cannot be read is replaced by the next readable one and reported.
    """
    max_consecutive_failures = 16

    def __init__(self, samples, transform, seed=0):
        self.samples = samples
        self.transform = transform
        self.seed = seed

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        failed = []
        for attempt in range(self.max_consecutive_failures):
            idx = (index + attempt) % len(self.samples)
            path, label = self.samples[idx]
            try:
                img = load_rgb(path)
            except Exception as err:  # PIL raises many types for bad files
                failed.append(f"{path} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})")
                continue
            return self._seeded_transform(img, sample_seed(self.seed, epoch, idx)), label, failed
        raise UserError(f"{len(failed)} unreadable images in a row, first {failed[0]}")

    def _seeded_transform(self, img, seed):
        py_state = random.getstate()
        random.seed(seed)
        try:
            with torch.random.fork_rng(devices=[]):
                # CPU generator only: torch.manual_seed would also reseed the device's (drop path) generator
                torch.default_generator.manual_seed(seed)
                return self.transform(img)
        finally:
            random.setstate(py_state)


def crop_sizes(args):
    """Side of each crop of a step, in the order the views come: two global, then the local ones."""
    return [args.global_crop_size] * 2 + [args.local_crop_size] * args.local_crops_number


def collate_crops(batch):
    n_crops = len(batch[0][0])
    # default_collate stacks straight into shared memory inside a worker, saving a copy of every batch
    crops = [default_collate([sample[0][i] for sample in batch]) for i in range(n_crops)]
    labels = torch.tensor([sample[1] for sample in batch])
    failed = [f for sample in batch for f in sample[2]]
    return crops, labels, failed


class EpochSampler(torch.utils.data.Sampler):
    """DistributedSampler's order (seed + epoch permutation, padded, strided by rank) that can start mid-epoch.

    Yields (epoch, index) so that the dataset can seed each sample's augmentation.
    """
    def __init__(self, num_items, num_replicas=1, rank=0, shuffle=True, seed=0):
        self.num_items = num_items
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = seed
        self.num_samples = math.ceil(num_items / num_replicas)
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_items, generator=g).tolist()
        else:
            order = list(range(self.num_items))
        total = self.num_samples * self.num_replicas
        order = (order * math.ceil(total / len(order)))[:total]
        mine = order[self.rank:total:self.num_replicas][self.start:]
        return iter([(self.epoch, i) for i in mine])

    def __len__(self):
        return self.num_samples - self.start


class SyntheticLoader(object):
    """Fixed random crops already on the device: measures the model, not the input pipeline."""
    IMAGENET_TRAIN_IMAGES = 1281167

    def __init__(self, args, accel):
        g = torch.Generator().manual_seed(args.seed)
        b = args.batch_size_per_gpu
        self.crops = [accel.to(torch.randn(b, 3, s, s, generator=g)) for s in crop_sizes(args)]
        self.labels = torch.zeros(b, dtype=torch.long)
        # ImageNet-sized epochs, so that the schedules behave as in a real run
        self.steps = max(self.IMAGENET_TRAIN_IMAGES // (b * args.world_size), 1)
        self.start = 0

    def set_epoch(self, epoch, start=0):
        self.start = start

    def __len__(self):
        return self.steps - self.start

    def __iter__(self):
        for _ in range(len(self)):
            yield self.crops, self.labels, []


def has_subfolders(folder):
    try:
        with os.scandir(folder) as entries:
            return any(entry.is_dir() for entry in entries)
    except OSError as err:
        raise UserError(f"cannot read {folder}: {err.strerror or err}") from err


def check_data_path(data_path):
    """What can be told without scanning the images: the folder exists and has class sub-folders."""
    if not data_path or not os.path.exists(data_path):
        raise UserError(f"--data_path does not exist: {data_path}")
    if not os.path.isdir(data_path):
        raise UserError(f"--data_path is not a folder: {data_path}")
    if not has_subfolders(data_path):
        raise UserError(f"no images found in {data_path}: expected class sub-folders holding image files "
                        f"(it has no sub-folders)")


def resolve_train_folder(data_path):
    check_data_path(data_path)
    train = os.path.join(data_path, "train")
    # the ImageNet layout: train/ holds class folders; a class named "train" holds images
    if os.path.isdir(train) and has_subfolders(train):
        print(f"Training on {train} only (the ImageNet layout's val/ is kept for evaluation).")
        return train
    return data_path


def build_data(args, accel):
    """Returns (loader, sampler-like object with set_epoch, steps per epoch, number of images)."""
    if args.synthetic:
        loader = SyntheticLoader(args, accel)
        print(f"Synthetic data: {loader.steps} steps per epoch of {args.batch_size_per_gpu} images per device.")
        return loader, loader, loader.steps, loader.steps * args.batch_size_per_gpu * args.world_size
    root = resolve_train_folder(args.data_path)
    try:
        folder = datasets.ImageFolder(root)
    except (FileNotFoundError, RuntimeError) as err:
        raise UserError(f"no images found in {root}: expected class sub-folders holding image files "
                        f"({str(err).splitlines()[0]})") from err
    needed = args.batch_size_per_gpu * args.world_size
    if len(folder) < needed:
        raise UserError(f"{root} has {len(folder)} images, fewer than one batch "
                        f"({args.batch_size_per_gpu} per device x {args.world_size} devices)")
    transform = DataAugmentationDINO(args.global_crops_scale, args.local_crops_scale, args.local_crops_number,
                                     args.use_color_jitter_opti, global_crop_size=args.global_crop_size,
                                     local_crop_size=args.local_crop_size, normalize=not accel.normalizes_crops)
    dataset = MultiCropDataset(folder.samples, transform, seed=args.seed)
    sampler = EpochSampler(len(dataset), num_replicas=args.world_size, rank=args.rank, shuffle=True,
                           seed=args.seed)
    workers = args.num_workers
    loader = torch.utils.data.DataLoader(
        dataset,
        sampler=sampler,
        batch_size=args.batch_size_per_gpu,
        num_workers=workers,
        pin_memory=accel.pin_memory,
        drop_last=True,
        collate_fn=collate_crops,
        generator=torch.Generator(),  # keeps the global RNG (drop path) independent of the loader
        # torch < 2.0 refuses prefetch_factor without workers
        **(dict(persistent_workers=True, prefetch_factor=4) if workers > 0 else {}),
    )
    steps = sampler.num_samples // args.batch_size_per_gpu
    print(f"Data loaded: there are {len(dataset)} images.")
    return loader, sampler, steps, len(dataset)


# ============ model ============

def build_backbone(arch, patch_size, drop_path_rate=0.0):
    arch = arch.replace("deit", "vit")  # the reference renamed DeiT-S to ViT-S
    if arch in VIT_ARCHS:
        model = vits.__dict__[arch](patch_size=patch_size, drop_path_rate=drop_path_rate)
        return model, model.embed_dim
    if arch.startswith("xcit"):
        raise UserError(f"--arch {arch}: XCiT models come from torch.hub at run time in the reference; this "
                        f"package runs offline and does not ship them")
    if arch in torchvision_archs:
        model = torchvision_models.__dict__[arch]() if arch in torchvision_models.__dict__ \
            else torchvision_models.get_model(arch)
        fc = getattr(model, "fc", None)
        if not isinstance(fc, nn.Linear):
            raise UserError(f"--arch {arch} has no final `fc` layer; use a ViT or a ResNet-like model")
        return model, fc.weight.shape[1]
    raise unknown_arch(arch)


def build_student_teacher(args):
    student, embed_dim = build_backbone(args.arch, args.patch_size, args.drop_path_rate)
    teacher, _ = build_backbone(args.arch, args.patch_size)
    student = utils.MultiCropWrapper(student, DINOHead(embed_dim, args.out_dim, use_bn=args.use_bn_in_head,
                                                       norm_last_layer=args.norm_last_layer))
    teacher = utils.MultiCropWrapper(teacher, DINOHead(embed_dim, args.out_dim, args.use_bn_in_head))
    return student, teacher


class DINOLoss(nn.Module):
    def __init__(self, out_dim, ncrops, warmup_teacher_temp, teacher_temp,
                 warmup_teacher_temp_epochs, nepochs, student_temp=0.1,
                 center_momentum=0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.ncrops = ncrops
        self.register_buffer("center", torch.zeros(1, out_dim))
        # a high teacher temperature early on makes training unstable, hence the warm-up
        self.teacher_temp_schedule = np.concatenate((
            np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
            np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp
        ))
        self.last_stats = {}

    def forward(self, student_output, teacher_output, epoch):
        """Mean cross-entropy between each teacher view's softmax and every other student view's."""
        student_logp = F.log_softmax(student_output.float() / self.student_temp, dim=-1)
        temp = self.teacher_temp_schedule[epoch]
        teacher_logits = (teacher_output.float() - self.center) / temp
        teacher_prob = F.softmax(teacher_logits, dim=-1).detach()
        n_teacher = 2
        batch = teacher_prob.shape[0] // n_teacher
        # All (teacher view, student view) cross terms in one matmul over batch and classes:
        # cross[i, v] = sum_b sum_d q_i[b, d] * log p_v[b, d].
        cross = teacher_prob.reshape(n_teacher, -1) @ student_logp.reshape(self.ncrops, -1).t()
        same_view = torch.zeros_like(cross, dtype=torch.bool)
        same_view[:, :n_teacher].fill_diagonal_(True)  # teacher and student on the same view are skipped
        n_loss_terms = n_teacher * self.ncrops - n_teacher
        total_loss = -cross.masked_fill(same_view, 0).sum() / (batch * n_loss_terms)
        with torch.no_grad():
            entropy = -(teacher_prob * F.log_softmax(teacher_logits, dim=-1)).sum(-1).mean()
            self.last_stats = {"teacher_entropy": entropy, "kl": total_loss.detach() - entropy}
        self.update_center(teacher_output)
        return total_loss

    @torch.no_grad()
    def update_center(self, teacher_output):
        batch_center = torch.sum(teacher_output.float(), dim=0, keepdim=True)
        utils.all_reduce_sum(batch_center)
        batch_center = batch_center / (len(teacher_output) * utils.get_world_size())
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)


# ============ training ============

def plain_args(args):
    """args as a dict of plain values, so that checkpoints load with weights_only=True."""
    out = {}
    for k, v in vars(args).items():
        out[k] = list(v) if isinstance(v, tuple) else v
    return out


def rng_state(accel):
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "torch": torch.get_rng_state(),
        "device": accel.get_rng_state(),
    }


def set_rng_state(state, accel):
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    accel.set_rng_state(state["device"])


def clip_freeze_and_step(precision, optimizer, student, epoch, clip_grad, freeze_last_layer):
    """After the backward: per-parameter clipping, the last layer kept out in its frozen epochs, the step."""
    if clip_grad:
        precision.unscale_(optimizer)
        utils.clip_gradients(student, clip_grad, fused=True)
    frozen = utils.cancel_gradients_last_layer(epoch, student, freeze_last_layer, in_place=precision.combined_grads)
    precision.step(optimizer)
    utils.restore_last_layer(frozen, optimizer)


def train_one_epoch(student, teacher, teacher_without_ddp, dino_loss, data_loader, optimizer, lr_schedule,
                    wd_schedule, momentum_schedule, epoch, fp16_scaler, args):
    """The reference's epoch loop, for scripts that build their own models and loader; returns the averaged
    stats. fp16 autocast with `fp16_scaler`, fp32 without. main_dino.py itself trains with Trainer, which adds
    exact resume, the checks of the Reliability section and the speed paths."""
    student_core = student.module if hasattr(student, "module") else student
    accel = utils.Accelerator.of(student_core)
    precision = utils.Precision("fp16" if fp16_scaler is not None else "fp32", accel, scaler=fp16_scaler)
    ema = utils.TeacherEMA(student_core, teacher_without_ddp, fused=True)
    metric_logger = utils.MetricLogger(delimiter="  ")
    header = 'Epoch: [{}/{}]'.format(epoch, args.epochs)
    for it, batch in enumerate(metric_logger.log_every(data_loader, 10, header)):
        it = len(data_loader) * epoch + it  # global training iteration
        for i, param_group in enumerate(optimizer.param_groups):
            param_group["lr"] = float(lr_schedule[it])
            if i == 0:  # only the first group is regularized
                param_group["weight_decay"] = float(wd_schedule[it])
        images = utils.normalize_uint8_crops([accel.to(im) for im in batch[0]])
        with precision.autocast():
            with torch.no_grad():
                teacher_output = teacher(images[:2])  # only the 2 global views pass through the teacher
            student_output = student(images)
            loss = dino_loss(student_output, teacher_output, epoch)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise UserError(f"loss is {loss_value} at epoch {epoch}, global step {it}; stopping training")
        precision.zero_grad(optimizer)
        precision.backward(loss, optimizer)
        clip_freeze_and_step(precision, optimizer, student_core, epoch, args.clip_grad, args.freeze_last_layer)
        ema.update(float(momentum_schedule[it]))
        metric_logger.update(loss=loss_value)
        metric_logger.update(lr=optimizer.param_groups[0]["lr"])
        metric_logger.update(wd=optimizer.param_groups[0]["weight_decay"])
    metric_logger.synchronize_between_processes()
    print("Averaged stats:", metric_logger)
    return {k: meter.global_avg for k, meter in metric_logger.meters.items()}


class Trainer(object):
    """Holds the pieces of one DINO run and knows how to checkpoint and resume them."""

    def __init__(self, args):
        self.args = args
        self.accel = utils.init_distributed_mode(args)
        self.accel.set_binary_mode(args.bin)
        utils.fix_random_seeds(args.seed)
        self.accel.manual_seed(args.seed)
        print("git:\n  {}\n".format(utils.get_sha()))
        print("\n".join("%s: %s" % (k, str(v)) for k, v in sorted(dict(vars(args)).items())))
        self.ckpt_path = os.path.join(args.output_dir, "checkpoint.pth")

        self.loader, self.sampler, self.steps_per_epoch, self.num_images = build_data(args, self.accel)
        self.samples_per_step = args.batch_size_per_gpu * args.world_size

        student, teacher = build_student_teacher(args)
        student, teacher = self.accel.to(student), self.accel.to(teacher)
        distributed = utils.is_dist_avail_and_initialized()
        sync_batchnorm = distributed and utils.has_batchnorms(student) and self.accel.sync_batchnorm
        if sync_batchnorm:
            student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
            teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
        elif distributed and utils.has_batchnorms(student):
            print("BatchNorm layers keep per-process statistics: SyncBatchNorm needs GPUs or NPUs")
        teacher.load_state_dict(student.state_dict())  # same weights at the start
        for p in teacher.parameters():
            p.requires_grad = False
        print(f"Student and Teacher are built: they are both {args.arch} network.")

        self.dino_loss = self.accel.to(DINOLoss(
            args.out_dim, args.local_crops_number + 2, args.warmup_teacher_temp, args.teacher_temp,
            args.warmup_teacher_temp_epochs, args.epochs))

        mode = utils.resolve_precision_mode(
            self.accel.kind, amp=args.amp, use_fp16=args.use_fp16, apex_available=utils.apex_amp_available(),
            bf16_supported=self.accel.bf16_supported)
        optimizer = utils.build_optimizer(args.optimizer, utils.get_params_groups(student), self.accel,
                                          precision_mode=mode)
        self.precision = utils.Precision(mode, self.accel)
        (student, teacher), optimizer = self.precision.initialize([student, teacher], optimizer)
        print(f"Precision: {mode} on {self.accel.describe()}")
        if args.compile:
            compiled = utils.compile_repeated_blocks([student, teacher], self.accel)
            print(f"torch.compile: {compiled} transformer blocks (compiled during the first steps)")
        self.graphs_pending = getattr(args, "cuda_graph", False)
        if self.graphs_pending:
            reason = utils.cuda_graph_unsupported_reason(self.accel.kind, args.compile, mode,
                                                         sync_batchnorm=sync_batchnorm)
            if reason:
                raise UserError(reason)
        self.student_core, self.teacher = student, teacher
        if distributed:
            student = nn.parallel.DistributedDataParallel(student, device_ids=self.accel.ddp_device_ids)
        self.student = student
        self.optimizer = optimizer
        self.ema = utils.TeacherEMA(self.student_core, self.teacher, fused=True)

        total_steps = args.epochs * self.steps_per_epoch
        self.lr_schedule = utils.cosine_scheduler(
            args.lr * (args.batch_size_per_gpu * utils.get_world_size()) / 256.,  # linear scaling rule
            args.min_lr, args.epochs, self.steps_per_epoch, warmup_epochs=args.warmup_epochs)
        self.wd_schedule = utils.cosine_scheduler(args.weight_decay, args.weight_decay_end, args.epochs,
                                                  self.steps_per_epoch)
        # the teacher momentum rises to 1 with a cosine schedule
        self.momentum_schedule = utils.cosine_scheduler(args.momentum_teacher, 1, args.epochs, self.steps_per_epoch)
        self.total_steps = total_steps if args.num_steps < 0 else min(total_steps, args.num_steps)
        print("Loss, optimizer and schedulers ready.")

        self.start_epoch, self.start_step = 0, 0
        self.resume()
        self.bad_images_epoch = 0
        # random crops hold nothing to learn: a flat teacher there is no collapse
        self.collapse_monitor = CollapseMonitor(args.out_dim, enabled=not args.synthetic)
        self._nan_hook_step = int(os.environ.get("DINO_TEST_NONFINITE_AT_STEP", "-1"))  # test-only
        self.pending_nonfinite = None  # (flag, loss, epoch, step) of the last step, checked one step late

    # ---- checkpoints ----

    def state(self, epoch, step_in_epoch):
        save = {
            'student': {"module." + k: v for k, v in self.student_core.state_dict().items()},
            'teacher': self.teacher.state_dict(),
            'optimizer': self.optimizer.state_dict(),
            'epoch': epoch,
            'args': plain_args(self.args),
            'dino_loss': self.dino_loss.state_dict(),
            'step_in_epoch': step_in_epoch,
            'rng': rng_state(self.accel),
        }
        precision_state = self.precision.state_dict()
        if precision_state is not None:
            save['amp' if self.precision.mode == "apex_o1" else 'fp16_scaler'] = precision_state
        return save

    def save(self, epoch, step_in_epoch, path=None):
        if utils.is_main_process():
            utils.save_atomic(self.state(epoch, step_in_epoch), path or self.ckpt_path)
        if utils.is_dist_avail_and_initialized():
            dist.barrier()

    def resume(self):
        if not os.path.isfile(self.ckpt_path):
            return
        print(f"Found checkpoint at {self.ckpt_path}")
        try:
            ckpt = utils.load_checkpoint_file(self.ckpt_path)
        except UserError as err:
            raise UserError(f"{err}. Move {self.ckpt_path} away (or use another --output_dir) to start "
                            f"over") from err
        if not isinstance(ckpt, dict):
            raise UserError(f"{self.ckpt_path} is not a training checkpoint (it holds a {type(ckpt).__name__}); "
                            f"move it away (or use another --output_dir) to start over")
        saved_args = ckpt.get('args')  # a dict here, a Namespace in the reference's checkpoints
        saved_optimizer = (saved_args.get('optimizer') if isinstance(saved_args, dict)
                           else getattr(saved_args, 'optimizer', None))
        state_kind = OPTIMIZER_STATE_KIND.get
        if saved_optimizer and state_kind(saved_optimizer) != state_kind(self.args.optimizer):
            raise UserError(f"{self.ckpt_path} was trained with --optimizer {saved_optimizer}, whose state "
                            f"{self.args.optimizer} cannot take over; resume with --optimizer {saved_optimizer} "
                            f"or use another --output_dir")
        try:
            self.student_core.load_state_dict(utils.strip_prefixes(ckpt['student'], ("module.",)))
            self.teacher.load_state_dict(utils.strip_prefixes(ckpt['teacher'], ("module.",)))
            self.dino_loss.load_state_dict(ckpt['dino_loss'])
            # load_state_dict also copies the saved fused/foreach choice; keep this device's own
            own_flags = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in self.optimizer.param_groups]
            self.optimizer.load_state_dict(ckpt['optimizer'])
            for group, own in zip(self.optimizer.param_groups, own_flags):
                group.update(own)
            self.start_epoch = int(ckpt.get('epoch', 0))
            self.start_step = int(ckpt.get('step_in_epoch', 0))
        except (KeyError, RuntimeError, ValueError, TypeError, AttributeError) as err:
            raise UserError(f"{self.ckpt_path} does not fit this run ({load_error_summary(err)}); use another "
                            f"--output_dir to start a new run") from err
        self.precision.load_state_dict(ckpt.get('amp' if self.precision.mode == "apex_o1" else 'fp16_scaler'))
        if self.start_step >= self.steps_per_epoch:
            self.start_epoch, self.start_step = self.start_epoch + 1, 0
        if 'rng' in ckpt:
            set_rng_state(ckpt['rng'], self.accel)
        print(f"Resuming from epoch {self.start_epoch}, step {self.start_step}.")

    # ---- training ----

    def step_crop_shapes(self):
        args = self.args
        return [(args.batch_size_per_gpu, 3, size, size) for size in crop_sizes(args)]

    def capture_graphs(self):
        """--cuda_graph: the backbones' calls of a step, in the order the step makes them, as CUDA graphs.
        Captured from crops of the step's shapes before the data loader starts, so that no loader thread
        touches the GPU during the capture."""
        images = [torch.zeros(shape, device=self.accel.device) for shape in self.step_crop_shapes()]
        count = utils.graph_backbones(utils.backbone_calls_of_step(self.student_core, self.teacher, images),
                                      self.accel, self.precision)
        print(f"CUDA graphs: {count} backbone calls captured")

    def check_graphed_crops(self, images):
        """Crops of other shapes or types than the captured ones run eagerly: say so once."""
        found = [(tuple(im.shape), im.dtype) for im in images]
        if found != [(shape, torch.float32) for shape in self.step_crop_shapes()]:
            print(f"Warning: --cuda_graph: the crops ({found}) differ from those captured; the backbones run "
                  f"eagerly", file=sys.stderr)

    def train(self):
        args = self.args
        global_step = self.start_epoch * self.steps_per_epoch + self.start_step
        steps_this_run = max(self.total_steps - global_step, 0)
        if steps_this_run == 0:
            limit = (f"--num_steps {args.num_steps}" if self.total_steps < args.epochs * self.steps_per_epoch
                     else f"--epochs {args.epochs}")
            print(f"Nothing to train: the checkpoint in {args.output_dir} is at epoch {self.start_epoch}, step "
                  f"{self.start_step}, which already reaches {limit}; raise it to train further")
            return
        throughput = ThroughputMeter(self.accel, warmup_steps=min(3, max(steps_this_run - 1, 0)))
        start_time = time.time()
        if self.graphs_pending:
            self.capture_graphs()
        print("Starting DINO training !")
        for epoch in range(self.start_epoch, args.epochs):
            if global_step >= self.total_steps:
                break
            start = self.start_step if epoch == self.start_epoch else 0
            self.sampler.set_epoch(epoch, start * args.batch_size_per_gpu)
            stats, global_step = self.train_one_epoch(epoch, start, global_step, throughput)
            if global_step % self.steps_per_epoch == 0 or global_step >= self.total_steps:
                finished = global_step % self.steps_per_epoch == 0
                throughput.pause()
                if finished:
                    self.save(epoch + 1, 0)
                    if args.saveckp_freq and epoch % args.saveckp_freq == 0:
                        self.save(epoch + 1, 0, os.path.join(args.output_dir, f'checkpoint{epoch:04}.pth'))
                else:
                    self.save(epoch, global_step - epoch * self.steps_per_epoch)
                throughput.resume()
            log_stats = {**{f'train_{k}': v for k, v in stats.items()}, 'epoch': epoch}
            self.collapse_monitor.check(epoch, stats)
            if utils.is_main_process():
                with (Path(args.output_dir) / "log.txt").open("a") as f:
                    f.write(json.dumps(log_stats) + "\n")
        total_time = time.time() - start_time
        print('Training time {}'.format(str(datetime.timedelta(seconds=int(total_time)))))
        rate = throughput.images_per_second(self.samples_per_step)
        if rate is not None:
            print(f"Training throughput: {rate:.2f} images/s")

    def train_one_epoch(self, epoch, start_step, global_step, throughput):
        args = self.args
        metric_logger = utils.MetricLogger(delimiter="  ", max_memory_fn=self.accel.max_memory_mb
                                           if self.accel.kind != "cpu" else None)
        header = 'Epoch: [{}/{}]'.format(epoch, args.epochs)
        self.bad_images_epoch = 0
        self.pending_nonfinite = None
        steps_done_in_epoch = start_step
        # the loop ends by exhausting its iterable, not by a break, so that log_every prints the epoch's last
        # line and total time (and no batch beyond --num_steps is fetched)
        steps_here = max(min(self.steps_per_epoch - start_step, self.total_steps - global_step), 0)

        def batches():  # the loader's iterator (its workers' start) inside log_every's clock, as before
            yield from itertools.islice(self.loader, steps_here)
        steps = metric_logger.log_every(batches(), 10, header, total=self.steps_per_epoch, start_index=start_step)
        for it_in_epoch, (images, _, failed) in enumerate(steps, start=start_step):
            it = global_step
            for i, param_group in enumerate(self.optimizer.param_groups):
                # plain floats: numpy scalars in the optimizer state would need unpickling on load
                param_group["lr"] = float(self.lr_schedule[it])
                if i == 0:  # only the first group is regularized
                    param_group["weight_decay"] = float(self.wd_schedule[it])
            if failed:
                self.report_bad_images(failed)

            images = utils.normalize_uint8_crops([self.accel.to(im) for im in images])
            if self.graphs_pending:
                self.graphs_pending = False
                self.check_graphed_crops(images)
            with self.precision.autocast():
                with torch.no_grad():
                    teacher_output = self.teacher(images[:2])  # only the 2 global views pass through the teacher
                student_output = self.student(images)
                loss = self.dino_loss(student_output, teacher_output, epoch)
            if it == self._nan_hook_step:
                loss = loss * float("nan")

            self.precision.zero_grad(self.optimizer)
            self.precision.backward(loss, self.optimizer)
            # Read the previous step's flag now, while this step's work stays queued (HostCopy: no drain on GPUs).
            if self.pending_nonfinite is not None:
                self.stop_if_nonfinite(*self.pending_nonfinite)
            self.pending_nonfinite = (self.nonfinite_flag(loss), loss.detach(), epoch, it)
            clip_freeze_and_step(self.precision, self.optimizer, self.student_core, epoch, args.clip_grad,
                                 args.freeze_last_layer)
            self.ema.update(float(self.momentum_schedule[it]))

            metric_logger.update(loss=loss.detach(), **{k: v for k, v in self.dino_loss.last_stats.items()})
            metric_logger.update(lr=self.optimizer.param_groups[0]["lr"])
            metric_logger.update(wd=self.optimizer.param_groups[0]["weight_decay"])
            global_step += 1
            throughput.step()

            steps_done_in_epoch = it_in_epoch + 1
            self._test_kill_hook(it)
            if steps_done_in_epoch % 10 == 0:
                self.check_bad_image_rate(epoch, steps_done_in_epoch)
            last_of_epoch = it_in_epoch + 1 == self.steps_per_epoch
            if args.saveckp_steps and global_step % args.saveckp_steps == 0 and not last_of_epoch:
                self.stop_if_nonfinite(*self.pending_nonfinite)
                throughput.pause()
                self.save(epoch, it_in_epoch + 1)
                throughput.resume()
        if self.pending_nonfinite is not None:
            self.stop_if_nonfinite(*self.pending_nonfinite)
        self.check_bad_image_rate(epoch, steps_done_in_epoch)
        metric_logger.synchronize_between_processes()
        print("Averaged stats:", metric_logger)
        stats = {k: meter.global_avg for k, meter in metric_logger.meters.items()}
        stats["bad_images"] = self.bad_images_epoch
        return stats, global_step

    def _test_kill_hook(self, step):
        """Test-only: DINO_TEST_KILL_AT_STEP=rank:step kills that rank (first torchrun attempt only)."""
        spec = os.environ.get("DINO_TEST_KILL_AT_STEP")
        if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
            return
        rank, at = (int(x) for x in spec.split(":"))
        if rank == utils.get_rank() and step == at:
            os.kill(os.getpid(), 9)

    def nonfinite_flag(self, loss):
        """How many processes had a non-finite loss at this step, as a utils.HostCopy."""
        flag = (~torch.isfinite(loss.detach())).float().reshape(1)
        return self.accel.host_copy(utils.all_reduce_sum(flag))

    def stop_if_nonfinite(self, flag, loss, epoch, step):
        if flag.get().item() == 0:
            return
        value = loss.item()
        raise UserError(
            f"loss is {value if not math.isfinite(value) else 'not finite on another process'} at epoch {epoch}, "
            f"global step {step}; stopping (the last good checkpoint {self.ckpt_path} is kept). Usual remedies: "
            f"train in fp32 (--use_fp16 false, no --amp), lower --lr, raise --momentum_teacher, "
            f"or clip harder (--clip_grad 0.3)")

    def report_bad_images(self, failed):
        self.bad_images_epoch += len(failed)
        for entry in failed:
            print(f"warning: skipped unreadable image {entry}", force=True)

    def check_bad_image_rate(self, epoch, step_in_epoch):
        total_bad = self.bad_images_epoch
        if utils.is_dist_avail_and_initialized():
            count = torch.tensor([float(total_bad)], device=utils.collective_device())
            total_bad = int(utils.all_reduce_sum(count).item())
        epoch_images = self.steps_per_epoch * self.samples_per_step
        if total_bad > 0.01 * epoch_images:
            if self.pending_nonfinite is not None:
                self.stop_if_nonfinite(*self.pending_nonfinite)  # never save weights of a non-finite step
            self.save(epoch, step_in_epoch)
            raise UserError(f"{total_bad} unreadable images in epoch {epoch}, more than 1% of its "
                            f"{epoch_images}; fix or remove them (the warnings name each file) and run the same "
                            f"command to resume from {self.ckpt_path}")


def load_error_summary(err, limit=300):
    """The first lines of a load_state_dict error (its first line alone names no key)."""
    text = " ".join(line.strip() for line in str(err).splitlines()[:2] if line.strip()) or type(err).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


class CollapseMonitor(object):
    """Warns once per run about the two collapses of the DINO paper's study.

    Uniform collapse: the teacher output is flat, so the loss sits at ln(out_dim).
    One-hot collapse: one dimension dominates, so the teacher entropy goes to 0.
    """
    def __init__(self, out_dim, enabled=True):
        self.uniform_loss = math.log(out_dim)
        self.warned = not enabled

    def diagnose(self, loss, teacher_entropy):
        if loss is not None and abs(loss - self.uniform_loss) <= 0.01 * self.uniform_loss:
            return "uniform"
        if teacher_entropy is not None and teacher_entropy <= 0.01 * self.uniform_loss:
            return "one-hot"
        return None

    def check(self, epoch, stats):
        kind = self.diagnose(stats.get("loss"), stats.get("teacher_entropy"))
        if kind is None or self.warned:
            return kind
        self.warned = True
        if kind == "uniform":
            detail = (f"the loss {stats['loss']:.4f} is within 1% of ln(out_dim) = {self.uniform_loss:.4f}: "
                      f"the teacher output is uniform")
        else:
            detail = f"the teacher entropy {stats['teacher_entropy']:.4f} is near 0: one output dimension dominates"
        print(f"warning: collapse suspected at epoch {epoch} ({kind}): {detail}. Usual remedies: lower "
              f"--teacher_temp (and --warmup_teacher_temp), raise --momentum_teacher, use a smaller --out_dim on "
              f"small data.")
        return kind


class ThroughputMeter(object):
    """Images per second over the steps after a warm-up, excluding checkpoint writing."""
    def __init__(self, accel, warmup_steps=3):
        self.accel = accel
        self.warmup_steps = warmup_steps
        self.steps_seen = 0
        self.measured_steps = 0
        self.elapsed = 0.0
        self.mark = time.perf_counter() if warmup_steps == 0 else None

    def step(self):
        self.steps_seen += 1
        if self.steps_seen == self.warmup_steps:
            self.accel.synchronize()
            self.mark = time.perf_counter()
        elif self.steps_seen > self.warmup_steps:
            self.measured_steps += 1

    def pause(self):
        if self.mark is not None:
            self.accel.synchronize()
            self.elapsed += time.perf_counter() - self.mark
            self.mark = None

    def resume(self):
        if self.steps_seen >= self.warmup_steps:
            self.mark = time.perf_counter()

    def images_per_second(self, images_per_step):
        self.pause()
        if self.measured_steps == 0 or self.elapsed <= 0:
            return None
        return self.measured_steps * images_per_step / self.elapsed


def train_dino(args):
    validate_args(args)
    utils.make_output_dir(args.output_dir)
    trainer = Trainer(args)
    try:
        trainer.train()
    finally:
        utils.cleanup_distributed()


def main(argv=None):
    parser = OneLineErrorParser('DINO', parents=[get_args_parser()], allow_abbrev=False)
    args = parser.parse_args(argv)
    utils.run_cli(train_dino, args)


if __name__ == '__main__':
    main()
