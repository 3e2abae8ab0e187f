"""How well a shipped mini-world backbone follows the attributes its captions name, through the project's adapter."""
import random

from promptloop.backbones import SamplerSettings, rollout
from promptloop.miniworld.domain import caption, sample_scene
from promptloop.miniworld.recognise import attribute_accuracy


def caption_following(backbone, attributes: tuple[str, ...]) -> dict[str, float]:
    """Accuracy per named attribute on 8 captions naming ``attributes`` x 2 seeds (10 steps, guidance 4)."""
    rng = random.Random(7)
    captions = [caption(sample_scene(rng), attributes) for _ in range(8)]
    prompts = [c for c in captions for _ in range(2)]
    out = rollout(backbone, prompts, seeds=list(range(len(prompts))),
                  settings=SamplerSettings(num_inference_steps=10, guidance_scale=4.0))
    accuracy = attribute_accuracy(out.pil(), prompts)
    return {name: accuracy[name]["accuracy"] for name in attributes}
