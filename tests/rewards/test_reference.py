"""Equivalence with the reference packages (optional group: ``pytest -m reference``).

Random weights are built in the reference architecture, saved as the published files, loaded through our loader,
and both implementations score the same images and queries. Needs ``image-reward`` (with timm) / ``hpsv2``
importable; each test is skipped where its package is absent.
"""
import json
import string
import sys
import types

import pytest
import torch

from promptloop.rewards import load_reward
from promptloop.rewards.imagereward import make_blip_tokenizer
from promptloop.testing.tiny_rewards import BERT_SPECIAL_TOKENS, randomize_
from reward_test_utils import random_images

pytestmark = pytest.mark.reference
QUERIES = ["a red cat on a sofa", "two blue dogs"]


def _shim_image_reward_for_transformers_5():
    """The five test-only patches ImageReward 1.5 needs on transformers 5 (see shared/recipes/ir_random.py)."""
    import transformers.modeling_utils as mu
    import transformers.pytorch_utils as pu
    from transformers import PreTrainedModel

    mu.apply_chunking_to_forward = pu.apply_chunking_to_forward
    mu.prune_linear_layer = pu.prune_linear_layer
    mu.find_pruneable_heads_and_indices = getattr(pu, "find_pruneable_heads_and_indices", lambda *a, **k: None)
    if "fairscale" not in sys.modules:  # only used for gradient checkpointing
        try:
            import fairscale  # noqa: F401
        except ImportError:
            stub = types.ModuleType("fairscale.nn.checkpoint.checkpoint_activations")
            stub.checkpoint_wrapper = lambda module, *a, **k: module
            for name in ("fairscale", "fairscale.nn", "fairscale.nn.checkpoint"):
                sys.modules.setdefault(name, types.ModuleType(name))
            sys.modules["fairscale.nn.checkpoint.checkpoint_activations"] = stub
    med_mod = pytest.importorskip("ImageReward.models.BLIP.med")
    original_init_weights = PreTrainedModel.init_weights

    def init_weights(self):
        if getattr(self, "_in_post_init", False):
            return original_init_weights(self)
        object.__setattr__(self, "_in_post_init", True)
        try:
            self.post_init()
        finally:
            object.__setattr__(self, "_in_post_init", False)

    def invert_attention_mask(self, mask):
        mask = mask[:, None, :, :] if mask.dim() == 3 else mask[:, None, None, :]
        return (1.0 - mask.to(self.dtype)) * torch.finfo(self.dtype).min

    med_mod.BertModel.init_weights = init_weights
    med_mod.BertModel.invert_attention_mask = invert_attention_mask
    med_mod.BertModel.get_head_mask = lambda self, head_mask, n, *a, **k: [None] * n if head_mask is None else head_mask


def test_imagereward_matches_the_reference_package(tmp_path):
    pytest.importorskip("timm")
    _shim_image_reward_for_transformers_5()  # before anything imports ImageReward
    import ImageReward.models.BLIP.blip_pretrain as blip_pretrain
    from ImageReward.ImageReward import ImageReward as ReferenceImageReward

    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = BERT_SPECIAL_TOKENS + chars + ["##" + c for c in chars]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    blip_pretrain.init_tokenizer = lambda: make_blip_tokenizer(tmp_path / "vocab.txt")
    # the reference fixes ViT-L and a 768-wide text encoder; fewer text layers keep the test affordable
    med = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
           "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072,
           "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert", "num_attention_heads": 12,
           "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": len(vocab) + 2,
           "encoder_width": 768, "add_cross_attention": True}
    (tmp_path / "med_config.json").write_text(json.dumps(med))
    torch.manual_seed(0)
    reference = ReferenceImageReward(med_config=str(tmp_path / "med_config.json"), device="cpu").eval()
    randomize_(reference.mlp, std=0.05)
    torch.save(reference.state_dict(), tmp_path / "ImageReward.pt")

    ours = load_reward("imagereward", path=tmp_path)
    images = random_images(2, size=(224, 224))
    for query in QUERIES:
        with torch.no_grad():
            _, expected = reference.inference_rank(query, images)
        got = ours(images, [query] * len(images)).scores
        torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-4, atol=1e-4)


def _provide_hpsv2_bpe_file():
    """hpsv2 1.2.0's wheel lacks the CLIP BPE file its tokenizer module opens at import; copy open_clip's."""
    import importlib.util
    import shutil
    from pathlib import Path

    import open_clip

    spec = importlib.util.find_spec("hpsv2")
    if spec is None:
        pytest.skip("hpsv2 is not installed")
    target = Path(spec.origin).parent / "src" / "open_clip" / "bpe_simple_vocab_16e6.txt.gz"
    if not target.exists():
        shutil.copy(Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz", target)


def test_hpsv2_matches_the_reference_package(tmp_path):
    _provide_hpsv2_bpe_file()
    factory = pytest.importorskip("hpsv2.src.open_clip.factory")
    from hpsv2.src.open_clip import create_model_and_transforms
    from open_clip import SimpleTokenizer  # the hpsv2 wheel lacks its BPE file; the vocabulary is the same

    architecture = {"embed_dim": 32,
                    "vision_cfg": {"image_size": 56, "layers": 2, "width": 64, "head_width": 32, "patch_size": 14},
                    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
    factory._MODEL_CONFIGS["tiny-hps"] = architecture
    torch.manual_seed(0)
    reference, _, preprocess_val = create_model_and_transforms(
        "tiny-hps", None, precision="fp32", device="cpu", jit=False, force_quick_gelu=False, force_custom_text=False,
        force_patch_dropout=False, force_image_size=None, pretrained_image=False, image_mean=None, image_std=None,
        light_augmentation=True, aug_cfg={}, output_dict=True, with_score_predictor=False,
        with_region_predictor=False)
    reference.eval()
    torch.save({"epoch": 1, "state_dict": reference.state_dict()}, tmp_path / "HPS_v2.1_compressed.pt")
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": architecture}))

    ours = load_reward("hpsv2", path=tmp_path)
    tokenizer = SimpleTokenizer(context_length=77)
    images = random_images(2, size=(56, 56))
    for query in QUERIES:
        with torch.no_grad():
            expected = [reference(preprocess_val(im).unsqueeze(0), tokenizer([query]))
                        for im in images]
        expected = torch.tensor([(o["image_features"] @ o["text_features"].T).item() for o in expected])
        torch.testing.assert_close(ours(images, [query] * 2).scores, expected, rtol=1e-4, atol=1e-4)
