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
"""Self-attention of the [CLS] token in a ViT's last block, saved as PNG images.

For each image: img.png (the resized photo the model saw), attn-head<j>.png per
head, attn-mean.png (mean over heads), with --threshold the masks keeping that
fraction of the attention mass (mask_th<t>_head<j>.png, mask_th<t>_mean.png),
and overview.png with the photo and every head side by side. Only PIL and numpy
draw the pictures.
"""
import colorsys
import os
import random

import numpy as np
import torch
from PIL import Image, ImageDraw
from torchvision import transforms as pth_transforms
from torchvision.datasets.folder import IMG_EXTENSIONS

import utils
import vision_transformer as vits
from main_dino import OneLineErrorParser, open_image
from utils import UserError

# matplotlib's 'viridis' (the reference's plt.imsave default) sampled at 17 points, linearly interpolated.
_VIRIDIS = np.array([
    (0.2670, 0.0049, 0.3294), (0.2823, 0.0950, 0.4173), (0.2788, 0.1755, 0.4834), (0.2590, 0.2515, 0.5247),
    (0.2297, 0.3224, 0.5457), (0.1994, 0.3876, 0.5546), (0.1727, 0.4488, 0.5579), (0.1490, 0.5081, 0.5573),
    (0.1276, 0.5669, 0.5506), (0.1206, 0.6258, 0.5335), (0.1579, 0.6838, 0.5017), (0.2461, 0.7389, 0.4520),
    (0.3692, 0.7889, 0.3829), (0.5160, 0.8312, 0.2943), (0.6785, 0.8637, 0.1895), (0.8456, 0.8873, 0.0997),
    (0.9932, 0.9062, 0.1439)])
OVERVIEW_TILE = 224  # height in pixels of each picture in overview.png


def get_args_parser():
    parser = OneLineErrorParser('Visualize Self-Attention maps', allow_abbrev=False)
    parser.add_argument('--arch', default='vit_small', type=str,
        choices=['vit_tiny', 'vit_small', 'vit_base'], help='Architecture (support only ViT atm).')
    parser.add_argument('--patch_size', default=8, type=int, help='Patch resolution of the model.')
    parser.add_argument('--pretrained_weights', default='', type=str,
        help="Path to pretrained weights to load (a training checkpoint or released weights).")
    parser.add_argument("--checkpoint_key", default="teacher", type=str,
        help='Key to use in the checkpoint (example: "teacher")')
    parser.add_argument('--random_weights', action='store_true',
        help='Use a randomly initialised model instead of --pretrained_weights (to try the tool only).')
    parser.add_argument("--image_path", default=None, type=str,
        help="An image file, or a folder whose image files are all visualised.")
    parser.add_argument("--image_size", default=(480, 480), type=int, nargs="+", help="""Resize image:
        two values are (height, width); one value is the length of the shorter side. The result is then
        cropped to a multiple of the patch size.""")
    parser.add_argument('--output_dir', default='.', help='Path where to save visualizations.')
    parser.add_argument("--threshold", type=float, default=None, help="""We visualize masks
        obtained by thresholding the self-attention maps to keep xx%% of the mass (a fraction: 0.6 keeps 60%%).""")
    parser.add_argument('--device', default='auto', choices=utils.DEVICE_CHOICES,
        help='Where to run the model: auto picks npu, then cuda, then cpu.')
    return parser


def validate_args(args):
    if args.patch_size < 1:
        raise UserError(f"--patch_size must be positive (got {args.patch_size})")
    if len(args.image_size) not in (1, 2) or min(args.image_size) < 1:
        raise UserError(f"--image_size takes one or two positive sizes (got {args.image_size})")
    if args.threshold is not None and not 0.0 < args.threshold <= 1.0:
        raise UserError(f"--threshold is a fraction of the attention mass in (0, 1] (got {args.threshold})")
    if not args.image_path:
        raise UserError("no --image_path given (an image file or a folder of images)")
    if args.random_weights and args.pretrained_weights:
        raise UserError("--random_weights and --pretrained_weights exclude each other")
    if not args.random_weights and not args.pretrained_weights:
        raise UserError("no --pretrained_weights given (pass a checkpoint, or --random_weights to try the tool)")
    if args.pretrained_weights:
        utils.check_file_flag(args.pretrained_weights, "--pretrained_weights")


def build_model(args, accel):
    utils.fix_random_seeds(0)  # --random_weights gives the same network on every run
    model = vits.__dict__[args.arch](patch_size=args.patch_size, num_classes=0)
    for p in model.parameters():
        p.requires_grad = False
    model.eval()
    if args.random_weights:
        print("Using random weights (--random_weights): the maps show no learned structure.")
    else:
        utils.load_pretrained_weights(model, args.pretrained_weights, args.checkpoint_key, args.arch,
                                      args.patch_size)
    return accel.to(model)


def list_images(path):
    """The image files at `path` (a file, or a folder's image files in name order)."""
    if not os.path.exists(path):
        raise UserError(f"--image_path does not exist: {path}")
    if os.path.isfile(path):
        return [path]
    files = sorted(os.path.join(path, name) for name in os.listdir(path)
                   if name.lower().endswith(IMG_EXTENSIONS) and os.path.isfile(os.path.join(path, name)))
    if not files:
        raise UserError(f"no image files in {path} (looked for {', '.join(IMG_EXTENSIONS)})")
    return files


def prepare_image(img, image_size, patch_size):
    """(normalised 1x3xHxW tensor, HxWx3 uint8 photo), both cropped to a multiple of the patch size."""
    resized = pth_transforms.Resize(list(image_size))(img)
    width, height = resized.size
    height, width = height - height % patch_size, width - width % patch_size
    if height == 0 or width == 0:
        raise UserError(f"the image resized to {resized.size[1]}x{resized.size[0]} is smaller than one "
                        f"{patch_size}x{patch_size} patch; raise --image_size")
    photo = resized.crop((0, 0, width, height))
    to_tensor = pth_transforms.Compose([
        pth_transforms.ToTensor(),
        pth_transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])
    return to_tensor(photo).unsqueeze(0), np.asarray(photo)


@torch.no_grad()
def cls_self_attention(model, image):
    """(heads, tokens) attention of [CLS] over all tokens ([CLS] first) in the last block; rows sum to 1."""
    return model.get_last_selfattention(image)[0, :, 0, :].float()


def attention_maps(cls_attention, grid_h, grid_w):
    """(heads, grid_h, grid_w) attention paid by [CLS] to each patch."""
    return cls_attention[:, 1:].reshape(-1, grid_h, grid_w)


def threshold_masks(maps, threshold):
    """Per head, the smallest set of patches holding at least `threshold` of the head's patch attention."""
    heads = maps.shape[0]
    flat = maps.reshape(heads, -1)
    values, order = torch.sort(flat, dim=1, descending=True)
    mass_before = (values.cumsum(dim=1) - values) / values.sum(dim=1, keepdim=True)
    keep_sorted = mass_before < threshold  # a patch stays while the larger ones hold less than the target
    mask = torch.zeros_like(keep_sorted)
    mask.scatter_(1, order, keep_sorted)
    return mask.reshape(maps.shape)


def upsample(array, factor):
    """Nearest-neighbour enlargement of the last two axes (one patch -> factor x factor pixels)."""
    return np.repeat(np.repeat(array, factor, axis=-2), factor, axis=-1)


def colorize(values):
    """Min-max scaled viridis picture of a 2-D array."""
    values = np.asarray(values, dtype=np.float64)
    span = values.max() - values.min()
    scaled = (values - values.min()) / span if span > 0 else np.zeros_like(values)
    anchors = np.linspace(0.0, 1.0, len(_VIRIDIS))
    rgb = np.stack([np.interp(scaled, anchors, _VIRIDIS[:, c]) for c in range(3)], axis=-1)
    return (rgb * 255 + 0.5).astype(np.uint8)


def even_hues(count, brightness=1.0):
    """`count` evenly spaced saturated hues, RGB in [0, 1]."""
    return [colorsys.hsv_to_rgb(i / max(count, 1), 1.0, brightness) for i in range(count)]


def head_colors(count):
    """Evenly spaced bright hues, one per head, RGB in 0-255."""
    return [tuple(int(255 * c) for c in rgb) for rgb in even_hues(count)]


def apply_mask(image, mask, color, alpha=0.5):
    """The reference's helper: tints `image` (H x W x 3, values 0-255, changed in place) with `color` (RGB in
    [0, 1]) in proportion to `mask`."""
    for c in range(3):
        image[:, :, c] = image[:, :, c] * (1 - alpha * mask) + alpha * mask * color[c] * 255
    return image


def random_colors(N, bright=True):
    """The reference's helper: N evenly spaced hues (RGB in [0, 1]) in random order."""
    colors = even_hues(N, 1.0 if bright else 0.7)
    random.shuffle(colors)
    return colors


def mask_outline(mask):
    """The pixels of a boolean mask that touch a pixel outside it (4-neighbourhood)."""
    mask = np.asarray(mask, dtype=bool)
    padded = np.pad(mask, 1, mode="constant")
    interior = (padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1]
                & padded[1:-1, :-2] & padded[1:-1, 2:])
    return mask & ~interior


def overlay_mask(photo, mask, color, alpha=0.5):
    """The photo tinted with `color` (0-255) where mask is set, with the mask's outline drawn in that colour."""
    out = apply_mask(photo.astype(np.float32), mask.astype(np.float32), [c / 255 for c in color], alpha)
    out[mask_outline(mask)] = color
    return out.clip(0, 255).astype(np.uint8)


def box_blur(values, size=10):
    """Mean over size x size windows (edges mirrored), as the reference's cv2.blur(mask, (10, 10))."""
    values = np.asarray(values, dtype=np.float32)
    before, after = size // 2, size - 1 - size // 2
    padded = np.pad(values, ((before, after), (before, after)), mode="reflect")
    windows = np.lib.stride_tricks.sliding_window_view(padded, (size, size))
    return windows.mean(axis=(-2, -1))


def display_instances(image, mask, fname="test", figsize=(5, 5), blur=False, contour=True, alpha=0.5):
    """The reference's picture of one mask over an image, written to `fname` (.png added without an extension)
    with PIL instead of matplotlib: a random bright colour, the mask box-blurred with `blur`, its outline with
    `contour`. The picture keeps the image's pixel size; `figsize` is accepted for scripts written for the
    reference."""
    color = random_colors(1)[0]
    mask = np.asarray(mask, dtype=np.float32)
    if blur:
        mask = box_blur(mask)
    masked = apply_mask(np.asarray(image, dtype=np.float32).copy(), mask, color, alpha)
    if contour:
        masked[mask_outline(mask > 0.5)] = np.asarray(color) * 255
    if not os.path.splitext(fname)[1]:
        fname += ".png"  # as matplotlib's savefig
    Image.fromarray(masked.clip(0, 255).astype(np.uint8)).save(fname)
    print(f"{fname} saved.")


def _tile(array, label):
    img = Image.fromarray(array)
    width = max(1, round(img.width * OVERVIEW_TILE / img.height))
    img = img.resize((width, OVERVIEW_TILE), Image.NEAREST)
    tile = Image.new("RGB", (width, OVERVIEW_TILE + 14), "white")
    tile.paste(img, (0, 14))
    ImageDraw.Draw(tile).text((2, 1), label, fill="black")
    return tile


def overview(rows, gap=4):
    """One picture from rows of (array, label) tiles."""
    rows = [[_tile(a, label) for a, label in row] for row in rows]
    width = max(sum(t.width for t in row) + gap * (len(row) - 1) for row in rows)
    height = sum(row[0].height for row in rows) + gap * (len(rows) - 1)
    canvas = Image.new("RGB", (width, height), "white")
    y = 0
    for row in rows:
        x = 0
        for tile in row:
            canvas.paste(tile, (x, y))
            x += tile.width + gap
        y += row[0].height + gap
    return canvas


def save_png(array_or_image, path):
    img = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
    img.save(path)
    print(f"{path} saved.")


def visualize(model, accel, image_path, out_dir, args):
    """Writes the pictures of one image into out_dir; returns the (heads, grid_h, grid_w) attention maps."""
    tensor, photo = prepare_image(open_image(image_path), args.image_size, args.patch_size)
    grid_h, grid_w = tensor.shape[-2] // args.patch_size, tensor.shape[-1] // args.patch_size
    maps = attention_maps(cls_self_attention(model, accel.to(tensor)).cpu(), grid_h, grid_w)
    mean_map = maps.mean(dim=0, keepdim=True)
    heads = maps.shape[0]

    os.makedirs(out_dir, exist_ok=True)
    save_png(photo, os.path.join(out_dir, "img.png"))
    pixel_maps = upsample(maps.numpy(), args.patch_size)
    heatmaps = [colorize(m) for m in pixel_maps]
    for j, heatmap in enumerate(heatmaps):
        save_png(heatmap, os.path.join(out_dir, f"attn-head{j}.png"))
    mean_heatmap = colorize(upsample(mean_map.numpy(), args.patch_size)[0])
    save_png(mean_heatmap, os.path.join(out_dir, "attn-mean.png"))
    rows = [[(photo, "image"), (mean_heatmap, "mean")] + [(h, f"head {j}") for j, h in enumerate(heatmaps)]]

    if args.threshold is not None:
        colors = head_colors(heads + 1)
        masks = upsample(threshold_masks(torch.cat([maps, mean_map]), args.threshold).numpy(), args.patch_size)
        names = [f"head{j}" for j in range(heads)] + ["mean"]
        overlays = [overlay_mask(photo, m, c) for m, c in zip(masks, colors)]
        for name, picture in zip(names, overlays):
            save_png(picture, os.path.join(out_dir, f"mask_th{args.threshold}_{name}.png"))
        rows.append([(photo, f"{args.threshold:g} of the mass"), (overlays[-1], "mean")]
                    + [(o, f"head {j}") for j, o in enumerate(overlays[:-1])])
    save_png(overview(rows), os.path.join(out_dir, "overview.png"))
    return maps


def output_folders(images, output_dir):
    """One image: output_dir itself (as the reference); several: output_dir/<file name without extension>."""
    if len(images) == 1:
        return [output_dir]
    stems = [os.path.splitext(os.path.basename(p))[0] for p in images]
    return [os.path.join(output_dir, stem if stems.count(stem) == 1 else os.path.basename(p))
            for stem, p in zip(stems, images)]


def main_visualize(args):
    validate_args(args)
    images = list_images(args.image_path)
    utils.make_output_dir(args.output_dir)
    accel = utils.Accelerator.create(args.device)
    model = build_model(args, accel)
    for image_path, out_dir in zip(images, output_folders(images, args.output_dir)):
        visualize(model, accel, image_path, out_dir, args)


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    utils.run_cli(main_visualize, args)


if __name__ == '__main__':
    main()
