"""Image preprocessing shared by the scorers: resize the short side, centre-crop, normalise.

PIL images follow each reference pipeline exactly (PIL bicubic resize before ``ToTensor``, or ``ToTensor`` first as
HPSv2 does); tensor images (B, 3, H, W) in [0, 1] are resized in torch (bicubic, antialiased).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

from .base import Images

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImageTransform:
    """Turns a batch of images into normalised pixel values (B, 3, size, size), float32.

    Attributes:
        size: the square input size of the vision tower.
        mean: per-channel mean subtracted after scaling to [0, 1].
        std: per-channel std divided by.
        resize_pil: resize PIL images with PIL before converting to a tensor (CLIP, BLIP); False converts first and
            resizes the tensor (HPSv2's open_clip transform).
    """

    size: int
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    resize_pil: bool = True

    def _resize_crop(self, image):
        image = TF.resize(image, self.size, interpolation=InterpolationMode.BICUBIC, antialias=True)
        return TF.center_crop(image, [self.size, self.size])

    def __call__(self, images: Images) -> torch.Tensor:
        if isinstance(images, torch.Tensor):
            pixels = self._resize_crop(images.float())
        elif self.resize_pil:
            pixels = torch.stack([TF.to_tensor(self._resize_crop(im.convert("RGB"))) for im in images])
        else:
            pixels = torch.stack([self._resize_crop(TF.to_tensor(im.convert("RGB"))) for im in images])
        return TF.normalize(pixels, self.mean, self.std)
