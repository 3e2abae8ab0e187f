"""``promptloop`` command line: a thin layer over the library (nothing imports this module)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence


def _read_prompts(path: str) -> list[str]:
    from .rl.data import load_queries

    try:
        prompts = load_queries(path)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: --prompts: {e}")
    if not prompts:
        raise SystemExit(f"error: --prompts file {path!r} holds no prompt (one per line).")
    return prompts


def write_outputs(out_dir: Path, output, start: int = 0) -> list[Path]:
    """Images, one trajectory JSON and one trajectory strip PNG per image, numbered from ``start``."""
    from .visualize import trajectory_strip

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i, (image, trajectory) in enumerate(zip(output.images, output.trajectories), start=start):
        stem = f"{i:03d}"
        image.save(out_dir / f"{stem}.png")
        (out_dir / f"{stem}.json").write_text(json.dumps(trajectory.to_dict(), indent=2))
        trajectory_strip(trajectory, image).save(out_dir / f"{stem}_strip.png")
        written += [out_dir / f"{stem}.png", out_dir / f"{stem}.json", out_dir / f"{stem}_strip.png"]
    return written


def cmd_sample(args: argparse.Namespace) -> int:
    if bool(args.prompt) == bool(args.prompts):
        raise SystemExit("error: give exactly one of --prompt TEXT or --prompts FILE.")
    for name in ("num_images", "batch_size"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")
    prompts = [args.prompt] if args.prompt else _read_prompts(args.prompts)
    rows = [prompt for prompt in prompts for _ in range(args.num_images)]
    import torch

    from .pipeline import PromptLoopPipeline

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")  # the policy and the pipeline alike
    chosen = {key: value for key, value in (("revision", args.backbone_revision), ("variant", args.backbone_variant))
              if value}
    pipeline = PromptLoopPipeline.from_pretrained(args.policy, args.backbone, device=device,
                                                  policy_backend=args.policy_backend,
                                                  policy_revision=args.policy_revision, **chosen)
    written = []
    for start in range(0, len(rows), args.batch_size):
        chunk = rows[start:start + args.batch_size]
        if len(rows) > args.batch_size:
            print(f"images {start + 1}-{start + len(chunk)} of {len(rows)}", flush=True)
        output = pipeline(chunk, num_refinements=args.refinements, mode=args.mode,
                          seed=[args.seed + start + i for i in range(len(chunk))], num_inference_steps=args.steps,
                          guidance_scale=args.guidance_scale, preview_size=args.preview_size,
                          feedback_delay=args.feedback_delay, initial_rewrite=args.initial_rewrite, progress=True)
        written += write_outputs(Path(args.out), output, start=start)
    from .environment import environment

    record = {"arguments": {k: v for k, v in vars(args).items() if k != "func"}, "environment": environment()}
    (Path(args.out) / "sample.json").write_text(json.dumps(record, indent=2))  # what made these files
    print(f"wrote {len(written)} files and sample.json (arguments, versions) to {args.out}")
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    """Versions and accelerators, to paste into a bug report."""
    from .environment import environment

    print("\n".join(f"- {name}: {value}" for name, value in environment().items()))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """PromptLoop end to end in the mini world: GRPO training, then evaluation against base and untrained."""
    from .miniworld.demo import run_demo

    run_demo(args.out, quick=args.quick)
    return 0


def cmd_miniworld_build(args: argparse.Namespace) -> int:
    """Rebuild the shipped mini-world artefacts from seeds (see ``promptloop.miniworld.build``)."""
    from .miniworld.build import build

    build(args.out, device=args.device, preset=args.preset, only=args.only, dry_run=args.dry_run)
    return 0


def cmd_train(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    from .configuration import ConfigError, load_config
    from .rl.config import TrainConfig, derive_sizes

    if (done := _print_config(TrainConfig, args, overrides)) is not None:
        return done
    try:
        config = load_config(TrainConfig, args.config, overrides)
        from .processes import process_state

        # before anything else sets up accelerate: on a CPU-only machine several launched processes must ask for
        # the CPU (gloo), else each would run the whole training alone
        state = process_state()
        sizes = derive_sizes(config.grpo, state.num_processes)
        from .rl.checkpoint import checkpoints_after, latest_checkpoint, read_meta, resume_checkpoint

        if sum(map(bool, (args.resume, args.resume_from, args.auto_resume))) > 1:
            raise ValueError("give one of --resume (the latest checkpoint), --resume-from CHECKPOINT or "
                             "--auto-resume, not several")
        run_dir = Path(config.logging.output_dir)
        if args.auto_resume:
            resume = latest_checkpoint(run_dir)
        else:
            resume = resume_checkpoint(run_dir, args.resume_from or args.resume)
        checkpoints_after(run_dir, read_meta(resume)["step"] if resume else 0, config.logging.overwrite_output_dir)
        from .rl.trainer import GRPOTrainer, training_queries

        queries = training_queries(config)  # prompt files and the reward spec, before any model loads
    except (ConfigError, ValueError, FileNotFoundError, ImportError) as e:
        raise SystemExit(f"error: {e}")
    if state.is_main_process:
        print("derived sizes:\n" + sizes.table(), flush=True)
    trainer = GRPOTrainer.from_config(config, queries=queries)
    trainer.train(resume=resume or False)
    if trainer.terminated:  # preempted: schedulers read a non-zero status as "not finished"
        if state.is_main_process:
            print(f"stopped by SIGTERM at step {trainer.step}; continue with `promptloop train {args.config} "
                  f"--resume` (same output_dir; --auto-resume in a job that restarts itself)", flush=True)
        return 128 + 15
    if state.is_main_process:
        print(f"done: step {trainer.step}; trained policy in {trainer.policy_dir} (load it with "
              f"PromptLoopPipeline.from_pretrained or `promptloop sample --policy`); checkpoints in "
              f"{trainer.run_dir / 'checkpoints'}")
    return 0


def cmd_eval(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    from .configuration import ConfigError, load_config
    from .eval import EvalConfig, load_prompt_set, run_evaluation
    from .eval.results import markdown_table
    from .eval.journal import EvalJournal, run_identity
    from .eval.runner import check_config

    if (done := _print_config(EvalConfig, args, overrides)) is not None:
        return done
    try:
        config = load_config(EvalConfig, args.config, overrides)
        check_config(config)
        queries = load_prompt_set(config.prompts.source, config.prompts.column, config.prompts.limit)
        identity = None
        if args.resume:  # the models' files are hashed once, here
            identity = run_identity(config, queries)
            EvalJournal(Path(config.output.output_dir), 0).resume(identity)
    except (ConfigError, ValueError, FileNotFoundError, ImportError, RuntimeError) as e:  # before any model loads
        raise SystemExit(f"error: {e}")
    results = run_evaluation(config, queries=queries, resume=args.resume, identity=identity)
    print(markdown_table(results))
    return 0


class _ConfigHelpParser(argparse.ArgumentParser):
    """A parser whose ``--help`` also lists every key of its config class (``"module:Class"``, imported only when
    help is shown, so that ``promptloop --help`` stays fast)."""

    def __init__(self, *args, config_class: Optional[str] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.config_class = config_class

    def format_help(self) -> str:
        text = super().format_help()
        if self.config_class is None:
            return text
        import importlib

        from .configuration import keys_help

        module, name = self.config_class.split(":")
        return text + "\n" + keys_help(getattr(importlib.import_module(module), name)) + "\n"


def _config_command(sub, name: str, config_class: str, func, example: str, **kwargs) -> argparse.ArgumentParser:
    """``promptloop train|eval CONFIG.yaml [--section.key VALUE ...] [--print-config]``."""
    parser = sub.add_parser(name, config_class=config_class, **kwargs)
    parser.add_argument("config", help=f"YAML config (see {example})")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (the file, the overrides and every default) as YAML that "
                             "loads back to the same config, then exit: nothing else is loaded")
    parser.set_defaults(func=func, takes_overrides=True)
    return parser


def _print_config(config_class: type, args: argparse.Namespace, overrides: Sequence[str]) -> Optional[int]:
    """Handle ``--print-config``: print the YAML and return 0; None when the flag is off."""
    from .configuration import ConfigError, dump_config, load_config

    if not args.print_config:
        return None
    try:
        print(dump_config(load_config(config_class, args.config, overrides)), end="")
    except (ConfigError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="promptloop", description=__doc__)
    from . import __version__

    parser.add_argument("--version", action="version", version=f"promptloop {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_ConfigHelpParser)
    sub.add_parser("env", help="print versions and accelerators, for bug reports").set_defaults(func=cmd_env)

    demo = sub.add_parser("demo", help="train and evaluate PromptLoop in the mini world (offline, CPU, minutes)")
    demo.add_argument("--quick", action="store_true", help="the shortest run (CI)")
    demo.add_argument("--out", default="runs/demo", help="output folder")
    demo.set_defaults(func=cmd_demo)

    miniworld = sub.add_parser("miniworld", help="the mini world's own tools").add_subparsers(
        dest="miniworld_command", required=True)
    miniworld_build = miniworld.add_parser(
        "build", help="rebuild every shipped mini-world artefact from seeds (backbone A, preference, policy)")
    from .miniworld.build import add_arguments as add_build_arguments

    add_build_arguments(miniworld_build)
    miniworld_build.set_defaults(func=cmd_miniworld_build)

    train = _config_command(
        sub, "train", "promptloop.rl.config:TrainConfig", cmd_train, "configs/", help="GRPO training of the policy "
        "(works under `accelerate launch`)", description="Train with CONFIG.yaml; override any key with "
        "--section.key VALUE, e.g. --grpo.group_size 8.")
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of the run")
    train.add_argument("--auto-resume", action="store_true",
                       help="continue from the latest checkpoint if the run has one, else start: the same command "
                            "for a job's first start and its restarts after preemption")
    train.add_argument("--resume-from", metavar="CHECKPOINT",
                       help="continue from this checkpoint instead: an <output_dir>/checkpoints/step-N folder, or "
                            "the hub repo of a run pushed with --logging.hub_strategy checkpoint (its "
                            "last-checkpoint/)")
    evaluate = _config_command(
        sub, "eval", "promptloop.eval.config:EvalConfig", cmd_eval, "configs/eval_*.yaml",
        help="methods x backbones x rewards with fixed seeds: JSON, CSV, markdown and an HTML report",
        description="Evaluate with CONFIG.yaml (see configs/eval_*.yaml); override any key with --section.key VALUE, "
                    "e.g. --backbones.sd15.num_inference_steps 20.")
    evaluate.add_argument("--resume", action="store_true",
                          help="continue an interrupted evaluation in output.output_dir (same config and prompts): "
                               "only the batches it had not finished are made")

    sample = sub.add_parser("sample", help="sample images with a trained policy and any supported pipeline")
    sample.add_argument("--policy", required=True, help="saved policy folder or hub id")
    sample.add_argument("--policy-revision", metavar="REV", help="branch, tag or commit of a hub policy")
    sample.add_argument("--backbone", required=True, help="diffusers pipeline folder or hub id")
    sample.add_argument("--backbone-revision", metavar="REV", help="branch, tag or commit of a hub pipeline")
    sample.add_argument("--backbone-variant", metavar="VARIANT", help="weight files of this variant (e.g. fp16)")
    sample.add_argument("--policy-backend", choices=["transformers", "vllm"], default="transformers",
                        help="what samples the policy's answers: transformers (default) or vLLM (`pip install vllm`, "
                             "CUDA; faster decoding, same prompts)")
    sample.add_argument("--prompt", help="one prompt")
    sample.add_argument("--prompts", help="text file, one prompt per line")
    sample.add_argument("--refinements", type=int, default=None,
                        help="number of refinement steps N_R (default: as the policy was trained, else 5)")
    sample.add_argument("--mode", choices=["closed", "apriori", "oneshot", "none"], default=None,
                        help="closed: rewrites from the x0 preview (PromptLoop); apriori: all prompts written up "
                             "front; oneshot: one rewrite before sampling; none: plain sampling (default: the "
                             "policy's mode, closed unless it was trained otherwise)")
    sample.add_argument("--steps", type=int, default=50, help="sampler steps")
    sample.add_argument("--guidance-scale", type=float, default=None, help="CFG scale (default: the pipeline's)")
    sample.add_argument("--preview-size", type=int, default=256,
                        help="longest side (px) of the x0 preview shown to the policy (default: 256)")
    sample.add_argument("--feedback-delay", type=int, default=0,
                        help="closed mode: pipelined feedback, the policy's call overlaps this many sampler steps "
                             "(0: synchronous)")
    sample.add_argument("--initial-rewrite", action=argparse.BooleanOptionalAction, default=None,
                        help="closed mode: the policy also writes the prompt for step 0 (no preview yet), on top of "
                             "--refinements (default: as the policy was trained, with grpo.initial_rewrite)")
    sample.add_argument("--num-images", type=int, default=1, help="images per prompt")
    sample.add_argument("--batch-size", type=int, default=8,
                        help="images sampled together; image i's noise and the policy's sampling for it use seed "
                             "--seed + i whatever the batch size")
    sample.add_argument("--seed", type=int, default=0, help="seed of image 0; image i uses seed + i (default: 0)")
    sample.add_argument("--device", default=None,
                        help="device of the policy and the pipeline (cuda, cuda:1, cpu; default: cuda when present)")
    sample.add_argument("--out", default="outputs/sample",
                        help="folder for the images, trajectory JSONs and strips (default: outputs/sample)")
    sample.set_defaults(func=cmd_sample)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, rest = build_parser().parse_known_args(argv)
    if getattr(args, "takes_overrides", False):
        return args.func(args, rest)
    if rest:
        raise SystemExit(f"error: unrecognized arguments: {' '.join(rest)}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
