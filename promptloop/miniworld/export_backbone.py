"""Ship a trained mini-world backbone: a compact copy of its pipeline folder, evaluated as shipped.

    python -m promptloop.miniworld.export_backbone RUN_DIR DEST [--captions 32] [--seeds 4] [--guidance 4]

Reads ``RUN_DIR/pipeline`` (written by ``train_backbone`` or ``train_flow_backbone``), writes ``DEST`` with the
diffusers models (UNet or transformer, VAE) in float16 (half the size) and the text encoders in float32, evaluates
the copy as loaded back, and writes ``DEST.eval.json`` / ``DEST.eval.md`` beside it (with
``RUN_DIR/checkpoint/state.json``'s progress, and the model it was continued from, as provenance).

The text encoders stay float32 because transformers loads a model in its saved dtype by default while diffusers
loads in float32: a float16 text encoder would make ``StableDiffusionPipeline.from_pretrained(DEST)`` (no dtype
given) mix dtypes and fail. With this split a plain load gives an all-float32 pipeline.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from diffusers import ModelMixin

from .evaluate_backbone import EvalSettings, evaluate_dir, format_table, load_pipeline


def export_pipeline(pipeline_dir: str | Path, dest: str | Path) -> Path:
    """Copy the pipeline in ``pipeline_dir`` to ``dest`` (replaced), its diffusers models (diffusers upcasts them to
    float32 on a plain load) in float16, its transformers text encoders in float32."""
    dest = Path(dest)
    pipe = load_pipeline(pipeline_dir)
    for component in pipe.components.values():
        if isinstance(component, ModelMixin):
            component.to(torch.float16)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def training_provenance(run_dir: Path) -> dict:
    """The run's progress from ``checkpoint/state.json`` ({} without one). A run started with ``--init-from`` also
    records that folder and, where an export's ``<folder>.eval.json`` lies beside it, that model's own training
    record (so a chain of continued runs stays traceable)."""
    state = run_dir / "checkpoint" / "state.json"
    if not state.is_file():
        return {}
    saved = json.loads(state.read_text())
    record = dict(saved["progress"])
    init_from = saved.get("config", {}).get("init_from")
    if init_from:
        record["init_from"] = init_from
        earlier = Path(init_from).with_name(Path(init_from).name + ".eval.json")
        if earlier.is_file() and "training" in (earlier_eval := json.loads(earlier.read_text())):
            record["init_from_training"] = earlier_eval["training"]
    return record


def export_run(run_dir: str | Path, dest: str | Path, settings: EvalSettings) -> dict:
    """Export ``run_dir/pipeline`` to ``dest``, evaluate the exported copy, write ``dest.eval.json`` and ``.md``."""
    run_dir, dest = Path(run_dir), Path(dest)
    export_pipeline(run_dir / "pipeline", dest)
    result = evaluate_dir(dest, settings)
    provenance = training_provenance(run_dir)
    if provenance:
        result["training"] = provenance
    json_path, md_path = dest.with_name(dest.name + ".eval.json"), dest.with_name(dest.name + ".eval.md")
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    md_path.write_text(format_table(result) + "\n")
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir",
                        help="a train_backbone or train_flow_backbone output folder (holds pipeline/ and checkpoint/)")
    parser.add_argument("dest", help="the pipeline folder to write, e.g. promptloop/miniworld/assets/backbone_b")
    parser.add_argument("--captions", type=int, default=32)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, nargs="+", default=[4.0])
    args = parser.parse_args(argv)
    settings = EvalSettings(captions=args.captions, seeds=args.seeds, steps=args.steps,
                            guidance_scales=args.guidance)
    return export_run(args.run_dir, args.dest, settings)


if __name__ == "__main__":
    main()
