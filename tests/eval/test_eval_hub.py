"""Evaluating hub models pinned to revisions: a policy at a tag and a pipeline at a tag with fp16-variant weight
files, read from a hub cache (no network), give the results of the same models read from their folders."""
from __future__ import annotations

import json

from diffusers import StableDiffusionPipeline
from huggingface_hub import constants

from eval_helpers import one_per_batch_config, samples_without_timings
from promptloop.cli import main


def test_hub_policy_and_pipeline_at_revisions_evaluate_as_their_folders(tmp_path, tiny_backbone_dir,
                                                                          tiny_policy_dir, hub_cache, monkeypatch):
    StableDiffusionPipeline.from_pretrained(tiny_backbone_dir).save_pretrained(tmp_path / "sd-fp16", variant="fp16")
    hub_cache.add("me/tiny-sd", tmp_path / "sd-fp16", "5" * 40, ("v2",))
    hub_cache.add("me/loop", tiny_policy_dir, "6" * 40, ("v1",))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache.path))  # as HF_HUB_CACHE=... would
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    runs = {}
    for name, policy, backbone in (("folders", {"policy": str(tiny_policy_dir)}, {}),
                                   ("hub", {"policy": "me/loop", "policy_revision": "v1"},
                                    {"name_or_path": "me/tiny-sd", "revision": "v2", "variant": "fp16"})):
        (tmp_path / name).mkdir()
        config = one_per_batch_config(tmp_path / name, tiny_backbone_dir, {
            "base": {"kind": "base"}, "closed": {"kind": "closed", "num_refinements": [1], **policy}},
            str(tmp_path / name / "out"))
        overrides = [arg for key, value in backbone.items() for arg in (f"--backbones.tiny-sd.{key}", value)]
        assert main(["eval", str(config), *overrides]) == 0
        runs[name] = json.loads((tmp_path / name / "out" / "results.json").read_text())
    assert samples_without_timings(runs["hub"]) == samples_without_timings(runs["folders"])
    assert {s["method"] for s in runs["hub"]["samples"]} == {"base", "closed"}
