"""``promptloop miniworld build``: rebuild every shipped mini-world artefact from seeds.

The artefacts in ``promptloop/miniworld/assets/`` are the outputs of these steps, run in order (each one is a
project module's own command line, printed before it runs, so any step can also be run by hand):

1. ``backbone-train``: backbone A's VAE (16 x 16 latents), UNet and text encoder (``train_backbone``, fixed step
   counts);
2. ``backbone-continue``: its UNet and text encoder trained further from the saved pipeline, with a fresh optimizer
   (``train_backbone --init-from``; circles were still drawn as squares too often after step 1);
3. ``backbone-export``: the float16 copy that ships, evaluated as loaded (``export_backbone``);
4. ``preference``: the learned preference reward (``train_preference``), with its agreement on images of the new
   backbone;
5. ``policy``: the warm-started policy (``policy_warmstart``);
6. ``policy-edit``: the warm start whose later rewrites edit the prompt in force (``policy_warmstart --edit-later``),
   which the demo trains from;
7. ``policy-grpo``: the demo's GRPO run for 800 steps from it, exported next to it (``train_policy``; it trains on
   the backbone A and preference reward of steps 3 and 4);
8. ``backbone-b``: backbone B, the flow-matching SD3-architecture backbone on A's frozen VAE
   (``train_flow_backbone``, fixed step count);
9. ``backbone-b-export``: its float16 copy, evaluated as loaded (``export_backbone``);
10. ``weight-tune``: backbone A's UNet fine-tuned directly on the preference reward (``weight_tune``, DRaFT-1);
11. ``weight-tune-export``: its checkpoint at 2400 reward queries, evaluated and exported
    (``evaluate_weight_tune``).

``--out DIR`` receives ``backbone_a/``, ``backbone_a.eval.json``, ``preference/``, ``policy/``, ``policy_edit/``,
``policy_grpo/``, ``backbone_b/`` and ``backbone_a_tuned/`` (the layout of the assets folder) and the training runs
in ``DIR/runs/``. Training is not bit-reproducible across thread counts and devices, so a rebuild gives equivalent
artefacts, not the same bytes: compare the ``*.eval.json`` and ``metrics.json`` files with the shipped ones.
``--preset tiny`` runs every step with tiny sizes (a smoke test of the whole recipe in about a minute; what it writes
is not useful for anything else).
"""
from __future__ import annotations

import argparse
import importlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

STEP_NAMES = ("backbone-train", "backbone-continue", "backbone-export", "preference", "policy", "policy-edit",
              "policy-grpo", "backbone-b", "backbone-b-export", "weight-tune", "weight-tune-export")


@dataclass(frozen=True)
class BuildStep:
    """One step of the recipe: a project module's ``main(argv)`` and the arguments that reproduce an artefact."""

    name: str
    module: str
    argv: Callable[[Path, str], list[str]]
    """``argv(out_dir, device)`` for the full build."""
    tiny_argv: Callable[[Path, str], list[str]]
    """The same step with tiny sizes (``--preset tiny``)."""
    measured: str
    """Where and how long the step took when the shipped artefact was built."""


def _run_dir(out: Path, name: str = "backbone_a") -> str:
    return str(out / "runs" / name)


STEPS: tuple[BuildStep, ...] = (
    BuildStep(
        "backbone-train", "promptloop.miniworld.train_backbone",
        lambda out, device: ["--out", _run_dir(out), "--preset", "cpu", "--device", device, "--vae-blocks", "2",
                             "--vae-object-weight", "10", "--vae-steps", "1200", "--vae-batch", "32",
                             "--unet-steps", "8601", "--checkpoint-every", "300", "--eval-captions", "32",
                             "--eval-seeds", "4", "--eval-guidance", "2", "4", "--max-minutes", "1200"],
        lambda out, device: ["--out", _run_dir(out), "--preset", "tiny", "--device", device, "--unet-steps", "2",
                             "--max-minutes", "5"],
        "3.4 hours of training on 2 CPU cores (one or two threads, 5 invocations with --resume): VAE 25 minutes, "
        "UNet 0.7-1.2 steps/s"),
    BuildStep(
        "backbone-continue", "promptloop.miniworld.train_backbone",
        lambda out, device: ["--out", _run_dir(out, "backbone_a_continued"), "--preset", "cpu", "--device", device,
                             "--init-from", str(Path(_run_dir(out)) / "pipeline"), "--p-name-start", "0.6",
                             "--unet-steps", "3076", "--checkpoint-every", "300", "--eval-captions", "32",
                             "--eval-seeds", "4", "--eval-guidance", "2", "4", "--max-minutes", "600"],
        lambda out, device: ["--out", _run_dir(out, "backbone_a_continued"), "--preset", "tiny", "--device", device,
                             "--init-from", str(Path(_run_dir(out)) / "pipeline"), "--unet-steps", "2",
                             "--max-minutes", "5"],
        "37 minutes on 2 CPU threads (1.4 UNet steps/s), with 3 curve points and the evaluation"),
    BuildStep(
        "backbone-export", "promptloop.miniworld.export_backbone",
        lambda out, device: [_run_dir(out, "backbone_a_continued"), str(out / "backbone_a"), "--captions", "32",
                             "--seeds", "4", "--guidance", "4", "2"],
        lambda out, device: [_run_dir(out, "backbone_a_continued"), str(out / "backbone_a"), "--captions", "2",
                             "--seeds", "1", "--steps", "2"],
        "3 minutes on 2 CPU cores"),
    BuildStep(
        "preference", "promptloop.miniworld.train_preference",
        lambda out, device: ["--out", str(out / "preference"), "--seed", "0", "--pipeline", str(out / "backbone_a")],
        lambda out, device: ["--out", str(out / "preference"), "--seed", "0", "--pool-size", "48",
                             "--eval-pool-size", "24", "--eval-pairs", "32", "--steps", "3", "--batch-pairs", "8"],
        "16 minutes on one loaded CPU core, plus about 40 s for the generated-image agreement"),
    BuildStep(
        "policy", "promptloop.miniworld.policy_warmstart",
        lambda out, device: ["--out", str(out / "policy"), "--seed", "0", "--steps", "2000", "--threads", "2",
                             "--device", device],
        lambda out, device: ["--out", str(out / "policy"), "--seed", "0", "--steps", "2", "--batch-size", "3",
                             "--eval-examples", "2", "--tokenizer-corpus", "40", "--device", device],
        "6.5 minutes on 2 idle CPU cores"),
    BuildStep(
        "policy-edit", "promptloop.miniworld.policy_warmstart",
        lambda out, device: ["--out", str(out / "policy_edit"), "--edit-later", "--seed", "0", "--steps", "4000",
                             "--threads", "1", "--device", device],
        lambda out, device: ["--out", str(out / "policy_edit"), "--edit-later", "--seed", "0", "--steps", "2",
                             "--batch-size", "3", "--eval-examples", "2", "--tokenizer-corpus", "40",
                             "--device", device],
        "17 minutes on one CPU thread"),
    BuildStep(
        "policy-grpo", "promptloop.miniworld.train_policy",
        lambda out, device: ["--out", _run_dir(out, "policy_grpo"), "--dest", str(out / "policy_grpo"),
                             "--warm-start", str(out / "policy_edit"), "--backbone", str(out / "backbone_a"),
                             "--preference", str(out / "preference"), "--steps", "800", "--seed", "2"],
        lambda out, device: ["--out", _run_dir(out, "policy_grpo"), "--dest", str(out / "policy_grpo"),
                             "--warm-start", str(out / "policy_edit"), "--backbone", str(out / "backbone_a"),
                             "--preference", str(out / "preference"), "--steps", "2", "--checkpoint-every", "1",
                             "--tiny"],
        "75-90 minutes on one CPU core (5.5-8 s per step, with another run on the other core)"),
    BuildStep(
        "backbone-b", "promptloop.miniworld.train_flow_backbone",
        lambda out, device: ["--out", _run_dir(out, "backbone_b"), "--vae-from", str(out / "backbone_a"),
                             "--device", device, "--steps", "16865", "--lr", "6e-4", "--curve-every", "1000",
                             "--curve-captions", "16", "--curve-seeds", "4", "--eval-captions", "32",
                             "--eval-seeds", "4", "--max-minutes", "600"],
        lambda out, device: ["--out", _run_dir(out, "backbone_b"), "--vae-from", str(out / "backbone_a"),
                             "--preset", "tiny", "--device", device, "--steps", "2", "--max-minutes", "5"],
        "97 minutes of training on one loaded CPU thread (5 invocations with --resume); a GPU preset exists, "
        "not run"),
    BuildStep(
        "backbone-b-export", "promptloop.miniworld.export_backbone",
        lambda out, device: [_run_dir(out, "backbone_b"), str(out / "backbone_b"), "--captions", "32", "--seeds", "4",
                             "--steps", "10", "--guidance", "4", "2"],
        lambda out, device: [_run_dir(out, "backbone_b"), str(out / "backbone_b"), "--captions", "2", "--seeds", "1",
                             "--steps", "2"],
        "2.5 minutes on 2 CPU cores"),
    BuildStep(
        "weight-tune", "promptloop.miniworld.weight_tune",
        lambda out, device: ["--out", _run_dir(out, "backbone_a_tuned"), "--backbone", str(out / "backbone_a"),
                             "--preference", str(out / "preference"), "--steps", "150", "--batch-size", "16",
                             "--learning-rate", "1e-4", "--checkpoint-every", "25", "--device", device],
        lambda out, device: ["--out", _run_dir(out, "backbone_a_tuned"), "--backbone", str(out / "backbone_a"),
                             "--preference", str(out / "preference"), "--steps", "2", "--batch-size", "2",
                             "--checkpoint-every", "1", "--num-inference-steps", "2", "--device", device,
                             "--no-progress"],
        "8 minutes on one loaded CPU core"),
    BuildStep(
        "weight-tune-export", "promptloop.miniworld.evaluate_weight_tune",
        lambda out, device: [_run_dir(out, "backbone_a_tuned"), "--prompts", "32", "--seeds", "4",
                             "--ship-queries", "2400", "--dest", str(out / "backbone_a_tuned")],
        lambda out, device: [_run_dir(out, "backbone_a_tuned"), "--prompts", "1", "--seeds", "1",
                             "--ship-queries", "4", "--dest", str(out / "backbone_a_tuned")],
        "about 25 s per checkpoint on 2 loaded CPU cores (7 checkpoints)"),
)


def plan(out: Path, device: str = "cpu", preset: str = "full",
         only: Sequence[str] = ()) -> list[tuple[BuildStep, list[str]]]:
    """The steps to run (all, or those named in ``only``, in recipe order) with their arguments."""
    if preset not in ("full", "tiny"):
        raise ValueError(f"preset must be 'full' or 'tiny', got {preset!r}.")
    unknown = sorted(set(only) - set(STEP_NAMES))
    if unknown:
        raise ValueError(f"Unknown build steps {unknown}; choose from {', '.join(STEP_NAMES)}.")
    chosen = [s for s in STEPS if not only or s.name in only]
    return [(s, (s.tiny_argv if preset == "tiny" else s.argv)(out, device)) for s in chosen]


def command_line(step: BuildStep, argv: Sequence[str]) -> str:
    return " ".join(["python", "-m", step.module, *argv])


def build(out: str | Path, device: str = "cpu", preset: str = "full", only: Sequence[str] = (), dry_run: bool = False,
          log=print) -> dict[str, float]:
    """Run the recipe (or print it with ``dry_run``); returns the seconds each step took."""
    out = Path(out)
    steps = plan(out, device, preset, only)
    seconds: dict[str, float] = {}
    for i, (step, argv) in enumerate(steps, 1):
        log(f"[{i}/{len(steps)}] {step.name} ({step.measured}):\n  {command_line(step, argv)}")
        if dry_run:
            continue
        out.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        importlib.import_module(step.module).main(list(argv))
        seconds[step.name] = round(time.perf_counter() - start, 1)
        log(f"[{i}/{len(steps)}] {step.name} done in {seconds[step.name]:.0f} s")
    return seconds


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/miniworld_build",
                        help="folder for the rebuilt artefacts (the layout of promptloop/miniworld/assets)")
    parser.add_argument("--device", default="cpu", help="torch device for the training steps, e.g. cuda")
    parser.add_argument("--preset", choices=("full", "tiny"), default="full",
                        help="full: the shipped recipe; tiny: every step with tiny sizes (a smoke test)")
    parser.add_argument("--only", nargs="+", default=(), choices=STEP_NAMES, metavar="STEP",
                        help=f"run only these steps ({', '.join(STEP_NAMES)})")
    parser.add_argument("--dry-run", action="store_true", help="print the commands without running them")


__all__ = ["BuildStep", "STEPS", "STEP_NAMES", "add_arguments", "build", "command_line", "plan"]
