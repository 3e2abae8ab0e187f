"""Sharing a saved policy: its model card (``README.md``) and the upload of its folder to the Hugging Face hub."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from promptloop import __version__
from promptloop.policy.config import POLICY_CONFIG_NAME, PolicyConfig

MODEL_CARD_NAME = "README.md"
POLICY_FILE_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.jinja", "*.model", "*.md")
"""What a saved policy folder holds: configs, tokenizer and chat template, adapter (or bundled base) weights, card."""
HUB_CHECKPOINT_FOLDER = "last-checkpoint"
"""The folder of a policy repo that holds the latest training checkpoint (``logging.hub_strategy: checkpoint``, as
transformers names it); never downloaded to load the policy."""
CARD_TAGS = ["promptloop", "prompt-refinement", "text-to-image", "diffusion", "grpo"]

_CITATION = """@article{lee2025promptloop,
  title   = {Plug-and-Play Prompt Refinement via Latent Feedback for Diffusion Model Alignment},
  author  = {Lee and Ye},
  journal = {arXiv preprint arXiv:2510.00430},
  year    = {2025}
}"""


@dataclass(frozen=True)
class TrainingSummary:
    """What the model card says about how a policy was trained (filled by the trainer)."""

    backbone: str
    """The frozen diffusion pipeline the rollouts sampled with (folder or hub id)."""
    reward: str
    """The reward spec (``imagereward``, ``imagereward:1.0,aesthetic:0.1``, ...)."""
    num_refinements: int
    initial_rewrite: bool
    feedback: bool
    group_size: int
    prompts_per_step: int
    steps: int
    """Training steps completed."""
    learning_rate: float
    beta: float
    seed: int
    reward_first: Optional[float] = None
    """Mean training reward over the first logged steps (up to 10)."""
    reward_last: Optional[float] = None
    """Mean training reward over the last logged steps (up to 10)."""
    eval_reward: Optional[float] = None
    """The last periodic evaluation's mean reward on held-out queries, if any ran."""


def is_hub_id(name: str) -> bool:
    """True when ``name`` reads as a hub repo id (``org/name`` or ``name``) and is not an existing local path."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not name or Path(name).expanduser().exists() or name.startswith(("~", ".")):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def download_saved_policy(repo_id: str, *, revision: Optional[str] = None, token: Union[str, bool, None] = None,
                          cache_dir: Union[str, Path, None] = None, local_files_only: bool = False) -> Optional[str]:
    """The local snapshot of the saved policy ``repo_id`` at ``revision`` (the hub cache's folder), or None when
    that repo holds no ``policy_config.json`` or cannot be reached: a base model, left to transformers to load.

    Only the weights-free and safetensors files are fetched (configs, tokenizer, chat template, adapter, card); a
    policy repo that bundles its base model in a subfolder brings it along, pickled files never.
    """
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

    download = dict(revision=revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only)
    try:
        hf_hub_download(repo_id, POLICY_CONFIG_NAME, **download)
    except (EntryNotFoundError, RepositoryNotFoundError):  # not a policy repo, unknown, gated or offline
        return None
    return snapshot_download(repo_id, allow_patterns=list(POLICY_FILE_PATTERNS),
                             ignore_patterns=f"{HUB_CHECKPOINT_FOLDER}/*", **download)


def _number(value: Optional[float]) -> str:
    return "not logged" if value is None else f"{value:.4f}"


def policy_model_card(config: PolicyConfig, *, has_adapter: bool, repo_id: Optional[str] = None,
                      training: Optional[TrainingSummary] = None) -> str:
    """The ``README.md`` of a saved policy: hub metadata (base model, library, tags), how to use it with
    :class:`~promptloop.pipeline.PromptLoopPipeline` and the CLI, its settings, and ``training`` if given.

    ``repo_id`` (where the folder is pushed) names the policy in the usage snippets; a local base model is named in
    the text but not in the metadata (the hub resolves ``base_model`` as a repo id).
    """
    from huggingface_hub import ModelCardData

    base = config.model_name_or_path
    metadata = ModelCardData(
        base_model=base if is_hub_id(base) else None, library_name="peft" if has_adapter else "transformers",
        tags=CARD_TAGS + (["lora"] if has_adapter else []), pipeline_tag="image-text-to-text",
    )
    name = repo_id or "PATH_TO_THIS_FOLDER"
    backbone = training.backbone if training and is_hub_id(training.backbone) else "YOUR/DIFFUSERS-PIPELINE"
    refinements = training.num_refinements if training else 5
    first = training is not None and training.initial_rewrite  # trained to write the step-0 prompt too
    what = f"a LoRA adapter on `{base}`" if has_adapter else f"the chat model `{base}` (no adapter)"
    mode = {"closed": "rewrites the prompt at a few denoising steps, each time looking at the current denoised (x0) "
                      "estimate of the image",
            "apriori": "writes the prompts of all refinement steps up front, before sampling",
            "oneshot": "rewrites the prompt once before sampling"}[config.mode]
    lines = [
        "---", metadata.to_yaml(), "---", "",
        f"# {repo_id.split('/')[-1] if repo_id else 'PromptLoop policy'}", "",
        f"A [PromptLoop](https://arxiv.org/abs/2510.00430) prompt-refinement policy: {what}. It {mode}, for a frozen "
        "text-to-image diffusion model (Stable Diffusion 1.x/2.x, SDXL, SD3, FLUX), whose weights stay untouched.",
        "",
        "## Use", "",
        "```python",
        "import torch",
        "from diffusers import DiffusionPipeline",
        "from promptloop.pipeline import PromptLoopPipeline",
        "",
        f'pipe = DiffusionPipeline.from_pretrained("{backbone}", dtype=torch.bfloat16).to("cuda")',
        f'loop = PromptLoopPipeline.from_pretrained("{name}", pipe, device="cuda")',
        f'out = loop("a cat wearing a tiny hat", num_refinements={refinements}, mode="{config.mode}", '
        f'{"initial_rewrite=True, " if first else ""}seed=0)',
        "out.images[0].save(\"cat.png\")",
        "print(out.trajectories[0].prompts)  # the prompt in force after each refinement",
        "```", "",
        *(["Left unset, the number of refinements and the initial rewrite take the values it was trained with "
           "(`loop_config.json`).", ""] if training is not None else []),
        "Command line (`pip install promptloop`):", "",
        "```bash",
        f'promptloop sample --policy {name} --backbone {backbone} --prompt "a cat wearing a tiny hat" '
        f"--refinements {refinements} --mode {config.mode}{' --initial-rewrite' if first else ''} --out samples/",
        "```", "",
        "## Policy settings", "",
        "| setting | value |", "|---|---|",
        f"| base model | `{base}`{f' at revision `{config.model_revision}`' if config.model_revision else ''} |",
        f"| mode | {config.mode} |",
        f"| sampling | {f'temperature {config.temperature}, top-p {config.top_p}' if config.do_sample else 'greedy'} |",
        f"| max new tokens | {config.max_new_tokens} |",
    ]
    if has_adapter:
        lines.append(f"| LoRA | r = {config.lora_r}, alpha = {config.lora_alpha}, "
                     f"targets `{config.lora_target_modules}` |")
    lines.append("")
    if training is not None:
        t = training
        lines += [
            "## Training", "",
            "GRPO with promptloop against a terminal image reward scored against the original query; the diffusion "
            "model stayed frozen.", "",
            "| setting | value |", "|---|---|",
            f"| backbone | `{t.backbone}` |",
            f"| reward | `{t.reward}` |",
            f"| refinements per trajectory (N_R) | {t.num_refinements}"
            f"{' plus an initial rewrite before sampling' if t.initial_rewrite else ''} |",
            f"| x0 preview shown to the policy | {'yes' if t.feedback else 'no (feedback ablation)'} |",
            f"| group size G x prompts per step | {t.group_size} x {t.prompts_per_step} |",
            f"| steps | {t.steps} |",
            f"| learning rate, KL beta, seed | {t.learning_rate:g}, {t.beta:g}, {t.seed} |",
            "",
            "| training reward, first steps | training reward, last steps | held-out evaluation reward |",
            "|---|---|---|",
            f"| {_number(t.reward_first)} | {_number(t.reward_last)} | {_number(t.eval_reward)} |",
            "",
            "The rewards are means over up to 10 logged steps (sampled with the policy's temperature); they measure "
            "the training reward only. Check image quality and fidelity to the query before trusting a gain.", "",
        ]
    lines += [f"Made with promptloop {__version__}.", "", "## Citation", "", "```bibtex", _CITATION, "```", ""]
    return "\n".join(lines)


def check_hub_token(token: Optional[str] = None) -> None:
    """Raise a clear error, before any model loads, when no hub token is available for an upload."""
    from huggingface_hub import get_token

    if token is None and get_token() is None:
        raise ValueError("Pushing to the hub needs a token and none is set: run `hf auth login` or set HF_TOKEN "
                         "(a token with write access), or turn the push off (logging.push_to_hub false).")


def push_policy_folder(folder: Union[str, Path], repo_id: str, *, private: Optional[bool] = None,
                       token: Optional[str] = None, revision: Optional[str] = None,
                       commit_message: str = "Upload PromptLoop policy", create_pr: bool = False):
    """Create the model repo ``repo_id`` if missing and upload ``folder`` (a saved policy) as one commit.

    Returns huggingface_hub's ``CommitInfo`` (its ``commit_url`` links the commit). ``token`` defaults to the logged-in
    one (``hf auth login`` or ``HF_TOKEN``).
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not (folder / POLICY_CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{folder} holds no {POLICY_CONFIG_NAME}: push a folder written by "
                                "PromptPolicy.save_pretrained (or a training run's <output_dir>/policy).")
    base = PolicyConfig.load(folder / POLICY_CONFIG_NAME).model_name_or_path
    if not is_hub_id(base):
        warnings.warn(f"The policy's base model {base!r} is a local path, so {repo_id!r} loads only where that path "
                      "exists; elsewhere pass base_model_name_or_path='<hub id>' to PromptPolicy.from_pretrained "
                      "(or train from a hub id).", UserWarning, stacklevel=2)
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message, revision=revision,
                             create_pr=create_pr)
