"""Rewards on transformers CLIP models: PickScore, CLIPScore and the LAION aesthetic predictor."""
from __future__ import annotations

import gzip
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, CLIPVisionModelWithProjection
from transformers.utils import logging as transformers_logging

from .base import ModelReward
from .checkpoints import read_state_dict
from .heads import MLPHead
from .preprocess import ImageTransform
from .registry import register_reward
from .weights import AESTHETIC_CHECKPOINT, EXPECTED_FILES, resolve_weights, with_repo

CLIP_MAX_LENGTH = 77
_TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))  # either layout of a saved tokenizer


@contextmanager
def _quiet_transformers():
    previous = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(previous)


def _features(output) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected embedding
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _open_clip_bpe_tokenizer() -> CLIPTokenizer:
    """The real 49408-token CLIP BPE tokenizer, built from the vocabulary file the open_clip wheel ships."""
    import open_clip

    from promptloop.testing.tokenizers import byte_symbols

    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    merges = [tuple(m.split()) for m in gzip.open(bpe).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]]
    symbols = byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + ["<|startoftext|>",
                                                                                      "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges, model_max_length=CLIP_MAX_LENGTH)


def load_clip_tokenizer(folder: Path) -> CLIPTokenizer:
    """The tokenizer saved beside a CLIP model, else the standard CLIP BPE (all OpenAI/LAION CLIPs share it)."""
    if any(all((folder / name).is_file() for name in layout) for layout in _TOKENIZER_FILES):
        return CLIPTokenizer.from_pretrained(str(folder))
    try:
        return _open_clip_bpe_tokenizer()
    except ImportError as exc:
        raise FileNotFoundError(
            f"No CLIP tokenizer: put tokenizer.json (or vocab.json and merges.txt) in {folder}/ or install "
            "open-clip-torch (pip install 'promptloop[rewards]'), whose wheel ships the CLIP vocabulary."
        ) from exc


class _CLIPTextImageReward(ModelReward):
    """Shared loading and embedding for rewards computed from CLIP image and text embeddings."""

    def _load_clip(self, folder: Path) -> None:
        self.tokenizer = load_clip_tokenizer(folder)
        self.model = self.place(CLIPModel.from_pretrained(str(folder), dtype=self.dtype))
        self.transform = ImageTransform(size=self.model.config.vision_config.image_size)

    def cosine(self, images, queries) -> torch.Tensor:
        tokens = self.tokenizer(queries, padding=True, truncation=True, max_length=CLIP_MAX_LENGTH,
                                return_tensors="pt").to(self.device)
        pixels = self.transform(images).to(self.device, self.dtype)
        image = F.normalize(_features(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1)
        text = F.normalize(_features(self.model.get_text_features(**tokens)).float(), dim=-1)
        return (image * text).sum(-1)


@register_reward("pickscore")
class PickScore(_CLIPTextImageReward):
    """PickScore_v1: ``logit_scale.exp() * cos(image, query)`` of a fine-tuned CLIP-H (about 17-23 on real images).

    Files: ``config.json`` and ``model.safetensors`` of yuvalkirstain/PickScore_v1; the tokenizer is read from
    the same folder or built from open_clip's CLIP vocabulary.
    """

    name = "pickscore"

    def __init__(self, path=None, cache_dir=None, download: bool = False, device=None, dtype=None,
                 on_nonfinite: str = "warn"):
        super().__init__(device=device, dtype=dtype, on_nonfinite=on_nonfinite)
        self._load_clip(resolve_weights(EXPECTED_FILES["pickscore"], path, cache_dir, download).folders[""])

    def score_batch(self, images, queries, metadata):
        return self.model.logit_scale.exp().float() * self.cosine(images, queries)


@register_reward("clipscore")
class CLIPScore(_CLIPTextImageReward):
    """CLIPScore (Hessel et al. 2021): ``weight * max(cos(image, prefix + query), 0)``, weight 2.5.

    Args:
        model: hub id of the CLIP model (default openai/clip-vit-base-patch32, as in the paper); ``path`` gives a
            local folder instead.
        weight: the paper's rescaling w.
        prefix: text put before each query; the paper uses "A photo depicts ".
    """

    name = "clipscore"

    def __init__(self, path=None, cache_dir=None, download: bool = False, model: str | None = None,
                 weight: float = 2.5, prefix: str = "A photo depicts ", device=None, dtype=None,
                 on_nonfinite: str = "warn"):
        super().__init__(device=device, dtype=dtype, on_nonfinite=on_nonfinite)
        weights = EXPECTED_FILES["clipscore"]
        if model is not None:
            weights = with_repo(weights, model, f"clipscore/{model.replace('/', '--')}")
        self._load_clip(resolve_weights(weights, path, cache_dir, download).folders[""])
        self.weight = weight
        self.prefix = prefix

    def score_batch(self, images, queries, metadata):
        cosine = self.cosine(images, [self.prefix + q for q in queries])
        return self.weight * cosine.clamp(min=0)


@register_reward("aesthetic")
class AestheticScore(ModelReward):
    """LAION improved aesthetic predictor: an MLP on L2-normalised CLIP ViT-L/14 image embeddings (about 1-10).

    Files: ``sac+logos+ava1-l14-linearMSE.pth`` (or a ``.safetensors`` conversion) in the folder, and the CLIP
    ViT-L/14 (``config.json``, ``model.safetensors`` of openai/clip-vit-large-patch14) in its ``clip/`` sub-folder.
    The query is not read.
    """

    name = "aesthetic"
    reads_query = False

    def __init__(self, path=None, cache_dir=None, download: bool = False, device=None, dtype=None,
                 on_nonfinite: str = "warn"):
        super().__init__(device=device, dtype=dtype, on_nonfinite=on_nonfinite)
        resolved = resolve_weights(EXPECTED_FILES["aesthetic"], path, cache_dir, download)
        self.head = MLPHead.from_state_dict(read_state_dict(resolved.files[AESTHETIC_CHECKPOINT]))
        self.head = self.place(self.head).float()
        clip_folder = str(resolved.folders["clip"])
        config = CLIPConfig.from_pretrained(clip_folder)
        config.vision_config.projection_dim = config.projection_dim  # the sub-config may carry a stale default
        with _quiet_transformers():  # the CLIP checkpoint's text tower is expected to go unused
            clip = CLIPVisionModelWithProjection.from_pretrained(clip_folder, config=config.vision_config,
                                                                 dtype=self.dtype)
        self.clip = self.place(clip)
        self.transform = ImageTransform(size=self.clip.config.image_size)

    def score_batch(self, images, queries, metadata):
        pixels = self.transform(images).to(self.device, self.dtype)
        embeds = F.normalize(self.clip(pixel_values=pixels).image_embeds.float(), dim=-1)
        return self.head(embeds)
