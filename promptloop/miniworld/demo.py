"""``promptloop demo``: PromptLoop end to end in the mini world, on a CPU, with no downloads.

Trains the shipped warm-started policy (``assets/policy_edit``) with GRPO on backbone A against the learned
preference reward (closed loop, N_R = 1 plus the initial rewrite; rewrites that leave out a query word are
rejected), then evaluates on held-out queries with fixed
seeds: the base backbone (no rewriting), the untrained policy (the warm start, adapter off), the policy the demo
trained, and the shipped policy trained the same way for 800 steps (``assets/policy_grpo``, built by
``python -m promptloop.miniworld.train_policy``), each scored by the training reward, the hidden gold rule and
query fidelity. Everything goes through the project's own trainer (``promptloop.rl``) and evaluation harness
(``promptloop.eval``): the same code that runs SDXL and Qwen2.5-VL.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

from .backbone import SHIPPED_BACKBONE_A
from .policy_warmstart import miniworld_policy_config
from .queries import training_queries
from .rewards import ASSETS_DIR

EDIT_WARM_START = ASSETS_DIR / "policy_edit"
"""The warm start the demo trains from: supervised so that later rewrites edit the prompt in force
(``policy_warmstart --edit-later --steps 4000``; docs/miniworld.md)."""
SHIPPED_TRAINED_POLICY = ASSETS_DIR / "policy_grpo"
"""The demo's GRPO run for 800 steps (seed 2): a LoRA adapter on ``EDIT_WARM_START`` (``train_policy``)."""
SHIPPED_TRAINED_LABEL = "shipped-800-steps"


@dataclass
class DemoSize:
    steps: int
    prompts_per_step: int
    group_size: int
    num_refinements: int
    sampler_steps: int
    eval_prompts: int
    eval_seeds: int
    initial_rewrite: bool = False
    """Closed loop: the policy also writes the prompt for step 0 (``grpo.initial_rewrite``), in training and eval."""
    eval_first_seed: int = 0
    """Evaluation seeds are ``eval_first_seed .. eval_first_seed + eval_seeds - 1`` (fresh seeds confirm a result)."""


FULL = DemoSize(steps=40, prompts_per_step=4, group_size=8, num_refinements=1, sampler_steps=10, eval_prompts=32,
                eval_seeds=4, initial_rewrite=True)
QUICK = DemoSize(steps=2, prompts_per_step=2, group_size=4, num_refinements=1, sampler_steps=6, eval_prompts=4,
                 eval_seeds=2, initial_rewrite=True)


def _reward_curve(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = list(range(1, len(history) + 1))
    rewards = [h["reward/mean"] for h in history]
    window = max(len(rewards) // 8, 1)  # each step's mean is over a few queries: the running mean shows the trend
    running = []
    for i in range(len(rewards)):
        recent = rewards[max(i + 1 - window, 0):i + 1]
        running.append(sum(recent) / len(recent))
    fig, ax = plt.subplots(figsize=(5, 3), dpi=120)
    ax.plot(steps, rewards, marker="o", ms=3, alpha=0.4, label="training reward (step mean)")
    ax.plot(steps, running, lw=2, label=f"running mean of {window} steps")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("miniworld-preference")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _training_completions_markdown(path: Path, size: DemoSize) -> str:
    """What the policy wrote during the demo's training (``promptloop.eval.completions``): reward and added words
    per quarter of the run, and the centred reward of each edit (rows with at least one step's trajectories)."""
    from ..eval.completions import edit_attribution, load_completions, render, windows

    rows = load_completions(path)
    summary = windows(rows, max(size.steps // 4, 1))
    text = render(rows, summary, edit_attribution(rows), min_count=size.prompts_per_step * size.group_size)
    return ("\n### What the policy wrote during training\n\n"
            f"From `{path.name}` (`python -m promptloop.eval.completions {path.parent}`).\n\n" + text)


def train_config(out_dir: Path, prompts_file: Path, size: DemoSize = FULL, warm_start: Path = EDIT_WARM_START,
                 seed: int = 0, checkpoint_every: int | None = None, backbone: Path = SHIPPED_BACKBONE_A,
                 preference: Path | None = None, keep_query_words: bool = True, feedback: bool = True):
    """The demo's GRPO run from ``warm_start`` (``configs/miniworld_grpo.yaml`` holds the same settings for
    ``promptloop train``); one checkpoint at the end unless ``checkpoint_every`` is given. ``backbone`` and
    ``preference`` (the reward model's folder) default to the shipped ones; ``keep_query_words`` (on) is the
    policy's guard against rewrites that leave out a query word; ``feedback`` off withholds the x0 preview from
    the policy (the feedback ablation)."""
    from ..rl.config import BackboneSection, DataSection, GRPOSection, LoggingSection, RewardSection, TrainConfig

    return TrainConfig(
        backbone=BackboneSection(name_or_path=str(backbone), dtype="float32",
                                 num_inference_steps=size.sampler_steps, guidance_scale=2.0, preview_size=32,
                                 rollout_batch_size=size.prompts_per_step * size.group_size),
        data=DataSection(prompts=str(prompts_file)),
        policy=replace(miniworld_policy_config("closed", warm_start), keep_query_words=keep_query_words),
        reward=RewardSection(spec="miniworld-preference",
                             kwargs={} if preference is None else {"path": str(preference)}),
        grpo=GRPOSection(prompts_per_step=size.prompts_per_step, group_size=size.group_size,
                         num_refinements=size.num_refinements, initial_rewrite=size.initial_rewrite,
                         schedule="per_group", shared_noise=True, feedback=feedback,
                         mini_batches=4, micro_batch_size=size.group_size, learning_rate=2e-3, beta=0.04,
                         advantage_scale="batch",
                         max_steps=size.steps, seed=seed),
        logging=LoggingSection(output_dir=str(out_dir / "train"), report_to="none",
                               image_every=checkpoint_every or max(size.steps // 3, 1),
                               checkpoint_every=checkpoint_every or size.steps, keep_last=3 if checkpoint_every else 1,
                               log_completions=True, progress=True),
    )


def evaluation_config(out_dir: str | Path, policies: dict[str, str | Path], size: DemoSize = FULL,
                      kind: str = "closed", backbones: dict[str, str | Path] | None = None,
                      temperature: float = 1.0):
    """The demo's evaluation: the base backbone, the untrained policy (warm start, adapter off) and each saved policy
    of ``policies`` (name -> folder) as method ``kind`` (closed loop by default; ``oneshot`` or ``closed-noimage``
    for policies trained that way) at ``size.num_refinements``, on ``miniworld:heldout`` queries x fixed seeds,
    scored by the training reward, the gold rule and query fidelity. ``backbones`` (name -> pipeline folder)
    defaults to backbone A. Policies sample at ``temperature`` (1, as in training, by default; 0 decodes greedily).
    With no ``policies`` only the base is evaluated."""
    from ..configuration import build
    from ..eval.config import EvalConfig

    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 decodes greedily).")
    backbones = backbones or {"backbone_a": SHIPPED_BACKBONE_A}
    backbone_sections = {name: dict(name_or_path=str(path), num_inference_steps=size.sampler_steps,
                                    guidance_scale=2.0, batch_size=16) for name, path in backbones.items()}
    policy_method = dict(kind=kind, num_refinements=[0 if kind == "oneshot" else size.num_refinements])
    if size.initial_rewrite and kind != "oneshot":
        policy_method["initial_rewrite"] = True
    methods = {"base": {"kind": "base"}}
    if policies:
        methods["untrained"] = dict(policy_method, policy=str(next(iter(policies.values()))), adapter=False)
    methods.update({name: dict(policy_method, policy=str(path)) for name, path in policies.items()})
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    return build(EvalConfig, {
        "prompts": {"source": "miniworld:heldout", "limit": size.eval_prompts},
        "seeds": list(range(size.eval_first_seed, size.eval_first_seed + size.eval_seeds)),
        "baseline": "base",
        "device": "cpu",
        "backbones": backbone_sections,
        "methods": methods,
        "rewards": {"preference": {"spec": "miniworld-preference"}, "gold": {"spec": "miniworld-gold"},
                    "fidelity": {"spec": "miniworld-fidelity"}},
        "policy_sampling": sampling,
        "output": {"output_dir": str(out_dir)},
    })


def run_demo(out_dir: str | Path, quick: bool = False, log=print) -> dict:
    """Train, evaluate, write the report folder; returns a summary dict (also written as ``summary.json``)."""
    from ..eval.results import paired_markdown
    from ..eval.runner import run_evaluation
    from ..rl.trainer import GRPOTrainer

    size = QUICK if quick else FULL
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    prompts_file = out / "train_queries.txt"
    prompts_file.write_text("\n".join(training_queries()) + "\n", encoding="utf-8")

    config = train_config(out, prompts_file, size)
    config.logging.overwrite_output_dir = True  # the demo writes its report folder anew, training included
    log(f"[1/2] GRPO training: {size.steps} steps x {size.prompts_per_step} queries x G={size.group_size}, "
        f"N_R={size.num_refinements}, on backbone A ({SHIPPED_BACKBONE_A})")
    trainer = GRPOTrainer.from_config(config)
    history = trainer.train()
    policy_dir = trainer.policy_dir
    _reward_curve(history, out / "reward_curve.png")
    (out / "train_history.json").write_text(json.dumps(history, indent=1))

    log("[2/2] evaluation on held-out queries with fixed seeds (the shipped 800-step policy too)")
    policies = {"trained": policy_dir, SHIPPED_TRAINED_LABEL: SHIPPED_TRAINED_POLICY}
    eval_config = evaluation_config(out / "eval", policies, size)
    results = run_evaluation(eval_config, log=log)
    table = (out / "eval" / "results.md").read_text(encoding="utf-8") + paired_markdown(results, "untrained")
    table += _training_completions_markdown(out / "train" / "completions.jsonl", size)
    (out / "results.md").write_text(table, encoding="utf-8")
    summary = {"seconds": time.perf_counter() - start, "quick": quick, "train_steps": size.steps,
               "first_step_reward": history[0]["reward/mean"], "last_step_reward": history[-1]["reward/mean"],
               "report": str(out / "eval" / "report.html"), "policy": str(policy_dir)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    log(table)
    log(f"demo finished in {summary['seconds']:.0f} s. Report: {out / 'eval' / 'report.html'}; reward curve: "
        f"{out / 'reward_curve.png'}; trained policy: {policy_dir}")
    return summary | {"results": results}
