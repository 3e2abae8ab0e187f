"""Trajectory strips say which prompt was in force where (checked on the captions drawn)."""
from PIL import Image

import promptloop.visualize as visualize
from promptloop.backbones.types import Trajectory


def test_strip_captions_each_decision_and_the_final_prompt(monkeypatch):
    drawn = []
    caption_block = visualize._caption_block

    def recording(lines, width, font_size):
        drawn.append([text for text, _ in lines])
        return caption_block(lines, width, font_size)

    monkeypatch.setattr(visualize, "_caption_block", recording)
    # an initial rewrite at step 0 (no preview) and one refinement at step 5: the query itself is never in force
    trajectory = Trajectory(query="top", seed=0, num_steps=10, decision_steps=[0, 5], timesteps=[999.0, 499.0],
                            prompts=["top", "top center big", "top center big black"], raw_prompts=["", "", ""],
                            truncated=[False, False, True], previews=[None, Image.new("RGB", (8, 8))],
                            step_prompt_index=[1] * 5 + [2] * 5)
    strip = visualize.trajectory_strip(trajectory, Image.new("RGB", (8, 8)), tile=64)
    assert strip.width == 3 * 64
    assert drawn[:3] == [["step 0/10", "top center big"], ["step 5/10", "top center big black [cut]"],
                         ["final", "final prompt: top center big black"]]
    assert drawn[3] == ["query: top   (seed 0)"]
