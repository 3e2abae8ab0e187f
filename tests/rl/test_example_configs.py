"""The shipped training configs load, validate and give consistent batch sizes."""
from pathlib import Path

import pytest

from promptloop.configuration import load_config
from promptloop.rl.config import TrainConfig, derive_sizes

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("name,processes", [("sdxl_imagereward.yaml", 4), ("miniworld_grpo.yaml", 1)])
def test_example_config_loads_and_divides(name, processes):
    config = load_config(TrainConfig, CONFIGS / name)
    sizes = derive_sizes(config.grpo, processes)
    assert sizes.micro_batches_per_optimizer_step >= 1


def test_miniworld_config_matches_the_demo(tmp_path):
    from promptloop.miniworld.demo import train_config

    config = load_config(TrainConfig, CONFIGS / "miniworld_grpo.yaml")
    demo = train_config(tmp_path, tmp_path / "queries.txt")
    for key in ("system_prompt", "max_new_tokens", "max_prompt_words", "min_pixels", "max_pixels", "lora_r", "mode",
                "keep_query_words", "system_prompts"):
        assert getattr(config.policy, key) == getattr(demo.policy, key), key
    assert config.grpo == demo.grpo
    assert (CONFIGS.parent / config.policy.model_name_or_path).resolve() == \
        Path(demo.policy.model_name_or_path).resolve()
    for key in ("num_inference_steps", "guidance_scale", "preview_size", "dtype"):
        assert getattr(config.backbone, key) == getattr(demo.backbone, key), key
    assert (CONFIGS.parent / config.data.prompts).is_file()


def test_settings_that_cannot_work_together_fail_before_any_model_loads():
    from promptloop.configuration import ConfigError
    from promptloop.rl.trainer import held_out_queries

    base = ["--backbone.name_or_path", "x", "--backbone.num_inference_steps", "4", "--data.prompts", "p.txt"]
    with pytest.raises((ConfigError, ValueError), match=r"grpo.num_refinements=5 needs "
                       r"backbone.num_inference_steps > 5 \(got 4\)"):
        load_config(TrainConfig, None, [*base, "--grpo.num_refinements", "5"])
    config = load_config(TrainConfig, None, [*base, "--grpo.num_refinements", "3", "--logging.eval_every", "5"])
    with pytest.raises(ValueError, match="logging.eval_every=5 .* give data.eval_prompts"):
        held_out_queries(config, None)
    assert held_out_queries(config, ["a", "b"]) == ["a", "b"]
    vllm = load_config(TrainConfig, None, [*base, "--grpo.num_refinements", "3", "--grpo.rollout_backend", "vllm"])
    with pytest.raises(ValueError, match="rollout_backend='vllm' runs in one process; this run has 2"):
        derive_sizes(vllm.grpo, 2)
