"""Periodic evaluation and the trackers (TensorBoard, W&B offline) of the GRPO trainer, on tiny models."""
from __future__ import annotations

import json
import time

import pytest
import torch

from promptloop.rewards import Reward
from promptloop.rl.trainer import make_accelerator
from trainer_helpers import QUERIES, tiny_trainer

EVAL_QUERIES = ["A red cat", "Sunset"]


class BrightnessReward(Reward):
    """The image's mean pixel value: continuous, and it changes whenever the prompts change the image."""

    name = "brightness"

    def score_batch(self, images, queries, metadata):
        return torch.tensor([sum(image.convert("L").getdata()) / (255.0 * image.width * image.height)
                             for image in images])


def _with_trackers(trainer, report_to: str, **logging):
    trainer.config.logging.report_to = report_to
    for key, value in logging.items():
        setattr(trainer.config.logging, key, value)
    trainer.accelerator = make_accelerator(trainer.config)  # a tracker-enabled accelerator for this run
    return trainer


def test_periodic_evaluation_uses_fixed_seeds_and_is_logged(tmp_path, vlm_dir):
    trainer = _with_trackers(tiny_trainer(tmp_path / "run", vlm_dir, reward=BrightnessReward(), max_steps=4),
                             "tensorboard", eval_every=2, log_completions=True, project="sdxl-sweep")
    trainer.eval_queries = list(EVAL_QUERIES)
    first = trainer.evaluate()
    assert trainer.evaluate() == first  # fixed noise and policy seeds: the same weights give the same number
    history = trainer.train()
    assert ["eval/reward_mean" in h for h in history] == [False, True, False, True]
    assert all(0.0 <= h["eval/reward_mean"] <= 1.0 for h in history if "eval/reward_mean" in h)
    assert trainer.evaluate() == {"eval/reward_mean": history[-1]["eval/reward_mean"]}  # same weights as step 4

    rows = [json.loads(line) for line in (tmp_path / "run" / "completions.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [s for s in (1, 2, 3, 4) for _ in range(16)]  # 2 queries x G = 8 per step
    assert all(r["query"] in QUERIES and r["prompts"] and 0.0 <= r["reward"] <= 1.0 for r in rows)
    means = [sum(r["reward"] for r in rows if r["step"] == s) / 16 for s in (1, 2, 3, 4)]
    assert means == pytest.approx([h["reward/mean"] for h in history])

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    event_files = list((tmp_path / "run").rglob("events.out.tfevents.*"))
    assert event_files and all((tmp_path / "run" / "sdxl-sweep") in f.parents for f in event_files)
    events = EventAccumulator(str(event_files[0].parent))
    events.Reload()
    assert [e.step for e in events.Scalars("eval/reward_mean")] == [2, 4]
    assert [e.step for e in events.Scalars("reward/mean")] == [1, 2, 3, 4]


def test_weights_and_biases_offline_run_gets_metrics_config_and_images(tmp_path, vlm_dir, monkeypatch):
    pytest.importorskip("wandb")  # an optional extra (promptloop[wandb]); the dev install has it
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    trainer = _with_trackers(tiny_trainer(tmp_path / "run", vlm_dir, max_steps=2), "wandb", image_every=1,
                             project="promptloop-tests", run_name="lr-3e-2-seed0")
    history = trainer.train()
    assert len(history) == 2
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "no offline W&B run was written"
    # wandb >= 0.19 keeps history and config in the binary run file (read by `wandb sync`); look for the keys. Its
    # writer is a separate process (wandb-core) that on a loaded machine was seen to flush after finish() returned.
    run_file, deadline = next(runs[0].glob("run-*.wandb")), time.monotonic() + 60
    while b"policy/entropy" not in (records := run_file.read_bytes()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert b"reward/mean" in records and b"policy/entropy" in records and b"grpo/group_size" in records
    assert b"promptloop-tests" in records and b"lr-3e-2-seed0" in records
    images = sorted(p.name.split("_")[1] for p in (runs[0] / "files" / "media" / "images").glob("trajectories_*.png"))
    assert images == ["1", "2"], "one trajectory grid per step was expected"


@pytest.mark.parametrize("project", ["", "a/b", "..", "x\\y"])
def test_tracker_project_must_be_a_plain_name(project):
    from promptloop.configuration import ConfigError, build
    from promptloop.rl.config import TrainConfig

    data = {"backbone": {"name_or_path": "x"}, "data": {"prompts": "p.txt"}, "logging": {"project": project}}
    with pytest.raises(ConfigError, match="project=.* must be a plain name"):
        build(TrainConfig, data)


def _recording_tracker_class(logged: list, config: dict):
    """A tracker accelerate does not ship, as users register one by name; it records what it is given."""
    from accelerate.tracking import GeneralTracker

    class Recorder(GeneralTracker):
        name = "promptloop_test_recorder"
        requires_logging_directory = False

        def __init__(self, run_name, **kwargs):
            super().__init__()
            self.run_name = run_name

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values):
            config.update(values)

        def log(self, values, step=None, **kwargs):
            logged.append((step, dict(values)))

    return Recorder


def test_several_trackers_and_a_registered_one_get_the_metrics(tmp_path, vlm_dir, request):
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, register_tracker_class

    logged, config = [], {}
    recorder = _recording_tracker_class(logged, config)
    register_tracker_class(recorder)
    request.addfinalizer(lambda: LOGGER_TYPE_TO_CLASS.pop(recorder.name, None))
    trainer = _with_trackers(tiny_trainer(tmp_path / "run", vlm_dir, max_steps=2),
                             ["tensorboard", recorder.name], image_every=1)
    history = trainer.train()
    assert [step for step, values in logged if "reward/mean" in values] == [1, 2]
    assert [values["reward/mean"] for _, values in logged] == [h["reward/mean"] for h in history]
    assert config["grpo/group_size"] == trainer.config.grpo.group_size
    assert config["logging/report_to"] == f"tensorboard,{recorder.name}"  # lists as comma lists
    assert list((tmp_path / "run").rglob("events.out.tfevents.*")), "TensorBoard was asked for too"
    assert len(list((tmp_path / "run" / "images").iterdir())) == 2  # grids on disk whatever the trackers


@pytest.mark.parametrize("report_to, match", [
    ("tensorbored", r"unknown tracker\(s\) \['tensorbored'\]; choose among .*'tensorboard'"),
    (["tensorboard", "none"], "'none' alone"),
    ("dvclive", r"asks for \['dvclive'\], not installed here: `pip install dvclive`"),
])
def test_trackers_are_checked_before_anything_loads(report_to, match):
    from promptloop.configuration import ConfigError, build
    from promptloop.rl.config import TrainConfig

    data = {"backbone": {"name_or_path": "x"}, "data": {"prompts": "p.txt"}, "logging": {"report_to": report_to}}
    with pytest.raises(ConfigError, match=match):
        build(TrainConfig, data)


def test_trackers_are_a_comma_list_on_the_command_line(tmp_path):
    from promptloop.configuration import load_config
    from promptloop.rl.config import TrainConfig

    config = load_config(TrainConfig, None, ["--backbone.name_or_path", "x", "--data.prompts", "p.txt",
                                             "--logging.report_to", "tensorboard,wandb"])
    assert config.logging.report_to == ["tensorboard", "wandb"]
    assert [str(t) for t in make_accelerator(config).log_with] == ["tensorboard", "wandb"]
