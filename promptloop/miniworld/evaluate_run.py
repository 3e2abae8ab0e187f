"""Evaluate the checkpoints of a mini-world GRPO run: the training (proxy) reward next to the gold reward and query
fidelity, step by step: the reward-hacking measurement of PromptLoop.

    python -m promptloop.miniworld.evaluate_run RUN_DIR [--out DIR] [--every 50] [--prompts 32] [--seeds 4]
        [--first-seed 0] [--kind closed|closed-noimage|oneshot] [--backbone DIR] [--refinements N] [--initial-rewrite]
        [--temperature T]

``RUN_DIR`` is a ``promptloop train`` output folder (``--logging.output_dir``) of a mini-world config. Every
``--every``-th checkpoint (and the last) is evaluated in closed loop with the demo's evaluation
(:func:`promptloop.miniworld.demo.evaluation_config`: base backbone A, the untrained policy, held-out queries x
fixed seeds); ``--backbone`` evaluates on another mini-world pipeline (backbone B, the weight-tuned A),
``--refinements`` at another N_R, ``--initial-rewrite`` with the policy writing the first prompt too (runs trained
with ``grpo.initial_rewrite``), ``--temperature 0`` with greedy rewrites. Writes the evaluation folder
(``results.md``, ``results.json``, ``report.html``) and
``training_curve.png`` / ``training_curve.json``: each metric's mean and 95% CI against the training step (the
untrained policy is step 0).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path

from promptloop.rl.checkpoint import list_checkpoints

from .backbone import SHIPPED_BACKBONE_A
from .demo import FULL, evaluation_config

METRICS = ("reward/preference", "reward/gold", "reward/fidelity")


def checkpoint_steps(run_dir: str | Path, every: int) -> dict[int, Path]:
    """{step: saved policy folder} of every ``every``-th complete checkpoint of ``run_dir``, and the last one."""
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}.")
    found = {int(re.sub(r"\D", "", p.name)): p / "policy" for p in list_checkpoints(Path(run_dir))}
    if not found:
        raise ValueError(f"{run_dir} holds no complete checkpoint (checkpoints/step-N); train with "
                         "--logging.checkpoint_every N first.")
    last = max(found)
    return {step: path for step, path in sorted(found.items()) if step % every == 0 or step == last}


def training_curve(results, steps: dict[int, Path], backbone: str = "backbone_a") -> dict[str, list[dict]]:
    """{metric: [{step, mean, ci_low, ci_high}]} with the untrained policy as step 0 and the base as step None."""
    curve: dict[str, list[dict]] = {}
    labels = {"base": None, "untrained": 0} | {f"step-{s}": s for s in steps}
    for metric in METRICS:
        rows = []
        for label, step in labels.items():
            stat = results.statistic(backbone, label, metric)
            rows.append({"method": label, "step": step, "mean": stat.mean, "ci_low": stat.ci_low,
                         "ci_high": stat.ci_high})
        curve[metric] = rows
    return curve


def plot_curve(curve: dict[str, list[dict]], path: Path, x_key: str = "step", label: str = "PromptLoop",
               xlabel: str = "GRPO step (0 = warm start)", baseline_label: str = "base backbone") -> None:
    """One panel per metric: mean and 95% band of the rows with an ``x_key`` value against it, and a dashed line
    at the baseline row (``x_key`` None, else the first row)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curve), figsize=(4 * len(curve), 3), dpi=120)
    for ax, (metric, rows) in zip(axes, curve.items()):
        points = [r for r in rows if r[x_key] is not None]
        x = [r[x_key] for r in points]
        ax.plot(x, [r["mean"] for r in points], marker="o", ms=3, label=label)
        ax.fill_between(x, [r["ci_low"] for r in points], [r["ci_high"] for r in points], alpha=0.2)
        base = next((r for r in rows if r[x_key] is None), rows[0])
        ax.axhline(base["mean"], color="gray", ls="--", lw=1, label=baseline_label)
        ax.set_title(metric.split("/")[-1])
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def evaluate_run(run_dir: str | Path, out_dir: str | Path, every: int = 50, prompts: int = 32, seeds: int = 4,
                 first_seed: int = 0,
                 kind: str = "closed", backbone: str | Path = SHIPPED_BACKBONE_A,
                 refinements: int = FULL.num_refinements, temperature: float = 1.0, initial_rewrite: bool = False,
                 log=print) -> dict[str, list[dict]]:
    from promptloop.eval.runner import run_evaluation

    steps = checkpoint_steps(run_dir, every)
    out = Path(out_dir)
    size = dataclasses.replace(FULL, eval_prompts=prompts, eval_seeds=seeds, num_refinements=refinements,
                               initial_rewrite=initial_rewrite, eval_first_seed=first_seed)
    name = Path(backbone).name
    config = evaluation_config(out, {f"step-{s}": p for s, p in steps.items()}, size, kind, {name: backbone},
                               temperature)
    log(f"evaluating steps {sorted(steps)} of {run_dir} on {name}, {prompts} held-out queries x {seeds} seeds")
    results = run_evaluation(config, log=log)
    curve = training_curve(results, steps, name)
    (out / "training_curve.json").write_text(json.dumps(curve, indent=2) + "\n")
    plot_curve(curve, out / "training_curve.png")
    return curve


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a promptloop train output folder (mini-world config)")
    parser.add_argument("--out", default=None, help="evaluation folder (default RUN_DIR/eval_curve)")
    parser.add_argument("--every", type=int, default=50, help="evaluate every N-th step's checkpoint (and the last)")
    parser.add_argument("--prompts", type=int, default=32, help="held-out queries (miniworld:heldout)")
    parser.add_argument("--seeds", type=int, default=4, help="fixed noise seeds per query")
    parser.add_argument("--first-seed", type=int, default=0, help="the first of the --seeds consecutive seeds")
    parser.add_argument("--kind", choices=("closed", "closed-noimage", "oneshot"), default="closed",
                        help="how the run's policy is used: as it was trained (policy.mode, grpo.feedback)")
    parser.add_argument("--backbone", default=str(SHIPPED_BACKBONE_A),
                        help="mini-world pipeline folder to evaluate on (default: the shipped backbone A)")
    parser.add_argument("--refinements", type=int, default=FULL.num_refinements,
                        help="N_R at evaluation (closed loop; ignored for --kind oneshot)")
    parser.add_argument("--initial-rewrite", action="store_true",
                        help="closed loop: the policy also writes the prompt for step 0 (runs trained with "
                             "grpo.initial_rewrite)")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="policy sampling temperature; 0 decodes greedily")
    args = parser.parse_args(argv)
    return evaluate_run(args.run_dir, args.out or Path(args.run_dir) / "eval_curve", args.every, args.prompts,
                        args.seeds, args.first_seed, args.kind, args.backbone, args.refinements, args.temperature,
                        args.initial_rewrite)


if __name__ == "__main__":
    main()
