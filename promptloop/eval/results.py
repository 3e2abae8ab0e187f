"""Evaluation results: per-image samples, their statistics, and the files they are written to.

``results.json`` (``SCHEMA_VERSION`` 1), all numbers finite or ``null``:

.. code-block:: text

    schema_version  int, 1
    created         ISO-8601 UTC time of writing
    config          the EvalConfig as a mapping (what ran)
    prompt_set      {source: str, num_prompts: int}
    seeds           [int]: every prompt is sampled once per seed, with the same noise for every method
    baseline        str | null: method label the paired differences are taken against
    confidence      float: level of every interval (e.g. 0.95)
    metrics         [str]: metric names, e.g. "reward/imagereward", "prompt_words", "drift", "seconds_per_image"
    backbones       [str]: backbone labels
    methods         [{label, method, kind, policy, num_refinements, adapter, feedback_delay, initial_rewrite,
                      policy_revision}]: the evaluated method variants
    samples         [{backbone, method, prompt_index, seed, query, final_prompt, prompts, decision_steps,
                      image, strip, metrics: {metric: float | null}}]: one per image; ``image`` / ``strip`` are
                      paths relative to the output folder (``strip`` null when none was saved); ``prompts`` the
                      prompts in force, in order (``final_prompt`` = ``prompts[-1]``)
    summary         [{backbone, method, metric, mean, ci_low, ci_high, std, n}]: mean over the finite values with
                      a cluster-robust Student-t interval over prompts (the independent units; with every seed
                      finite, the t-interval of the prompts' means, ``std`` theirs); ``n`` counts the prompts
    paired          [{backbone, method, baseline, metric, mean, ci_low, ci_high, std, n}]: the same for
                      ``method - baseline`` on the same backbone, prompt and seed

Metrics: ``reward/LABEL`` (scored against the ORIGINAL query), ``prompt_words`` (words of the final prompt),
``drift`` (1 - text-embedding cosine of query and final prompt), ``seconds_per_image`` (wall time of the batch,
policy calls included, divided by its size).
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from .stats import clustered_ci, paired_ci

SCHEMA_VERSION = 1
PROMPT_METRICS = ("prompt_words", "drift", "seconds_per_image")


@dataclass
class Sample:
    """One image: which backbone, method, prompt and seed made it, and its metrics."""

    backbone: str
    method: str
    prompt_index: int
    seed: int
    query: str
    final_prompt: str
    prompts: list[str]
    decision_steps: list[int]
    image: str
    strip: Optional[str]
    metrics: dict[str, Optional[float]]


@dataclass
class Statistic:
    """A mean (``baseline`` None) or a paired mean difference against ``baseline``, with its interval."""

    backbone: str
    method: str
    metric: str
    mean: Optional[float]
    ci_low: Optional[float]
    ci_high: Optional[float]
    std: Optional[float]
    n: int
    baseline: Optional[str] = None


@dataclass
class EvalResults:
    """Everything one ``promptloop eval`` run measured (see the module docstring for the JSON layout)."""

    config: dict[str, Any]
    prompt_set: dict[str, Any]
    seeds: list[int]
    baseline: Optional[str]
    confidence: float
    metrics: list[str]
    backbones: list[str]
    methods: list[dict[str, Any]]
    samples: list[Sample]
    summary: list[Statistic] = field(default_factory=list)
    paired: list[Statistic] = field(default_factory=list)

    def method_labels(self) -> list[str]:
        return [m["label"] for m in self.methods]

    def statistic(self, backbone: str, method: str, metric: str, paired: bool = False) -> Optional[Statistic]:
        rows = self.paired if paired else self.summary
        return next((s for s in rows if (s.backbone, s.method, s.metric) == (backbone, method, metric)), None)

    @classmethod
    def from_json_dict(cls, data: dict[str, Any]) -> "EvalResults":
        """Results read back from ``results.json`` (validated first), e.g. to re-render the report."""
        validate_results_json(data)
        return cls(
            config=data["config"], prompt_set=data["prompt_set"], seeds=data["seeds"], baseline=data["baseline"],
            confidence=data["confidence"], metrics=data["metrics"], backbones=data["backbones"],
            methods=data["methods"], samples=[Sample(**s) for s in data["samples"]],
            summary=[Statistic(**s) for s in data["summary"]], paired=[Statistic(**s) for s in data["paired"]],
        )

    def to_json_dict(self) -> dict[str, Any]:
        summary_keys = ("backbone", "method", "metric", "mean", "ci_low", "ci_high", "std", "n")
        return _finite({
            "schema_version": SCHEMA_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "config": self.config,
            "prompt_set": self.prompt_set,
            "seeds": self.seeds,
            "baseline": self.baseline,
            "confidence": self.confidence,
            "metrics": self.metrics,
            "backbones": self.backbones,
            "methods": self.methods,
            "samples": [asdict(s) for s in self.samples],
            "summary": [{k: getattr(s, k) for k in summary_keys} for s in self.summary],
            "paired": [asdict(s) for s in self.paired],
        })


def _finite(value: Any) -> Any:
    """NaN / inf -> None, recursively (strict JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def summarise(results: EvalResults) -> None:
    """Fill ``results.summary`` and ``results.paired`` from ``results.samples``."""
    by_cell: dict[tuple[str, str], dict[tuple[int, int], Sample]] = {}
    for s in results.samples:
        by_cell.setdefault((s.backbone, s.method), {})[(s.prompt_index, s.seed)] = s
    results.summary, results.paired = [], []
    for backbone in results.backbones:
        for method in results.method_labels():
            cell = by_cell.get((backbone, method), {})
            base = by_cell.get((backbone, results.baseline), {}) if results.baseline else {}
            for metric in results.metrics:
                values = {k: s.metrics.get(metric) for k, s in cell.items()}
                results.summary.append(_statistic(backbone, method, metric, clustered_ci(
                    values, results.confidence)))
                if results.baseline and method != results.baseline and base:
                    reference = {k: s.metrics.get(metric) for k, s in base.items()}
                    results.paired.append(_statistic(backbone, method, metric, paired_ci(
                        values, reference, results.confidence), baseline=results.baseline))


def _statistic(backbone, method, metric, interval, baseline=None) -> Statistic:
    return Statistic(backbone=backbone, method=method, metric=metric, mean=interval.mean, ci_low=interval.low,
                     ci_high=interval.high, std=interval.std, n=interval.n, baseline=baseline)


# ------------------------------------------------------------------------------------------------------ validation
_TOP_LEVEL = {"schema_version": int, "created": str, "config": dict, "prompt_set": dict, "seeds": list,
              "baseline": (str, type(None)), "confidence": float, "metrics": list, "backbones": list,
              "methods": list, "samples": list, "summary": list, "paired": list}
_SAMPLE_KEYS = {"backbone", "method", "prompt_index", "seed", "query", "final_prompt", "prompts", "decision_steps",
                "image", "strip", "metrics"}
_STAT_KEYS = {"backbone", "method", "metric", "mean", "ci_low", "ci_high", "std", "n"}
_METHOD_KEYS = {"label", "method", "kind", "policy", "num_refinements", "adapter", "feedback_delay",
                "initial_rewrite", "policy_revision"}
# results written before policy revisions, before initial rewrites, and before pipelined feedback, existed
_OLDER_METHOD_KEYS = tuple(_METHOD_KEYS - set(added) for added in (
    ["policy_revision"], ["policy_revision", "initial_rewrite"],
    ["policy_revision", "initial_rewrite", "feedback_delay"]))


def validate_results_json(data: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the first place where ``data`` departs from the documented schema."""
    if not isinstance(data, dict):
        raise ValueError(f"results must be a JSON object, got {type(data).__name__}")
    for key, kind in _TOP_LEVEL.items():
        if key not in data:
            raise ValueError(f"results: missing key {key!r}")
        if not isinstance(data[key], kind):
            raise ValueError(f"results.{key}: expected {kind}, got {type(data[key]).__name__}")
    if data["schema_version"] != SCHEMA_VERSION:
        raise ValueError(f"results.schema_version={data['schema_version']} (this code reads {SCHEMA_VERSION})")
    labels = []
    for i, method in enumerate(data["methods"]):
        if not (isinstance(method, dict) and set(method) in _OLDER_METHOD_KEYS):
            _keys(f"methods[{i}]", method, _METHOD_KEYS)
        labels.append(method["label"])
    metrics = set(data["metrics"])
    for i, sample in enumerate(data["samples"]):
        where = f"samples[{i}]"
        _keys(where, sample, _SAMPLE_KEYS)
        if sample["backbone"] not in data["backbones"] or sample["method"] not in labels:
            raise ValueError(f"{where}: unknown backbone {sample['backbone']!r} or method {sample['method']!r}")
        if set(sample["metrics"]) != metrics:
            raise ValueError(f"{where}.metrics: keys {sorted(sample['metrics'])} != metrics {sorted(metrics)}")
        _numbers(where + ".metrics", sample["metrics"].values())
        if sample["final_prompt"] != sample["prompts"][-1]:
            raise ValueError(f"{where}: final_prompt is not prompts[-1]")
    for section, extra in (("summary", set()), ("paired", {"baseline"})):
        for i, row in enumerate(data[section]):
            where = f"{section}[{i}]"
            _keys(where, row, _STAT_KEYS | extra)
            if row["metric"] not in metrics:
                raise ValueError(f"{where}: unknown metric {row['metric']!r}")
            _numbers(where, [row[k] for k in ("mean", "ci_low", "ci_high", "std")])
            if not isinstance(row["n"], int) or row["n"] < 0:
                raise ValueError(f"{where}.n must be an int >= 0")
            if row["mean"] is not None and row["ci_low"] is not None and not \
                    row["ci_low"] <= row["mean"] <= row["ci_high"]:
                raise ValueError(f"{where}: mean {row['mean']} outside [{row['ci_low']}, {row['ci_high']}]")


def _keys(where: str, value: Any, expected: set[str]) -> None:
    if not isinstance(value, dict) or set(value) != expected:
        found = sorted(value) if isinstance(value, dict) else type(value).__name__
        raise ValueError(f"{where}: expected keys {sorted(expected)}, got {found}")


def _numbers(where: str, values) -> None:
    for v in values:
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise ValueError(f"{where}: {v!r} is not a finite number or null")


# --------------------------------------------------------------------------------------------------------- writers
def _format(value: Optional[float]) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.4g}"


def _cell(stat: Optional[Statistic], signed: bool = False) -> str:
    if stat is None or stat.mean is None or not math.isfinite(stat.mean):
        return "n/a"
    mean = f"{stat.mean:+.4g}" if signed else _format(stat.mean)
    if stat.ci_low is None or not math.isfinite(stat.ci_low):
        return mean
    return f"{mean} ± {_format((stat.ci_high - stat.ci_low) / 2)}"


def table_rows(results: EvalResults, backbone: str, paired: bool = False) -> list[list[str]]:
    """Header + one row per method: ``mean ± half-width`` (paired: the difference to the baseline) per metric."""
    rows = [["method", *results.metrics]]
    for method in results.method_labels():
        if paired and method == results.baseline:
            continue
        rows.append([method, *(_cell(results.statistic(backbone, method, m, paired), signed=paired)
                               for m in results.metrics)])
    return rows


def markdown_table(results: EvalResults) -> str:
    """One table of means and one of paired differences per backbone (GitHub markdown)."""
    level = f"{results.confidence:.0%}"
    parts = [f"Prompt set `{results.prompt_set['source']}` ({results.prompt_set['num_prompts']} prompts) x seeds "
             f"{results.seeds}; mean ± half-width of the {level} t-interval over prompts (each prompt's seeds "
             "together: the prompts are the independent units)."]
    for backbone in results.backbones:
        parts.append(f"\n### {backbone}\n")
        parts.append(_markdown(table_rows(results, backbone)))
        if results.baseline and results.paired:
            parts.append(_paired_section(results, backbone))
    return "\n".join(parts) + "\n"


def _paired_section(results: EvalResults, backbone: str) -> str:
    level = f"{results.confidence:.0%}"
    return (f"\nPaired difference to `{results.baseline}` (same prompt and seed), {level} CI:\n\n"
            + _markdown(table_rows(results, backbone, paired=True)))


def paired_markdown(results: EvalResults, baseline: str) -> str:
    """Paired-difference tables of every other method against ``baseline`` (another method label than the one
    ``results`` was summarised against), one per backbone; ``results`` itself is not changed."""
    if baseline not in results.method_labels():
        raise ValueError(f"baseline={baseline!r} is not a method of these results ({results.method_labels()}).")
    other = replace(results, baseline=baseline)
    summarise(other)
    parts = [(f"\n### {backbone}\n" if len(other.backbones) > 1 else "") + _paired_section(other, backbone)
             for backbone in other.backbones]
    return "\n".join(parts) + "\n"


def _markdown(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows[1:]]
    return "\n".join(lines)


def write_results(results: EvalResults, out_dir: str | Path) -> dict[str, Path]:
    """Write results.json, samples.csv, summary.csv and results.md into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "samples_csv": out / "samples.csv", "summary_csv": out / "summary.csv",
             "markdown": out / "results.md"}
    data = results.to_json_dict()
    validate_results_json(data)
    paths["json"].write_text(json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False) + "\n",
                             encoding="utf-8")
    with paths["samples_csv"].open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["backbone", "method", "prompt_index", "seed", "query", "final_prompt", "image",
                         *results.metrics])
        for s in results.samples:
            writer.writerow([s.backbone, s.method, s.prompt_index, s.seed, s.query, s.final_prompt, s.image,
                             *("" if s.metrics.get(m) is None else s.metrics[m] for m in results.metrics)])
    with paths["summary_csv"].open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["statistic", "backbone", "method", "baseline", "metric", "mean", "ci_low", "ci_high",
                         "std", "n"])
        for kind, rows in (("mean", results.summary), ("paired_difference", results.paired)):
            for r in rows:
                writer.writerow([kind, r.backbone, r.method, r.baseline or "", r.metric,
                                 *("" if v is None or not math.isfinite(v) else v
                                   for v in (r.mean, r.ci_low, r.ci_high, r.std)), r.n])
    paths["markdown"].write_text(markdown_table(results), encoding="utf-8")
    return paths


__all__ = ["EvalResults", "PROMPT_METRICS", "SCHEMA_VERSION", "Sample", "Statistic", "markdown_table",
           "paired_markdown", "summarise", "table_rows", "validate_results_json", "write_results"]
