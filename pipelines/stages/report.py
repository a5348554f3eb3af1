"""The report stage: one Markdown page per run (`<run folder>/report.md`) with the evaluation
beside the paper's number for the task, the training summary, and the plots.

It reads only files the earlier stages wrote (the run's metrics.json, the evaluation's
folder), so it can be rebuilt at any time; it is also logged to the run's MLflow run.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from orchestration.folder import EvalFolder, RunFolder
from orchestration.plots import LATENT_ZONES_PNG, LOSS_CURVES_PNG, SAMPLES_PNG

# The paper's LZN results (../shared/paper-notes.md, "Headline results"), as metrics.json keys.
PAPER = {
    "gen_cifar10": {"eval/fid": 2.59, "eval/reconstruction_l2": 0.41},
    "gen_afhq_cat": {"eval/fid": 5.68},
    "gen_celebahq": {"eval/fid": 7.17},
    "gen_lsun_bedroom": {"eval/fid": 5.95},
    "repr_imagenet": {"eval/linear_probe_top1": 0.695, "eval/linear_probe_top5": 0.893},
    "joint_cifar10": {"eval/classification_accuracy": 0.9447},
}
PLOTS = {SAMPLES_PNG: "Samples", LATENT_ZONES_PNG: "Latent zones", LOSS_CURVES_PNG: "Training losses"}


def _value(v) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def _table(rows: list[tuple], header: tuple) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return out + ["| " + " | ".join(_value(c) for c in row) + " |" for row in rows]


def write_report(task: str, run_dir: Path, eval_dir: Path, *, title: str | None = None) -> Path:
    """Write <run_dir>/report.md from the run's metrics.json and the evaluation in `eval_dir`."""
    run_dir, evaluated = Path(run_dir), EvalFolder(eval_dir)
    folder = RunFolder(run_dir)
    evaluation = evaluated.read_metrics()
    summary = folder.read_metrics() or {}
    settings = json.loads(evaluated.settings.read_text()) if evaluated.settings.is_file() else {}
    paper = PAPER.get(task, {})
    lines = [f"# {title or task}: {run_dir.name}", "",
             f"Run folder `{run_dir}`; checkpoint `{settings.get('checkpoint', '?')}` "
             f"(step {int(evaluation.get('eval/checkpoint_step', 0))})."]
    run = folder.mlflow_run_record()
    if run is not None:
        lines.append(f"MLflow run `{run['run_id']}` on {run.get('uri', '?')}.")
    lines += ["", "## Evaluation", ""]
    rows = [(k, v, _value(paper[k]) if k in paper else "") for k, v in sorted(evaluation.items())]
    lines += _table(rows, ("metric", "this run", "paper (LZN)"))
    if settings:
        shown = {k: v for k, v in settings.items() if k in ("metrics", "eval.sampler", "eval.sampler_steps",
                                                             "eval.fid_samples", "eval.fid_features",
                                                             "eval.batch_size", "eval.alpha", "eval.seed")}
        lines += ["", "Settings: " + ", ".join(f"{k}={v}" for k, v in shown.items()) + "."]
    train = sorted((k, v) for k, v in summary.items() if k.startswith("train/"))
    if train:
        lines += ["", "## Training", ""] + _table(train, ("metric", "value"))
    plots = [(label, p) for name, label in PLOTS.items()
             for p in [evaluated.plots / name, folder.artifacts / name] if p.is_file()]
    seen, figures = set(), []
    for label, path in plots:
        if label not in seen:
            seen.add(label)
            figures += [f"### {label}", "", f"![{label}]({os.path.relpath(path, run_dir)})", ""]
    if figures:
        lines += ["", "## Plots", ""] + figures
    out = folder.report
    out.write_text("\n".join(lines).rstrip() + "\n")
    return out
