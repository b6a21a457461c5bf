"""Small fake datasets on disk for loader and recipe tests."""

import numpy as np


def write_image_folder(root, height: int, width: int, suffix: str) -> None:
    """An ImageNet-style tree ``root/{train,val}/{n01,n02}/{0,1}.<suffix>`` of random RGB images of
    ``height`` × ``width`` pixels (PIL required)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("n01", "n02"):
            (root / split / cls).mkdir(parents=True)
            for i in range(2):
                pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.{suffix}")
