"""Cobra's image transforms, in PIL and torch, reproducing its torchvision pipelines.

Cobra builds each featurizer's transform from timm's eval transform (Resize of the shorter
side, CenterCrop, ToTensor, Normalize; bicubic) and then applies its ``image_resize_strategy``
(cobra/models/backbones/vision/base_vision.py, dinosiglip_vit.py):

- ``resize-naive`` (every released model): Resize((S, S)) — the whole image, squashed, no crop;
- ``resize-crop``: Resize(S) of the shorter side, then CenterCrop(S);
- ``letterbox``: pad to a square with the normalization mean (as 0-255 ints), then as resize-crop.

SigLIP's timm default resizes to S / 0.9 before cropping; Cobra replaces that Resize with
Resize(S), so both of its towers share the geometry above and differ only in mean/std (and
the letterbox fill). The recorded outputs of timm + torchvision pin this down
(tests/model/test_cobra.py).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageOps

from model.cobra.config import TIMM_ARCHS

BICUBIC = Image.Resampling.BICUBIC


def resize_bicubic(image: Image.Image, w: int, h: int) -> Image.Image:
    """PIL's bicubic resize, width pass first, then height. Pillow resamples in two passes with
    an 8-bit image between them; Pillow 13 may run the height pass first, which rounds that
    intermediate differently (a few levels of 255 on small images). Two explicit passes give
    the order of the Pillow that Cobra was trained with, on any Pillow."""
    if image.size[0] != w:
        image = image.resize((w, image.size[1]), BICUBIC)
    return image if image.size[1] == h else image.resize((w, h), BICUBIC)


def resize_shorter(image: Image.Image, size: int) -> Image.Image:
    """torchvision ``Resize(size)`` on a PIL image: the shorter side becomes ``size``."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    return resize_bicubic(image, new_w, new_h)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """torchvision ``CenterCrop(size)`` for an image at least ``size`` on each side."""
    w, h = image.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def letterbox(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Cobra's ``LetterboxPad``: symmetric constant padding towards a square (an odd difference
    leaves it one pixel short; the center crop that follows takes care of that)."""
    (w, h), m = image.size, max(image.size)
    hp, vp = int((m - w) / 2), int((m - h) / 2)
    return ImageOps.expand(image, border=(hp, vp, hp, vp), fill=fill)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """torchvision ``ToTensor``: (3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)


class CobraImageTransform:
    """PIL image -> (3 * k, S, S) float32: each of the k featurizers' normalized pixels, stacked on
    the channel axis in featurizer order (a DINOv2 + SigLIP model gets 6 channels)."""

    def __init__(self, archs: list[str], size: int, strategy: str = "resize-naive"):
        self.size, self.strategy = size, strategy
        self.norms = [(torch.tensor(TIMM_ARCHS[a].mean).view(3, 1, 1), torch.tensor(TIMM_ARCHS[a].std).view(3, 1, 1))
                      for a in archs]
        self.fills = [tuple(int(x * 255) for x in TIMM_ARCHS[a].mean) for a in archs]

    def geometry(self, image: Image.Image, fill: tuple[int, int, int] | None = None) -> Image.Image:
        if self.strategy == "resize-naive":
            return resize_bicubic(image, self.size, self.size)
        if self.strategy == "letterbox":
            image = letterbox(image, fill)
        return center_crop(resize_shorter(image, self.size), self.size)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB")
        shared = None if self.strategy == "letterbox" else to_tensor(self.geometry(image))
        out = []
        for (mean, std), fill in zip(self.norms, self.fills):
            # the letterbox fill is each featurizer's own mean, so only then is the geometry per featurizer
            pixels = shared if shared is not None else to_tensor(self.geometry(image, fill))
            out.append((pixels - mean) / std)
        return torch.cat(out, dim=0)
