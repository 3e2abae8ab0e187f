r"""Train the shipped GRPO policy: the demo's recipe run longer, then exported next to its warm start.

    python -m promptloop.miniworld.train_policy --out RUN --dest promptloop/miniworld/assets/policy_grpo \
        [--warm-start promptloop/miniworld/assets/policy_edit] [--steps 800] [--seed 2] [--resume] \
        [--backbone promptloop/miniworld/assets/backbone_a] [--preference promptloop/miniworld/assets/preference] \
        [--refinements 1] [--no-keep-query-words] [--no-feedback]

The run is ``promptloop demo``'s GRPO run (backbone A, the preference reward, N_R = 1 plus the initial rewrite,
the guard that rejects rewrites leaving out a query word, 4 queries x G = 8 per step; the shipped backbone and
reward model unless ``--backbone`` / ``--preference`` name others, as ``promptloop miniworld build`` does with
the ones it has just built) for ``--steps`` steps with
checkpoints every ``--checkpoint-every`` steps in ``RUN`` (``--resume`` continues from the latest). Its final
policy (a LoRA adapter, 0.2 MB) is copied to ``--dest`` with its base model named relative to ``--dest``
(``../policy_edit``), so the pair of folders can move together.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

from promptloop.policy.policy import ADAPTER_CONFIG_NAME, POLICY_CONFIG_NAME
from promptloop.rl.checkpoint import latest_checkpoint

from .demo import EDIT_WARM_START, FULL, QUICK, SHIPPED_BACKBONE_A, train_config
from .preference_model import CONFIG_NAME as PREFERENCE_CONFIG_NAME
from .queries import training_queries
from .rewards import DEFAULT_PREFERENCE_DIR


def export_policy(saved_policy: Path, dest: Path, base: Path) -> Path:
    """Copy ``saved_policy`` (a ``PromptPolicy.save_pretrained`` folder) to ``dest`` (replaced), naming ``base`` in
    its ``policy_config.json`` by a path relative to ``dest``."""
    saved_policy, dest = Path(saved_policy), Path(dest)
    if not (saved_policy / POLICY_CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{saved_policy} holds no {POLICY_CONFIG_NAME}; pass a saved policy folder.")
    relative = os.path.relpath(Path(base).resolve(), dest.resolve())
    relative = relative if relative.startswith("..") else "./" + relative
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(saved_policy, tmp)
    for name, key in ((POLICY_CONFIG_NAME, "model_name_or_path"), (ADAPTER_CONFIG_NAME, "base_model_name_or_path")):
        path = tmp / name
        if path.is_file():
            values = json.loads(path.read_text())
            values[key] = relative
            path.write_text(json.dumps(values, indent=2) + "\n")
    (tmp / "README.md").unlink(missing_ok=True)  # the model card names the run's absolute base path
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="run folder (checkpoints, logs)")
    parser.add_argument("--dest", required=True, help="where the trained policy is exported")
    parser.add_argument("--warm-start", default=str(EDIT_WARM_START), help="the policy GRPO starts from")
    parser.add_argument("--steps", type=int, default=800, help="GRPO steps (the shipped policy: 800)")
    parser.add_argument("--seed", type=int, default=2, help="GRPO seed (the shipped run: 2)")
    parser.add_argument("--checkpoint-every", type=int, default=50, help="checkpoint every this many steps")
    parser.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    parser.add_argument("--backbone", default=str(SHIPPED_BACKBONE_A),
                        help="the mini-world backbone A pipeline folder GRPO samples with")
    parser.add_argument("--preference", default=str(DEFAULT_PREFERENCE_DIR),
                        help="the learned preference model folder (the training reward)")
    parser.add_argument("--refinements", type=int, default=None,
                        help=f"N_R, the refinements per trajectory after the initial rewrite (default "
                             f"{FULL.num_refinements}, the demo's)")
    parser.add_argument("--keep-query-words", action=argparse.BooleanOptionalAction, default=True,
                        help="reject rewrites that leave out a query word (policy.keep_query_words; on in the "
                             "shipped recipe)")
    parser.add_argument("--feedback", action=argparse.BooleanOptionalAction, default=True,
                        help="show the policy the x0 preview at its refinement actions (--no-feedback: the "
                             "feedback ablation, the same run with the image withheld)")
    parser.add_argument("--tiny", action="store_true", help="the demo's --quick sizes (tests)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.checkpoint_every < 1 or (args.refinements is not None and args.refinements < 1):
        parser.error("--steps, --checkpoint-every and --refinements must be at least 1")
    if not Path(args.warm_start).is_dir():
        parser.error(f"--warm-start {args.warm_start} is not a folder; build it with "
                     "`python -m promptloop.miniworld.policy_warmstart --edit-later --steps 4000 --out DIR`")
    if not (Path(args.backbone) / "model_index.json").is_file():
        parser.error(f"--backbone {args.backbone} holds no model_index.json; pass a saved pipeline folder "
                     "(`python -m promptloop.miniworld.export_backbone RUN DEST` writes one)")
    if not (Path(args.preference) / PREFERENCE_CONFIG_NAME).is_file():
        parser.error(f"--preference {args.preference} holds no {PREFERENCE_CONFIG_NAME}; train one with "
                     "`python -m promptloop.miniworld.train_preference --out DIR`")
    return args


def main(argv: list[str] | None = None) -> Path:
    from promptloop.rl.trainer import GRPOTrainer

    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts_file = out / "train_queries.txt"
    prompts_file.write_text("\n".join(training_queries()) + "\n", encoding="utf-8")
    size = replace(QUICK if args.tiny else FULL, steps=args.steps)
    if args.refinements is not None:
        size = replace(size, num_refinements=args.refinements)
    config = train_config(out, prompts_file, size, warm_start=Path(args.warm_start),
                          seed=args.seed, checkpoint_every=args.checkpoint_every, backbone=Path(args.backbone),
                          preference=Path(args.preference), keep_query_words=args.keep_query_words,
                          feedback=args.feedback)
    GRPOTrainer.from_config(config).train(resume=args.resume)
    final = latest_checkpoint(out / "train")
    dest = export_policy(final / "policy", Path(args.dest), Path(args.warm_start))
    print(f"trained policy (step {final.name}) exported to {dest}")
    return dest


if __name__ == "__main__":
    main()
