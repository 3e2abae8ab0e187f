"""Training configuration: one dataclass per section, help text on every field, derived sizes checked up front."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from ..policy import PolicyConfig
from ..policy.vllm_backend import check_gpu_memory_utilization


def _help(text: str, required: bool = False, **kw):
    """A field with help text; ``required``: its default only stands for "not given" (``--help`` says required)."""
    return field(metadata={"help": text, "required": True} if required else {"help": text}, **kw)


@dataclass
class BackboneSection:
    name_or_path: str = _help("diffusers pipeline folder or hub id (SD1.x/2.x, SDXL, SD3, FLUX).", required=True,
                                default="")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _help(
        "Weights dtype of the pipeline ('auto': bfloat16 on CUDA, float32 on CPU).", default="auto")
    num_inference_steps: int = _help("Sampler steps T per image (> N_R).", default=50)
    guidance_scale: Optional[float] = _help("CFG scale; None keeps the pipeline's default.", default=None)
    negative_prompt: Optional[str] = _help("Negative prompt for every image; None keeps the default.", default=None)
    height: Optional[int] = _help("Image height; None keeps the pipeline's default.", default=None)
    width: Optional[int] = _help("Image width; None keeps the pipeline's default.", default=None)
    revision: Optional[str] = _help("Branch, tag or commit of a hub pipeline (None: its default branch).",
                                    default=None)
    variant: Optional[str] = _help("Weight files of this variant, e.g. 'fp16' (half the download of SDXL; None: the "
                                   "default files).", default=None)
    preview_size: int = _help("Longest side (px) of the x0 preview shown to the policy.", default=256)
    rollout_batch_size: int = _help("Trajectories sampled together in one batched rollout (memory knob).",
                                    default=16)

    def __post_init__(self):
        if not self.name_or_path:
            raise ValueError("name_or_path is empty: give a diffusers pipeline folder or hub id")
        for name in ("num_inference_steps", "preview_size", "rollout_batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        for name in ("height", "width"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0 (or None for the pipeline's default)")


@dataclass
class RewardSection:
    spec: str = _help("Reward name ('imagereward'), composite ('imagereward:1.0,aesthetic:0.1') or "
                      "'module:function'. Always scored against the user's original query.", default="imagereward")
    device: Optional[str] = _help("Device of the reward model (default: the training device).", default=None)
    timeout_s: Optional[float] = _help("Seconds to wait for one batch of scores before the step is skipped.",
                                       default=None)
    kwargs: dict[str, Any] = _help("Keyword arguments for load_reward: local weights of one reward "
                                   "(path: /weights/imagereward) or, for a composite, per component name "
                                   "(aesthetic: {path: /weights/aesthetic}).", default_factory=dict)

    def __post_init__(self):
        if not self.spec.strip():
            raise ValueError("spec is empty: give a reward name, a composite or 'module:function'")
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise ValueError(f"timeout_s={self.timeout_s} must be > 0 (or None to wait without limit)")


@dataclass
class DataSection:
    prompts: str = _help("Training queries: a .txt (one per line), .jsonl or .csv file, or 'hf:DATASET[:SPLIT]' "
                         "(needs the datasets package and network).", required=True, default="")
    column: str = _help("Column holding the query in .jsonl/.csv/datasets inputs.", default="prompt")
    eval_prompts: Optional[str] = _help("Held-out queries for periodic evaluation (same formats).", default=None)
    num_eval_prompts: int = _help("Held-out queries used per evaluation.", default=16)
    shuffle: bool = _help("Shuffle the training queries (seeded; the position is saved in checkpoints).",
                          default=True)

    def __post_init__(self):
        if not self.prompts:
            raise ValueError("prompts is empty: give a prompt file or 'hf:DATASET[:SPLIT]'")
        if self.num_eval_prompts < 0:
            raise ValueError(f"num_eval_prompts={self.num_eval_prompts} must be >= 0")


@dataclass
class GRPOSection:
    prompts_per_step: int = _help("Queries per training step, over all processes.", default=8)
    group_size: int = _help("Trajectories per query (G); advantages are relative within the group.", default=8)
    num_refinements: int = _help("Refinements per trajectory (N_R), drawn at random steps in training. Must be 1 "
                                 "with policy.mode 'oneshot' (one rewrite before sampling).", default=5)
    initial_rewrite: bool = _help(
        "The policy also writes the prompt for step 0, before the first denoiser evaluation (it sees the query and "
        "no preview: no x0 estimate exists yet), then refines at the N_R decision steps. PromptLoop's MDP acts from "
        "t = T on; a backbone that commits to the layout in its first steps leaves most of its room there. "
        "Closed loop only; evaluation and inference take the same flag.", default=False)
    feedback: bool = _help(
        "Show the policy the x0 preview at each refinement (the method). False withholds it (the policy still sees "
        "the query, its earlier prompts and the progress): the feedback ablation, trained the same way.",
        default=True)
    schedule: Literal["per_trajectory", "per_group", "per_batch"] = _help(
        "Scope of one random refinement schedule: each trajectory its own, one per group, or one per batch "
        "(fewer policy calls).", default="per_trajectory")
    shared_noise: bool = _help(
        "All G trajectories of a query start from the same noise, so reward differences within a group come from "
        "the prompts (the policy's actions) rather than from the noise. Default true.", default=True)
    inner_epochs: int = _help("Passes over each rollout's actions (PPO epochs).", default=1)
    mini_batches: int = _help("Optimizer steps per inner epoch (actions are split into this many parts).",
                              default=1)
    micro_batch_size: int = _help("Actions per forward/backward pass (gradient accumulation fills the rest).",
                                  default=4)
    learning_rate: float = _help("AdamW learning rate of the LoRA parameters.", default=1e-5)
    weight_decay: float = _help("AdamW weight decay.", default=0.0)
    warmup_steps: int = _help("Linear learning-rate warm-up, in optimizer steps.", default=0)
    lr_scheduler_type: Literal["constant", "linear", "cosine"] = _help(
        "Learning rate after the warm-up: constant, or decayed to 0 at the last optimizer step (max_steps x "
        "optimizer steps per training step) linearly or along a half cosine.", default="constant")
    max_grad_norm: float = _help("Gradient clipping norm (<= 0 disables).", default=1.0)
    clip_low: float = _help("Lower clip range epsilon_low of the ratio.", default=0.2)
    clip_high: float = _help("Upper clip range epsilon_high of the ratio.", default=0.28)
    beta: float = _help("KL coefficient to the reference policy (adapter off). 0 disables the KL term.",
                        default=0.0)
    advantage_scale: Literal["group", "batch", "none"] = _help(
        "Divide centred rewards by the group std (GRPO), the batch std, or not at all. With 'group', a group whose "
        "rewards nearly tie gets as much weight as one where the prompts changed the image; 'batch' weighs groups "
        "by their reward spread (the mini-world recipe, docs/results.md).", default="group")
    loss_normalisation: Literal["token", "sequence"] = _help(
        "Average the per-token loss over all tokens of a mini-batch, or per action then over actions.",
        default="token")
    old_logprobs: Literal["auto", "sampling", "recompute"] = _help(
        "Old-policy log-probs in the ratio: those recorded while sampling ('sampling'; exact in fp32), or recomputed "
        "by a forward shaped like the training micro-batch ('recompute'; needed in bf16, where generation and a full "
        "forward differ by ~1e-3). 'auto' recomputes unless the policy runs in float32 without mixed precision.",
        default="auto")
    ratio_tolerance: float = _help("Largest |ratio - 1| allowed on the first, on-policy micro-batch; above it "
                                   "training stops with an error (log-prob mismatch).", default=1e-3)
    nonfinite_rollout_limit: int = _help(
        "Training steps in a row whose rollout produced NaN/inf latents that are skipped (warned and counted as "
        "train/nonfinite_rollout_skips, nothing applied) before training stops with the error; 0 stops at the first.",
        default=3)
    rollout_backend: Literal["transformers", "vllm"] = _help(
        "What samples the policy's answers in rollouts and evaluation: transformers.generate, or vLLM (`pip install "
        "vllm`, CUDA) serving the current LoRA adapter, handed over after every update. Either way the answers' "
        "log-probs come from the training model (float32, teacher-forced), so the loss and the ratio check are the "
        "same; vLLM only decodes faster. vLLM runs in each process, beside the training model.",
        default="transformers")
    vllm_gpu_memory_utilization: float = _help(
        "rollout_backend 'vllm': share of the GPU vLLM reserves (its copy of the base weights + KV cache); the rest "
        "is left to the backbone, the reward and training.", default=0.3)
    max_steps: int = _help("Training steps (one rollout + update each).", default=100)
    seed: int = _help("Seed of data order, noise, schedules and policy sampling.", default=0)

    def __post_init__(self):
        for name in ("prompts_per_step", "inner_epochs", "mini_batches", "micro_batch_size", "max_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if self.group_size < 2:
            raise ValueError(f"group_size={self.group_size} must be >= 2 (advantages compare trajectories)")
        if self.num_refinements < 1:
            raise ValueError(f"num_refinements={self.num_refinements} must be >= 1")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate={self.learning_rate} must be > 0")
        if not (0 <= self.clip_low < 1 and self.clip_high >= 0):
            raise ValueError(f"clip_low={self.clip_low} must be in [0, 1) and clip_high={self.clip_high} >= 0")
        for name in ("beta", "weight_decay", "warmup_steps", "ratio_tolerance", "nonfinite_rollout_limit"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        check_gpu_memory_utilization(self.vllm_gpu_memory_utilization)


def check_trackers(report_to: Union[str, list[str]]) -> Union[str, list[str]]:
    """``report_to`` after checking that every tracker it names is one accelerate knows and that its package is
    installed (accelerate would silently log nothing to a missing one)."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers
    from accelerate.utils import LoggerType

    names = [report_to] if isinstance(report_to, str) else list(report_to)
    if not names or ("none" in names and len(names) > 1):
        raise ValueError(f"report_to={report_to!r}: give trackers, or 'none' alone.")
    known = sorted(LOGGER_TYPE_TO_CLASS)
    unknown = [n for n in names if n not in LOGGER_TYPE_TO_CLASS and n not in ("all", "none")]
    if unknown:
        raise ValueError(f"report_to: unknown tracker(s) {unknown}; choose among {known}, 'all' or 'none'.")
    installed = {str(t) for t in get_available_trackers()}
    missing = [n for n in names if n in LoggerType.list() and n not in ("all", "none") and n not in installed]
    if missing:
        raise ValueError(f"report_to asks for {missing}, not installed here: `pip install {' '.join(missing)}`, or "
                         "leave them out.")
    return report_to


@dataclass
class LoggingSection:
    output_dir: str = _help("Run folder: checkpoints, logs, trajectory grids.", default="runs/promptloop")
    report_to: Union[str, list[str]] = _help(
        "Trackers for metrics, through accelerate: tensorboard, wandb, trackio, comet_ml, aim, mlflow, clearml, "
        "dvclive, swanlab (or, with accelerate >= 1.15, one registered with register_tracker_class); several as a "
        "list (a comma "
        "list on the command line); 'all': every one installed; 'none'. Trajectory grids go to TensorBoard and W&B, "
        "and to <output_dir>/images always.", default="tensorboard")
    project: str = _help("Tracker project: the W&B project, the TensorBoard subfolder of output_dir.",
                         default="promptloop")
    run_name: Optional[str] = _help("W&B run name (None: the name of output_dir).", default=None)
    log_every: int = _help("Log metrics every N steps.", default=1)
    image_every: int = _help("Log a grid of trajectory strips every N steps (0: never).", default=10)
    eval_every: int = _help("Evaluate on held-out queries every N steps (0: never).", default=0)
    log_completions: bool = _help(
        "Append every trajectory of every step (step, query, prompts in force, reward) to completions.jsonl in the "
        "run folder (the main process's share of the queries). A fresh run starts the file anew; --resume drops "
        "the rows of steps after its checkpoint, which run again.", default=False)
    checkpoint_every: int = _help("Write a checkpoint every N steps (and at exit).", default=10)
    keep_last: int = _help("Checkpoints kept (oldest removed first).", default=3)
    overwrite_output_dir: bool = _help(
        "Delete checkpoints of an earlier run in output_dir that lie past the step this run starts from (all of "
        "them on a fresh start) instead of stopping with an error: they would be taken for this run's.",
        default=False)
    progress: bool = _help("Show a progress bar with ETA.", default=True)
    push_to_hub: bool = _help(
        "At the end of training, upload the trained policy (<output_dir>/policy: adapter, processor, config, model "
        "card) to the hub repo hub_model_id. Needs a hub token (`hf auth login` or HF_TOKEN), checked before any "
        "model loads.", default=False)
    hub_model_id: Optional[str] = _help("Hub repo the policy is pushed to ('org/name'; created if missing).",
                                        default=None)
    hub_private_repo: Optional[bool] = _help("Create the hub repo private (None: the hub's default).", default=None)
    hub_strategy: Literal["every_save", "checkpoint", "end"] = _help(
        "With push_to_hub: 'every_save' also uploads each checkpoint's policy when it is written (a failed upload "
        "is a warning and training goes on); 'checkpoint' does too, and uploads the whole checkpoint (optimizer, "
        "LR schedule, RNG, data position) to the repo's last-checkpoint/ folder, so that a preempted run continues "
        "on any machine with `--resume-from HUB_MODEL_ID`; 'end' uploads only the final policy.",
        default="every_save")

    def __post_init__(self):
        self.report_to = check_trackers(self.report_to)
        for name in ("log_every", "checkpoint_every", "keep_last"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        for name in ("image_every", "eval_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0 (0: never)")
        if not self.output_dir.strip():
            raise ValueError("output_dir is empty: give the run folder")
        if not self.project.strip() or "/" in self.project or "\\" in self.project or self.project in (".", ".."):
            raise ValueError(f"project={self.project!r} must be a plain name (it becomes a folder of output_dir)")
        if self.hub_model_id is not None:
            from huggingface_hub.utils import HFValidationError, validate_repo_id

            try:
                validate_repo_id(self.hub_model_id)
            except HFValidationError as e:
                raise ValueError(f"hub_model_id={self.hub_model_id!r} is not a hub repo id ('org/name'): {e}") from e
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("push_to_hub is on but hub_model_id is empty: give the repo to push to "
                             "(--logging.hub_model_id org/name)")


@dataclass
class TrainConfig:
    """Everything ``promptloop train`` reads. Sections map to YAML mappings and ``--section.key`` overrides."""

    backbone: BackboneSection = _help("The frozen diffusion pipeline and its sampler settings (required).")
    data: DataSection = _help("Training and evaluation queries (required).")
    policy: PolicyConfig = _help("The VLM policy and its LoRA.", default_factory=PolicyConfig)
    reward: RewardSection = _help("The training reward.", default_factory=RewardSection)
    grpo: GRPOSection = _help("GRPO hyper-parameters.", default_factory=GRPOSection)
    logging: LoggingSection = _help("Output, logging and checkpoints.", default_factory=LoggingSection)

    def __post_init__(self):
        mode = getattr(self.policy, "mode", "closed")
        if mode == "apriori":
            raise ValueError("policy.mode='apriori' cannot be trained: train 'closed' (the method; a trained "
                             "closed-loop policy also writes a-priori schedules at inference) or 'oneshot' (the "
                             "one-rewrite baseline).")
        if mode == "oneshot" and self.grpo.num_refinements != 1:
            raise ValueError(f"policy.mode='oneshot' writes one prompt before sampling: set grpo.num_refinements=1 "
                             f"(got {self.grpo.num_refinements}).")
        if mode == "oneshot" and self.grpo.initial_rewrite:
            raise ValueError("grpo.initial_rewrite is a closed-loop option; policy.mode='oneshot' already writes "
                             "the prompt before sampling. Set grpo.initial_rewrite=false.")
        if mode == "closed" and self.grpo.num_refinements >= self.backbone.num_inference_steps:
            raise ValueError(f"grpo.num_refinements={self.grpo.num_refinements} needs backbone.num_inference_steps > "
                             f"{self.grpo.num_refinements} (got {self.backbone.num_inference_steps}): refinements "
                             "take effect at sampler steps 1 .. T-1. Raise the steps or lower the refinements.")


@dataclass
class DerivedSizes:
    """Sizes that follow from a config and the number of processes; printed before any model loads."""

    num_processes: int
    prompts_per_process: int
    trajectories_per_process: int
    actions_per_process: int
    actions_per_optimizer_step: int
    micro_batches_per_optimizer_step: int
    optimizer_steps_per_training_step: int

    def table(self) -> str:
        return "\n".join(f"  {k:34s} {v}" for k, v in self.__dict__.items())


def derive_sizes(grpo: GRPOSection, num_processes: int = 1) -> DerivedSizes:
    """Check divisibility and compute the batch arithmetic; errors name the keys to change."""
    if grpo.rollout_backend == "vllm" and num_processes > 1:
        raise ValueError(f"grpo.rollout_backend='vllm' runs in one process; this run has {num_processes}. Use "
                         "rollout_backend='transformers' under accelerate launch with several processes.")
    if grpo.prompts_per_step % num_processes:
        raise ValueError(f"grpo.prompts_per_step={grpo.prompts_per_step} must be divisible by the number of "
                         f"processes ({num_processes})")
    prompts = grpo.prompts_per_step // num_processes
    trajectories = prompts * grpo.group_size
    decisions = grpo.num_refinements + int(grpo.initial_rewrite)
    actions = trajectories * decisions
    if actions % grpo.mini_batches:
        raise ValueError(f"actions per process ({actions} = prompts {prompts} x group_size {grpo.group_size} x "
                         f"decisions {decisions} (num_refinements, plus 1 with initial_rewrite)) must be divisible "
                         f"by grpo.mini_batches={grpo.mini_batches}")
    per_step = actions // grpo.mini_batches
    if per_step % grpo.micro_batch_size:
        raise ValueError(f"actions per optimizer step ({per_step}) must be divisible by grpo.micro_batch_size="
                         f"{grpo.micro_batch_size}")
    return DerivedSizes(
        num_processes=num_processes, prompts_per_process=prompts, trajectories_per_process=trajectories,
        actions_per_process=actions, actions_per_optimizer_step=per_step,
        micro_batches_per_optimizer_step=per_step // grpo.micro_batch_size,
        optimizer_steps_per_training_step=grpo.mini_batches * grpo.inner_epochs,
    )
