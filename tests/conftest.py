"""Shared fixtures: real small image sets written as ImageFolder trees."""
import os
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def write_digits(root, n_train=None, n_val=None, size=None):
    """The UCI handwritten digits (scikit-learn) as PNG class folders train/<digit> and val/<digit>.

    Every 5th image goes to val/. `size` upsamples the 8x8 images (nearest).
    """
    from sklearn.datasets import load_digits
    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    counts = {"train": 0, "val": 0}
    for i, (img, label) in enumerate(zip(images, digits.target)):
        split = "val" if i % 5 == 0 else "train"
        limit = n_val if split == "val" else n_train
        if limit is not None and counts[split] >= limit:
            continue
        folder = os.path.join(root, split, str(label))
        os.makedirs(folder, exist_ok=True)
        pil = Image.fromarray(img, mode="L")
        if size:
            pil = pil.resize((size, size), Image.NEAREST)
        pil.save(os.path.join(folder, f"{i:04d}.png"))
        counts[split] += 1
    return root


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory):
    """Full digits set: about 1437 train and 360 val images in 10 classes."""
    return write_digits(str(tmp_path_factory.mktemp("digits")))


@pytest.fixture(scope="session")
def photos_dir(tmp_path_factory):
    """Three real photos from scikit-image, saved as JPEG."""
    from skimage import data
    folder = tmp_path_factory.mktemp("photos")
    for name in ("astronaut", "coffee", "chelsea"):
        Image.fromarray(getattr(data, name)()).save(folder / f"{name}.jpg", quality=95)
    return str(folder)
