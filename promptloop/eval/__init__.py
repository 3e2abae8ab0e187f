"""Evaluation harness: methods x backbones x rewards on a prompt set with fixed seeds.

``run_evaluation(load_config(EvalConfig, "configs/eval_sd15.yaml"))`` (or ``promptloop eval CONFIG.yaml``) samples
every method on every backbone, scores every reward against the original query, measures prompt length, drift
from the query and wall time per image, and writes results.json (schema in :mod:`promptloop.eval.results`), CSV,
a markdown table and a static HTML report with image grids and trajectory strips.
"""
from .config import (
    BackboneEntry,
    EvalConfig,
    MethodEntry,
    MethodVariant,
    OutputSection,
    PolicySamplingSection,
    PromptSetSection,
    RewardEntry,
)
from .methods import adapter_state, sample_batch, withhold_preview
from .prompt_sets import PUBLIC_SETS, PromptSetUnavailableError, load_prompt_set, register_prompt_set
from .report import render_report, write_report
from .results import SCHEMA_VERSION, EvalResults, Sample, Statistic, validate_results_json, write_results
from .runner import run_evaluation
from .stats import Interval, mean_ci, paired_ci, t_quantile
from .text_similarity import BagOfWordsEmbedder, TextEmbedder, cosine_similarities, load_text_embedder

__all__ = [
    "BackboneEntry", "BagOfWordsEmbedder", "EvalConfig", "EvalResults", "Interval", "MethodEntry", "MethodVariant",
    "OutputSection", "PUBLIC_SETS", "PolicySamplingSection", "PromptSetSection", "PromptSetUnavailableError",
    "RewardEntry", "SCHEMA_VERSION", "Sample", "Statistic", "TextEmbedder", "adapter_state", "cosine_similarities",
    "load_prompt_set", "load_text_embedder", "mean_ci", "paired_ci", "register_prompt_set", "render_report",
    "run_evaluation", "sample_batch", "t_quantile", "validate_results_json", "withhold_preview", "write_report",
    "write_results",
]
