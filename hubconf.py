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
"""torch.hub entry points; nothing is downloaded unless a URL is passed as `weights`.

    model = torch.hub.load("/path/to/this/package", "dino_vits16", source="local",
                           weights="/path/to/checkpoint.pth")

`weights` is a local file (released backbone weights, or a main_dino.py checkpoint,
whose `checkpoint_key` entry is used, "teacher" by default), loaded strictly; or a
URL, downloaded once into torch.hub's cache. `pretrained=False` without weights
gives a randomly initialised model.
"""
import os
from urllib.parse import urlparse

import torch
from torchvision.models.resnet import resnet50

import utils
import vision_transformer as vits
from utils import UserError

dependencies = ["torch", "torchvision"]

# Where the reference's released backbones are published; only named in messages, never fetched implicitly.
RELEASED_WEIGHTS = {
    "dino_vits16": "https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth",
    "dino_vits8": "https://dl.fbaipublicfiles.com/dino/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth",
    "dino_vitb16": "https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
    "dino_vitb8": "https://dl.fbaipublicfiles.com/dino/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth",
    "dino_resnet50": "https://dl.fbaipublicfiles.com/dino/dino_resnet50_pretrain/dino_resnet50_pretrain.pth",
}


def _is_url(weights):
    return isinstance(weights, str) and urlparse(weights).scheme in ("http", "https", "ftp")


def _download(url, progress=True):
    """The file at `url` in torch.hub's checkpoint cache (downloaded only if not there yet)."""
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, os.path.basename(urlparse(url).path) or "weights.pth")
    if not os.path.isfile(path):
        try:
            torch.hub.download_url_to_file(url, path, progress=progress)
        except Exception as err:  # urllib raises several types
            raise UserError(f"could not download {url}: {err}") from err
    return path


def _check_request(entry, pretrained, weights):
    """Refuses a request for pretrained weights without a file or URL, before building anything."""
    if weights is None and pretrained:
        raise UserError(
            f"{entry}: no weights given, and this package downloads nothing by itself. Pass "
            f"weights=<local file> (e.g. {RELEASED_WEIGHTS[entry]} saved beforehand, or a main_dino.py "
            f"checkpoint), weights=<URL> to download explicitly, or pretrained=False for random weights")


def _load_weights(model, weights, checkpoint_key, arch, patch_size=None):
    if weights is None:
        return model
    path = _download(weights) if _is_url(weights) else os.fspath(weights)
    utils.load_pretrained_weights(model, path, checkpoint_key, arch, patch_size)
    return model


def _vit(entry, arch, patch_size, pretrained, weights, checkpoint_key, kwargs):
    _check_request(entry, pretrained, weights)
    model = vits.__dict__[arch](patch_size=patch_size, num_classes=0, **kwargs)
    return _load_weights(model, weights, checkpoint_key, arch, patch_size)


def dino_vits16(pretrained=True, weights=None, checkpoint_key="teacher", **kwargs):
    """
    ViT-Small/16x16 pre-trained with DINO.
    Achieves 74.5% top-1 accuracy on ImageNet with k-NN classification.
    """
    return _vit("dino_vits16", "vit_small", 16, pretrained, weights, checkpoint_key, kwargs)


def dino_vits8(pretrained=True, weights=None, checkpoint_key="teacher", **kwargs):
    """
    ViT-Small/8x8 pre-trained with DINO.
    Achieves 78.3% top-1 accuracy on ImageNet with k-NN classification.
    """
    return _vit("dino_vits8", "vit_small", 8, pretrained, weights, checkpoint_key, kwargs)


def dino_vitb16(pretrained=True, weights=None, checkpoint_key="teacher", **kwargs):
    """
    ViT-Base/16x16 pre-trained with DINO.
    Achieves 76.1% top-1 accuracy on ImageNet with k-NN classification.
    """
    return _vit("dino_vitb16", "vit_base", 16, pretrained, weights, checkpoint_key, kwargs)


def dino_vitb8(pretrained=True, weights=None, checkpoint_key="teacher", **kwargs):
    """
    ViT-Base/8x8 pre-trained with DINO.
    Achieves 77.4% top-1 accuracy on ImageNet with k-NN classification.
    """
    return _vit("dino_vitb8", "vit_base", 8, pretrained, weights, checkpoint_key, kwargs)


def dino_resnet50(pretrained=True, weights=None, checkpoint_key="teacher", **kwargs):
    """
    ResNet-50 pre-trained with DINO.
    Achieves 75.3% top-1 accuracy on ImageNet linear evaluation benchmark (requires to train `fc`).
    """
    _check_request("dino_resnet50", pretrained, weights)
    model = resnet50(**kwargs)  # randomly initialised on every torchvision version
    model.fc = torch.nn.Identity()
    return _load_weights(model, weights, checkpoint_key, "resnet50")
