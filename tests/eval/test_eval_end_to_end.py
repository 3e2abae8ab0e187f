"""`promptloop eval` end to end on tiny random models: files, JSON schema, statistics, HTML in headless Chromium."""
from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess

import numpy as np
import pytest
import yaml
from PIL import Image

from eval_helpers import TEST_REWARD
from promptloop.cli import main
from promptloop.eval import EvalResults, render_report, validate_results_json

QUERIES = ["a red circle", "two green squares on grass", "a blue triangle at night"]
SEEDS = [0, 1]
T_975_DF2 = 4.302652729911275  # Student t quantile, 3 prompts (x 2 seeds each), from a printed t-table


def _write_config(tmp_path, backbone_dir, policy_dir, out_dir) -> str:
    (tmp_path / "prompts.txt").write_text("\n".join(QUERIES) + "\n")
    config = {
        "prompts": {"source": str(tmp_path / "prompts.txt")},
        "backbones": {"tiny-sd": {"name_or_path": str(backbone_dir), "num_inference_steps": 4, "preview_size": 32,
                                  "batch_size": 3}},
        "methods": {
            "base": {"kind": "base"},
            "untrained": {"kind": "untrained", "policy": str(policy_dir)},
            "oneshot": {"kind": "oneshot", "policy": str(policy_dir)},
            "closed": {"kind": "closed", "policy": str(policy_dir), "num_refinements": [1, 2]},
            "noimage": {"kind": "closed-noimage", "policy": str(policy_dir), "num_refinements": [2]},
            "apriori": {"kind": "apriori", "policy": str(policy_dir), "num_refinements": [2]},
        },
        "rewards": {"bright": {"spec": TEST_REWARD}},
        "seeds": SEEDS,
        "device": "cpu",
        "warmup": False,
        "output": {"output_dir": "overridden-below", "grid_prompts": 3, "strips": 2},
    }
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(path)


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory, tiny_backbone_dir, tiny_policy_dir):
    tmp_path = tmp_path_factory.mktemp("eval_run")
    out_dir = tmp_path / "out"
    config = _write_config(tmp_path, tiny_backbone_dir, tiny_policy_dir, out_dir)
    assert main(["eval", config, "--output.output_dir", str(out_dir), "--policy_sampling.max_new_tokens", "6"]) == 0
    return out_dir, json.loads((out_dir / "results.json").read_text())


LABELS = ["base", "untrained", "oneshot", "closed@1", "closed@2", "noimage", "apriori"]
METRICS = ["reward/bright", "prompt_words", "drift", "seconds_per_image"]


def test_results_json_follows_the_schema(eval_run):
    out_dir, data = eval_run
    validate_results_json(data)
    assert [m["label"] for m in data["methods"]] == LABELS
    assert data["metrics"] == METRICS
    assert data["config"]["policy_sampling"]["max_new_tokens"] == 6  # the command-line override took effect
    assert len(data["samples"]) == len(LABELS) * len(QUERIES) * len(SEEDS)
    for sample in data["samples"]:
        assert (out_dir / sample["image"]).is_file()
        assert sample["query"] == QUERIES[sample["prompt_index"]]
        method = next(m for m in data["methods"] if m["label"] == sample["method"])
        assert len(sample["decision_steps"]) == method["num_refinements"]
        assert len(sample["prompts"]) == method["num_refinements"] + 1
    base = [s for s in data["samples"] if s["method"] == "base"]
    assert all(s["final_prompt"] == s["query"] and s["metrics"]["drift"] == 0 for s in base)
    strips = [s for s in data["samples"] if s["strip"]]
    assert {s["method"] for s in strips} == set(LABELS) - {"base"}
    assert all((out_dir / s["strip"]).is_file() and s["seed"] == SEEDS[0] for s in strips)
    with pytest.raises(ValueError, match="summary"):
        broken = json.loads(json.dumps(data))
        broken["summary"][0].pop("n")
        validate_results_json(broken)


def test_same_seed_gives_same_noise_across_methods(eval_run):
    """Prompt rewriting changes the image, while an unchanged prompt gives the base image bit for bit."""
    out_dir, data = eval_run
    by_key = {(s["method"], s["prompt_index"], s["seed"]): s for s in data["samples"]}
    base_images = {k[1:]: np.asarray(Image.open(out_dir / s["image"])) for k, s in by_key.items() if k[0] == "base"}
    for (method, p, seed), s in by_key.items():
        same_prompts = all(prompt == s["query"] for prompt in s["prompts"])
        image = np.asarray(Image.open(out_dir / s["image"]))
        if same_prompts:
            assert np.array_equal(image, base_images[(p, seed)]), (method, p, seed)
    assert not np.array_equal(base_images[(0, 0)], base_images[(0, 1)]), "different seeds, different noise"


def test_summary_and_paired_ci_match_a_hand_computation(eval_run):
    _, data = eval_run
    metric = "reward/bright"
    values = {(s["prompt_index"], s["seed"]): s["metrics"][metric] for s in data["samples"]
              if s["method"] == "closed@2"}
    base = {(s["prompt_index"], s["seed"]): s["metrics"][metric] for s in data["samples"] if s["method"] == "base"}
    for rows, per_image in (("summary", values), ("paired", {k: values[k] - base[k] for k in values})):
        prompts = sorted({p for p, _ in per_image})  # each prompt's mean over its seeds: the independent units
        numbers = [sum(v for (p, _), v in per_image.items() if p == prompt) / len(data["seeds"])
                   for prompt in prompts]
        n = len(numbers)
        mean = sum(numbers) / n
        std = math.sqrt(sum((x - mean) ** 2 for x in numbers) / (n - 1))
        half = T_975_DF2 * std / math.sqrt(n)
        row = next(r for r in data[rows] if r["method"] == "closed@2" and r["metric"] == metric)
        assert row["n"] == n == 3 and len(per_image) == 6
        assert row["mean"] == pytest.approx(mean, abs=1e-12)
        assert row["std"] == pytest.approx(std, rel=1e-9)
        assert row["ci_low"] == pytest.approx(mean - half, rel=1e-9, abs=1e-12)
        assert row["ci_high"] == pytest.approx(mean + half, rel=1e-9, abs=1e-12)
    assert not any(r["method"] == "base" for r in data["paired"])
    assert all(r["baseline"] == "base" for r in data["paired"])


def test_csv_and_markdown_hold_the_same_numbers(eval_run):
    out_dir, data = eval_run
    with (out_dir / "samples.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == len(data["samples"])
    assert float(rows[0]["reward/bright"]) == pytest.approx(data["samples"][0]["metrics"]["reward/bright"])
    with (out_dir / "summary.csv").open() as file:
        summary = list(csv.DictReader(file))
    assert len(summary) == len(data["summary"]) + len(data["paired"])
    markdown = (out_dir / "results.md").read_text()
    assert "| method | " + " | ".join(METRICS) + " |" in markdown
    for label in LABELS:
        assert f"| {label} |" in markdown
    row = next(r for r in data["summary"] if r["method"] == "closed@1" and r["metric"] == "reward/bright")
    assert f"{row['mean']:.4g} ± {(row['ci_high'] - row['ci_low']) / 2:.4g}" in markdown


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_html_report_renders_in_headless_chromium(eval_run, tmp_path):
    out_dir, data = eval_run
    report = out_dir / "report.html"
    html = report.read_text()
    assert "<table" in html and "http://" not in html and "https://" not in html
    for sample in data["samples"]:
        if sample["strip"]:
            assert sample["strip"] in html
    browser = _chromium()
    if browser is None:
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium); the screenshot check needs it")
    screenshot = tmp_path / "report.png"
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={screenshot}", "--window-size=1200,900",
               report.resolve().as_uri()]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert screenshot.is_file(), f"chromium wrote no screenshot (rc {result.returncode}): {result.stderr[-2000:]}"
    image = Image.open(screenshot).convert("RGB")
    assert image.size == (1200, 900)
    pixels = np.asarray(image, dtype=np.float64)
    assert pixels.std() > 10, "the screenshot is blank"
    # The first image grid is below the fold, but the table and title are dark text on white: many dark pixels.
    assert (pixels.mean(axis=2) < 100).mean() > 0.002


def test_results_read_back_and_the_report_can_embed_its_images(eval_run):
    out_dir, data = eval_run
    results = EvalResults.from_json_dict(data)
    again = results.to_json_dict()
    assert {k: v for k, v in again.items() if k != "created"} == {k: v for k, v in data.items() if k != "created"}
    html = render_report(results, out_dir, embed_images=True, grid_prompts=1)
    assert 'src="data:image/png;base64,' in html and 'src="images/' not in html and 'src="strips/' not in html


def test_paired_differences_against_another_method_match_a_hand_computation(eval_run):
    from promptloop.eval.results import paired_markdown

    _, data = eval_run
    results = EvalResults.from_json_dict(data)
    markdown = paired_markdown(results, "untrained")
    assert "Paired difference to `untrained`" in markdown and "| untrained |" not in markdown
    values = {(s["prompt_index"], s["seed"]): s["metrics"]["reward/bright"] for s in data["samples"]
              if s["method"] == "closed@2"}
    reference = {(s["prompt_index"], s["seed"]): s["metrics"]["reward/bright"] for s in data["samples"]
                 if s["method"] == "untrained"}
    diffs = [values[k] - reference[k] for k in values]
    mean = sum(diffs) / len(diffs)
    row = next(line for line in markdown.splitlines() if line.startswith("| closed@2 |"))
    assert row.split("|")[2].strip().startswith(f"{mean:+.4g}")
    assert results.baseline == "base" and all(r.baseline == "base" for r in results.paired)  # unchanged
    with pytest.raises(ValueError, match="not a method"):
        paired_markdown(results, "nope")
