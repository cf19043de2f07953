"""visualize_attention.py on real photos: the pictures it writes and the maths behind them."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import visualize_attention as va
import vision_transformer as vits
from helpers import run_py

ARCH, PATCH, HEADS = "vit_tiny", 16, 3  # vit_tiny has 3 heads


@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory):
    """A main_dino.py-style checkpoint whose teacher backbone is a seeded vit_tiny/16."""
    torch.manual_seed(0)
    model = vits.vit_tiny(patch_size=PATCH)
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pth"
    torch.save({"teacher": {"backbone." + k: v for k, v in model.state_dict().items()},
                "student": {"module.backbone." + k: v for k, v in model.state_dict().items()}}, path)
    return str(path), model.eval()


def test_folder_of_photos_gives_every_picture(photos_dir, teacher_checkpoint, tmp_path):
    ckpt, _ = teacher_checkpoint
    out = tmp_path / "out"
    result = run_py("visualize_attention.py", "--arch", ARCH, "--patch_size", PATCH, "--pretrained_weights", ckpt,
                    "--image_path", photos_dir, "--image_size", 100, "--threshold", 0.6, "--device", "cpu",
                    "--output_dir", out, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Take key teacher" in result.stdout
    for name in ("astronaut", "chelsea", "coffee"):
        folder = out / name
        photo_size = Image.open(folder / "img.png").size  # (width, height)
        # shorter side resized to 100, then both sides cropped down to a multiple of 16
        original = Image.open(os.path.join(photos_dir, name + ".jpg")).size
        short, long_ = min(original), max(original)
        expected_long = int(100 * long_ / short) // PATCH * PATCH
        expected = (96, expected_long) if original[0] <= original[1] else (expected_long, 96)
        assert photo_size == expected, name
        pictures = [f"attn-head{j}.png" for j in range(HEADS)] + ["attn-mean.png"]
        pictures += [f"mask_th0.6_head{j}.png" for j in range(HEADS)] + ["mask_th0.6_mean.png"]
        for picture in pictures:
            img = Image.open(folder / picture)
            assert img.size == photo_size and img.mode == "RGB", (name, picture)
        heads = [np.asarray(Image.open(folder / f"attn-head{j}.png")) for j in range(HEADS)]
        assert not all(np.array_equal(heads[0], h) for h in heads[1:])  # the heads differ
        overview = Image.open(folder / "overview.png")
        # two rows (maps, masks) of photo + mean + one tile per head
        assert overview.width > (HEADS + 2) * va.OVERVIEW_TILE * photo_size[0] / photo_size[1]
        assert overview.height > 2 * va.OVERVIEW_TILE


def test_attention_rows_sum_to_one_and_masks_keep_the_mass(photos_dir, teacher_checkpoint):
    _, model = teacher_checkpoint
    img = va.open_image(os.path.join(photos_dir, "astronaut.jpg"))
    tensor, photo = va.prepare_image(img, [72, 88], PATCH)
    assert tensor.shape == (1, 3, 64, 80) and photo.shape == (64, 80, 3)
    cls_attention = va.cls_self_attention(model, tensor)
    assert cls_attention.shape == (HEADS, 1 + 4 * 5)
    assert torch.allclose(cls_attention.sum(dim=1), torch.ones(HEADS), atol=1e-5)
    maps = va.attention_maps(cls_attention, 4, 5)
    assert torch.equal(maps[1, 2, 3], cls_attention[1, 1 + 2 * 5 + 3])  # row-major patch order

    for threshold in (0.3, 0.6, 0.9):
        masks = va.threshold_masks(maps, threshold)
        for head in range(HEADS):
            weights = maps[head][masks[head]]
            kept = weights.sum() / maps[head].sum()
            assert kept >= threshold - 1e-6
            # minimal: without its weakest patch the mask holds less than the threshold
            assert (weights.sum() - weights.min()) / maps[head].sum() < threshold
            # and it keeps the strongest patches
            assert weights.min() >= maps[head][~masks[head]].max()


def test_any_image_size_and_a_single_file(photos_dir, teacher_checkpoint, tmp_path):
    ckpt, _ = teacher_checkpoint
    va.main(["--arch", ARCH, "--patch_size", str(PATCH), "--pretrained_weights", ckpt, "--image_path",
             os.path.join(photos_dir, "coffee.jpg"), "--image_size", "50", "70", "--device", "cpu",
             "--output_dir", str(tmp_path)])
    assert Image.open(tmp_path / "img.png").size == (64, 48)  # (70, 50) cropped to multiples of 16
    assert Image.open(tmp_path / "attn-mean.png").size == (64, 48)
    assert not list(tmp_path.glob("mask_*"))  # no --threshold, no masks (as the reference)


def test_colormap_runs_from_dark_to_bright():
    picture = va.colorize(np.arange(16, dtype=np.float32).reshape(4, 4))
    brightness = picture.astype(np.float32).sum(axis=-1).reshape(-1)
    assert picture.dtype == np.uint8 and picture.shape == (4, 4, 3)
    assert np.all(np.diff(brightness) > 0)
    flat = va.colorize(np.ones((2, 2)))  # one colour, not a division by zero
    assert np.array_equal(flat, np.broadcast_to(flat[0, 0], flat.shape))


@pytest.mark.parametrize("args, message", [
    (["--image_path", "{photos}/missing.jpg", "--random_weights"], "does not exist"),
    (["--image_path", "{photos}"], "--pretrained_weights"),
    (["--image_path", "{photos}", "--pretrained_weights", "{photos}/astronaut.jpg"], "astronaut.jpg"),
    (["--image_path", "{photos}", "--pretrained_weights", "{photos}/nope.pth"], "--pretrained_weights: no such"),
    (["--image_path", "{photos}", "--pretrained_weights", "{photos}"], "is a folder, not a checkpoint file"),
    (["--image_path", "{photos}", "--random_weights", "--threshold", "1.5"], "--threshold"),
    (["--image_path", "{photos}", "--random_weights", "--image_size", "8"], "smaller than one"),
    (["--image_path", "{empty}", "--random_weights"], "no image files"),
    (["--image_path", "{bad}", "--random_weights"], "cannot read image"),
    (["--image_path", "{photos}", "--random_weights", "--output_dir", "{bad}/maps"], "cannot create --output_dir"),
])
def test_bad_input_is_one_line(photos_dir, tmp_path, capsys, args, message):
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    args = [a.format(photos=photos_dir, empty=empty, bad=bad) for a in args]
    with pytest.raises(SystemExit) as exit_info:
        va.main(["--arch", ARCH, "--patch_size", str(PATCH), "--device", "cpu",
                 "--output_dir", str(tmp_path / "out"), *args])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines


def test_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        va.main(["--help"])
    assert exit_info.value.code == 0
    assert "--threshold" in capsys.readouterr().out


def test_reference_mask_helpers(tmp_path):
    """apply_mask, random_colors and display_instances keep the reference's names and arguments."""
    image = np.full((20, 30, 3), 100.0)
    mask = np.zeros((20, 30))
    mask[5:15, 10:20] = 1.0
    tinted = va.apply_mask(image.copy(), mask, (1.0, 0.0, 0.0), alpha=0.5)
    assert np.allclose(tinted[10, 15], [0.5 * 100 + 0.5 * 255, 50, 50]) and np.allclose(tinted[0, 0], 100)

    colors = va.random_colors(6)
    assert len(colors) == 6 and all(0 <= c <= 1 for rgb in colors for c in rgb) and max(map(max, colors)) == 1.0
    assert sorted(colors) == sorted(va.random_colors(6))  # the same hues, in random order
    assert max(map(max, va.random_colors(3, bright=False))) == pytest.approx(0.7)

    photo = np.full((20, 30, 3), 100, dtype=np.uint8)
    va.display_instances(photo, mask, fname=str(tmp_path / "mask"), figsize=(5, 5), blur=False, contour=True)
    picture = np.asarray(Image.open(tmp_path / "mask.png"))  # the extension added, as matplotlib's savefig
    assert picture.shape == (20, 30, 3)
    assert np.array_equal(picture[0, 0], [100, 100, 100]) and not np.array_equal(picture[10, 15], [100, 100, 100])
    outline = va.mask_outline(mask > 0.5)
    assert outline.sum() == 2 * 10 + 2 * 8 and not outline[10, 15] and outline[5, 15]

    blurred = va.box_blur(mask)
    assert blurred.shape == mask.shape and 0 < blurred[5, 10] < 1 and blurred[10, 15] == pytest.approx(1.0)
    assert blurred.sum() == pytest.approx(mask.sum(), rel=0.02)  # a blur moves mass, it does not make it
