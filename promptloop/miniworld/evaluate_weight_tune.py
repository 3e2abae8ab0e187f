"""Evaluate the checkpoints of a reward fine-tuning run (``weight_tune``) by reward queries spent, and ship one.

    python -m promptloop.miniworld.evaluate_weight_tune RUN [--out DIR] [--prompts 32] [--seeds 4]
        [--ship-queries N [--dest promptloop/miniworld/assets/backbone_a_tuned]]

Every checkpoint's pipeline and the run's starting backbone (0 reward queries) are evaluated as backbones of one
``promptloop.eval`` run: plain sampling (method ``base``, no policy) with the RL runs' sampler (10 DDIM steps,
guidance 2), on ``miniworld:heldout`` queries x fixed seeds, scored by the training reward (``miniworld-preference``,
the proxy), the gold rule and query fidelity. Writes the evaluation folder (``results.json``, ``results.md``,
``report.html``) and ``weight_tune_curve.json`` / ``.png``: each metric's mean and 95 % interval, and its paired
difference to the starting backbone (same query and seed), against the reward queries spent.

``--ship-queries N`` exports the checkpoint at N reward queries with ``export_backbone.export_pipeline`` (UNet and
VAE in float16) to ``--dest`` and writes ``<dest>.meta.json`` beside it (command, step, reward queries, its curve
row next to the starting backbone's).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from pathlib import Path
from typing import Optional

from promptloop.rl.checkpoint import read_meta

from .demo import FULL, evaluation_config
from .evaluate_run import METRICS, plot_curve
from .weight_tune import checkpoint_pipelines


START_LABEL = "rq-0"
SHIPPED_TUNED = Path(__file__).resolve().parent / "assets" / "backbone_a_tuned"
"""The shipped weight-tuned backbone A (a pipeline folder; ``backbone_a_tuned.meta.json`` beside it)."""


def label(reward_queries: int) -> str:
    """Backbone label of the checkpoint at ``reward_queries`` in the evaluation's tables."""
    return f"rq-{reward_queries}"


def weight_tune_curve(results, reward_queries: dict[str, int]) -> dict[str, list[dict]]:
    """{metric: [{backbone, reward_queries, mean, ci_low, ci_high, diff, diff_ci_low, diff_ci_high}]}: ``diff`` is
    the paired difference to the starting backbone (``START_LABEL``) on the same query and seed."""
    from promptloop.eval.stats import paired_ci

    curve: dict[str, list[dict]] = {}
    for metric in METRICS:
        values = {name: {(s.prompt_index, s.seed): s.metrics[metric] for s in results.samples if s.backbone == name}
                  for name in reward_queries}
        rows = []
        for name, spent in reward_queries.items():
            stat = results.statistic(name, "base", metric)
            diff = paired_ci(values[name], values[START_LABEL])
            rows.append({"backbone": name, "reward_queries": spent, "mean": stat.mean, "ci_low": stat.ci_low,
                         "ci_high": stat.ci_high, "diff": diff.mean, "diff_ci_low": diff.low,
                         "diff_ci_high": diff.high})
        curve[metric] = rows
    return curve


def _start_backbone(run_dir: Path) -> str:
    first = sorted((run_dir / "checkpoints").glob("step-*"))[0]
    return read_meta(first)["config"]["backbone"]


def evaluate_weight_tune(run_dir: str | Path, out_dir: str | Path, prompts: int = 32, seeds: int = 4,
                         log=print) -> dict[str, list[dict]]:
    """Evaluate the run's starting backbone and every checkpoint; write the curve files into ``out_dir``."""
    from promptloop.eval.runner import run_evaluation

    run_dir, out = Path(run_dir), Path(out_dir)
    pipelines = checkpoint_pipelines(run_dir)
    backbones = {START_LABEL: _start_backbone(run_dir)} | {label(q): p for q, p in pipelines.items()}
    spent = {START_LABEL: 0} | {label(q): q for q in pipelines}
    log(f"evaluating {len(backbones)} backbones (reward queries {list(spent.values())}) of {run_dir} on "
        f"{prompts} held-out queries x {seeds} seeds")
    size = dataclasses.replace(FULL, eval_prompts=prompts, eval_seeds=seeds)
    results = run_evaluation(evaluation_config(out, {}, size, backbones=backbones), log=log)
    curve = weight_tune_curve(results, spent)
    (out / "weight_tune_curve.json").write_text(json.dumps(curve, indent=2) + "\n")
    plot_curve(curve, out / "weight_tune_curve.png", x_key="reward_queries", label="weight-tuned (DRaFT-1)",
               xlabel="reward queries (images scored)", baseline_label="backbone A")
    return curve


def curve_table(curve: dict[str, list[dict]]) -> str:
    """Markdown: one row per evaluated backbone, mean and paired difference to the start for each metric."""
    head = "| reward queries | " + " | ".join(f"{m.split('/')[-1]} | diff." for m in METRICS) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(METRICS))]
    for i, row in enumerate(curve[METRICS[0]]):
        cells = [str(row["reward_queries"])]
        for metric in METRICS:
            r = curve[metric][i]
            half = (r["ci_high"] - r["ci_low"]) / 2
            dhalf = (r["diff_ci_high"] - r["diff_ci_low"]) / 2 if r["reward_queries"] else 0.0
            cells += [f"{r['mean']:.3f} ± {half:.3f}", f"{r['diff']:+.3f} ± {dhalf:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ship(run_dir: str | Path, reward_queries: int, curve: dict[str, list[dict]],
         dest: str | Path = SHIPPED_TUNED, rule: str = "", command: str = "") -> Path:
    """Export the checkpoint at ``reward_queries`` to ``dest`` (float16 UNet/VAE) and write ``dest.meta.json``."""
    from .export_backbone import export_pipeline

    pipelines = checkpoint_pipelines(run_dir)
    if reward_queries not in pipelines:
        raise ValueError(f"{run_dir} has no checkpoint at {reward_queries} reward queries; choose one of "
                         f"{sorted(pipelines)}.")
    checkpoint = pipelines[reward_queries].parent
    meta = read_meta(checkpoint)
    dest = export_pipeline(pipelines[reward_queries], dest)
    rows = {metric: {r["backbone"]: r for r in rows} for metric, rows in curve.items()}
    metadata = {
        "training_command": meta.get("command"),
        "training_config": meta["config"],
        "step": meta["step"],
        "reward_queries": reward_queries,
        "selection_rule": rule,
        "source_checkpoint": str(checkpoint),
        "evaluation": {metric: {"backbone_a": rows[metric][START_LABEL], "tuned": rows[metric][label(reward_queries)]}
                       for metric in METRICS},
        "curve": curve,
        "export_command": command,
    }
    meta_path = dest.with_name(dest.name + ".meta.json")
    meta_path.write_text(json.dumps(metadata, indent=2) + "\n")
    return dest


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a weight_tune run folder (holds checkpoints/step-N/pipeline)")
    parser.add_argument("--out", default=None, help="evaluation folder (default RUN_DIR/eval_curve)")
    parser.add_argument("--prompts", type=int, default=32, help="held-out queries (miniworld:heldout)")
    parser.add_argument("--seeds", type=int, default=4, help="fixed noise seeds per query")
    parser.add_argument("--ship-queries", type=int, default=None,
                        help="export the checkpoint at this many reward queries to --dest")
    parser.add_argument("--dest", default=str(SHIPPED_TUNED), help="where --ship-queries writes the pipeline")
    parser.add_argument("--rule", default="the checkpoint at the PromptLoop GRPO runs' budget (75 steps x 32 = "
                        "2400 reward queries), fixed before evaluating", help="selection rule recorded in the meta")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else Path(args.run_dir) / "eval_curve"
    if args.ship_queries is not None and args.ship_queries not in checkpoint_pipelines(args.run_dir):
        raise ValueError(f"--ship-queries {args.ship_queries}: no such checkpoint in {args.run_dir}; choose one of "
                         f"{sorted(checkpoint_pipelines(args.run_dir))}.")
    command = f"python -m promptloop.miniworld.evaluate_weight_tune {shlex.join(argv)}"
    curve = evaluate_weight_tune(args.run_dir, out, args.prompts, args.seeds)
    print(curve_table(curve))
    (out / "weight_tune_curve.md").write_text(curve_table(curve) + "\n")
    if args.ship_queries is not None:
        print(f"shipped {ship(args.run_dir, args.ship_queries, curve, args.dest, args.rule, command)}")
    return curve


if __name__ == "__main__":
    main()
