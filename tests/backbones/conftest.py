"""Tiny SD1 / SD2 / SDXL / SDXL-turbo backbones, built offline, saved and reloaded with the real from_pretrained."""
from __future__ import annotations

import pytest
import torch

from promptloop.backbones import StableDiffusionBackbone, StableDiffusionXLBackbone
from promptloop.testing.tiny_pipelines import tiny_sd_pipeline, tiny_sdxl_pipeline


def _reloaded(tmp_path_factory, name, pipe, backbone_cls):
    folder = tmp_path_factory.mktemp(name)
    pipe.save_pretrained(folder)
    backbone = backbone_cls.from_pretrained(folder)
    backbone.pipe.set_progress_bar_config(disable=True)
    return backbone


@pytest.fixture(scope="session")
def sd_backbone(tmp_path_factory):
    return _reloaded(tmp_path_factory, "sd1", tiny_sd_pipeline(seed=0), StableDiffusionBackbone)


@pytest.fixture(scope="session")
def sd2_backbone(tmp_path_factory):
    return _reloaded(tmp_path_factory, "sd2", tiny_sd_pipeline(seed=1, prediction_type="v_prediction"),
                     StableDiffusionBackbone)


@pytest.fixture(scope="session")
def sdxl_backbone(tmp_path_factory):
    return _reloaded(tmp_path_factory, "sdxl", tiny_sdxl_pipeline(seed=2), StableDiffusionXLBackbone)


@pytest.fixture(scope="session")
def turbo_backbone(tmp_path_factory):
    return _reloaded(tmp_path_factory, "turbo", tiny_sdxl_pipeline(seed=3, turbo=True), StableDiffusionXLBackbone)


def stock_images(pipe, queries, seeds, **kwargs) -> torch.Tensor:
    """The stock pipeline call with one CPU generator per row (what rollout must reproduce)."""
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    return pipe(list(queries), generator=generators, output_type="pt", **kwargs).images


class StepRecorder:
    """Wraps ``backbone.step`` (instance attribute, removed by ``close``) and records latents and x0 per step."""

    def __init__(self, backbone):
        self.backbone, self.latents, self.x0 = backbone, [], []
        original = type(backbone).step

        def recording_step(state, i, embeds):
            result = original(backbone, state, i, embeds)
            self.latents.append(result.latents.clone())
            self.x0.append(result.x0.clone())
            return result

        backbone.step = recording_step

    def close(self):
        self.backbone.__dict__.pop("step", None)


@pytest.fixture
def record_steps():
    recorders = []

    def make(backbone):
        recorders.append(StepRecorder(backbone))
        return recorders[-1]

    yield make
    for r in recorders:
        r.close()
