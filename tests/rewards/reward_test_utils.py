"""Image helpers shared by the reward tests."""
import numpy as np
import torch
from PIL import Image

from promptloop.testing.tiny_rewards import TINY_IMAGE_SIZE


def random_images(n, size=(40, 48), seed=0):
    rng = np.random.RandomState(seed)
    return [Image.fromarray((rng.rand(size[0], size[1], 3) * 255).astype("uint8")) for _ in range(n)]


def native_images(n, seed=0):
    """Images already at the tiny models' input size, so resizing is the identity."""
    return random_images(n, (TINY_IMAGE_SIZE, TINY_IMAGE_SIZE), seed)


def pil_to_tensor(images):
    return torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255 for im in images])
