"""Image preprocessing both sides share: the reference's ImageNet-style loader and `reconstruct`
resize a photo to the tokenizer's square input the same way."""
from __future__ import annotations


def center_crop_resize(img, image_size: int):
    """PIL image -> RGB, center square crop, bicubic resize to image_size (ADM-style, like ImageNet loaders)."""
    from PIL import Image

    img = img.convert("RGB")
    # Halve with a box filter while the short side is at least twice the target (keeps the
    # final bicubic from aliasing), then crop the central square and resize.
    while min(img.size) >= 2 * image_size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = image_size / min(img.size)
    img = img.resize(tuple(max(image_size, round(x * scale)) for x in img.size), resample=Image.BICUBIC)
    w, h = img.size
    left, top = (w - image_size) // 2, (h - image_size) // 2
    return img.crop((left, top, left + image_size, top + image_size))
