"""`python -m dashboards.report [--experiment NAME] [--sweep NAME] [--out FILE]` (and
`make report [EXPERIMENT=...]`): one self-contained HTML page about a sweep, built from the
MLflow store alone.

Sections: the leaderboard (linked to the MLflow run pages), a parallel-coordinates plot of
the swept hyperparameters against the sweep's metric, the training curves of the top trials,
the best trial's sample grid and latent-zone plot, and, for generation tasks, RF next to
RF + LZN: the sweep's best trial beside the RF baseline the sweep trained at its values and
budget (tag `lzn.sweep.baseline` = the parent run), else the best finished run of each
objective in the experiment, when both exist.

Everything comes from MLflow, so the report can be built on any machine that reaches the
server: the sweep's parent run (tag `lzn.sweep`) gives the metric, its mode and the search
space (its params `sweep.*`) and the leaderboard (its `leaderboard.csv`; while a sweep still
runs, the child runs' own metrics); the child runs give the curves and the plots. Plots are
plotly figures, with plotly.js and every image inlined, so the file opens offline, without
a server. The default experiment is the one of the latest sweep; the default file is
`<output_dir>/reports/<experiment>-<sweep>.html`.
"""
from __future__ import annotations

import argparse
import base64
import csv
import datetime as dt
import html
import io
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from orchestration.ray.leaderboard import LEADERBOARD_RUN_ID

SWEEP_TAG = "lzn.sweep"
STATUS_TAG = "lzn.sweep.status"
TOP_TRIALS = 5  # training curves drawn
PLOTS = ("samples.png", "latent_zones.png")  # the best trial's images, as the training run logs them
GENERATION_OBJECTIVES = {"rf": "RF", "generation": "RF + LZN"}
BASELINE_TAG = "lzn.sweep.baseline"  # on a sweep's RF baseline run: the sweep's parent run id
GENERATION_METRIC = "eval/fid"
FID_SAMPLES = "eval/fid_samples"


class ReportError(ValueError):
    """The store has nothing to report on: names what was looked for and what exists."""


@dataclass
class Trial:
    trial: str
    status: str  # finished, stopped early, error, running, interrupted
    value: Optional[float]
    steps: int
    params: dict[str, str]
    run_id: Optional[str]


@dataclass
class Sweep:
    experiment_id: str
    experiment: str
    name: str
    parent_run_id: str
    metric: str
    mode: str
    space: dict[str, str]  # swept key -> kind (choice, uniform, loguniform, grid, randint)
    trials: list[Trial] = field(default_factory=list)

    @property
    def best(self) -> Optional[Trial]:
        return next((t for t in self.trials if t.status == "finished" and _finite(t.value)), None)


def _finite(value) -> bool:
    return value is not None and math.isfinite(value)


def _float(text) -> Optional[float]:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


# ------------------------------------------------------------------------------ reading MLflow


def sweep_parents(client, experiment_ids: list[str], sweep: str | None = None) -> list:
    """Sweep parent runs, newest first: tagged `lzn.sweep` like their trials, but no trial's
    child (MLflow's search cannot ask for a missing tag, so trials are dropped here)."""
    if not experiment_ids:
        return []
    query = f"tags.`{SWEEP_TAG}` = '{sweep}'" if sweep else f"tags.`{SWEEP_TAG}` LIKE '%'"
    runs = client.search_runs(experiment_ids, query, order_by=["attributes.start_time DESC"], max_results=5000)
    return [r for r in runs if "mlflow.parentRunId" not in r.data.tags]


def latest_sweep_experiment(client) -> str:
    """The experiment of the most recently started sweep."""
    experiments = client.search_experiments()
    runs = sweep_parents(client, [e.experiment_id for e in experiments])
    if not runs:
        names = sorted(e.name for e in experiments)
        raise ReportError(f"no sweep in the MLflow store (experiments: {names or 'none'}): run `make sweep` first, "
                          "or pass EXPERIMENT=<name>")
    return client.get_experiment(runs[0].info.experiment_id).name


def _experiment(client, name: str):
    exp = client.get_experiment_by_name(name)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ReportError(f"no experiment {name!r} in the MLflow store; it has: {names or 'none'}")
    return exp


def load_sweep(client, experiment: str, sweep: str | None = None) -> Optional[Sweep]:
    """The latest sweep of `experiment` (or the one named), its trials in leaderboard order;
    None when the experiment holds no sweep."""
    exp = _experiment(client, experiment)
    parents = sweep_parents(client, [exp.experiment_id], sweep)
    if not parents:
        if sweep:
            names = sorted({r.data.tags[SWEEP_TAG] for r in sweep_parents(client, [exp.experiment_id])})
            raise ReportError(f"no sweep {sweep!r} in experiment {experiment!r}; its sweeps: {names or 'none'}")
        return None
    parent = parents[0]
    params = parent.data.params
    space = {k[len("sweep.space."):-len(".kind")]: v for k, v in params.items()
             if k.startswith("sweep.space.") and k.endswith(".kind")}
    out = Sweep(exp.experiment_id, exp.name, parent.data.tags[SWEEP_TAG], parent.info.run_id,
                params.get("sweep.metric", GENERATION_METRIC), params.get("sweep.mode", "min"), space)
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    out.trials = _leaderboard_csv(client, out, children) or _from_children(out, children)
    return out


def _leaderboard_csv(client, sweep: Sweep, children) -> list[Trial]:
    """The leaderboard the sweep wrote at its end (every trial, stopped ones with their last
    checkpoint's value), with each trial's params from its MLflow run."""
    data = artifact_bytes(client, sweep.parent_run_id, "leaderboard.csv")  # None while the sweep runs
    if not data:
        return []
    text = data.decode()
    runs = {c.info.run_id: c for c in children}
    trials = []
    for row in csv.DictReader(io.StringIO(text)):
        run = runs.get(row.get(LEADERBOARD_RUN_ID) or "")
        params = {k: (run.data.params.get(k) if run else row.get(k)) for k in sweep.space}
        trials.append(Trial(row["trial"], row["status"], _float(row.get(sweep.metric)), int(row.get("steps") or 0),
                            {k: v for k, v in params.items() if v is not None}, row.get(LEADERBOARD_RUN_ID) or None))
    return trials


def _from_children(sweep: Sweep, children) -> list[Trial]:
    """A sweep without its final leaderboard: each child run's own status and metric."""
    rank = {"finished": 0, "running": 1, "stopped early": 2, "interrupted": 3, "error": 4}
    sign = 1 if sweep.mode == "min" else -1
    trials = []
    for c in children:
        status = c.data.tags.get(STATUS_TAG) or {"FINISHED": "finished", "RUNNING": "running",
                                                 "FAILED": "error"}.get(c.info.status, "interrupted")
        value = c.data.metrics.get(sweep.metric)
        steps = max((m.step for m in c.data.to_proto().metrics if not m.key.startswith("system/")), default=0)
        trials.append(Trial(c.data.tags.get("lzn.trial", c.info.run_name or c.info.run_id), status, value, steps,
                            {k: c.data.params[k] for k in sweep.space if k in c.data.params}, c.info.run_id))
    return sorted(trials, key=lambda t: (rank.get(t.status, 5), sign * t.value if _finite(t.value) else math.inf))


def curves(client, run_id: str, keys=("loss",)) -> dict[str, tuple[list[int], list[float]]]:
    out = {}
    for key in keys:
        history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        if history:
            out[key] = ([m.step for m in history], [m.value for m in history])
    return out


def artifact_bytes(client, run_id: str, path: str) -> Optional[bytes]:
    """A run's artifact, or None when it was not logged."""
    import tempfile

    try:
        with tempfile.TemporaryDirectory(prefix="lzn-report-") as tmp:
            return Path(client.download_artifacts(run_id, path, tmp)).read_bytes()
    except Exception:
        return None


def image_data_uri(client, run_id: str, name: str, folder: str = "plots") -> Optional[str]:
    """A PNG artifact of a run as a data: URI (inlined, so the report needs no server); None
    when not logged (a stopped trial; streamed data has no zone plot)."""
    data = artifact_bytes(client, run_id, f"{folder}/{name}")
    return None if data is None else "data:image/png;base64," + base64.b64encode(data).decode()


@dataclass
class Baseline:
    label: str
    run_id: str
    run_name: str
    metrics: dict[str, float]
    samples: Optional[str]


def generation_pair(client, experiment_id: str) -> dict[str, Optional[Baseline]] | None:
    """The best finished run (by FID) of RF and of RF + LZN in the experiment; None when the
    experiment is not a generation task."""
    runs = client.search_runs([experiment_id], "attributes.status = 'FINISHED'", max_results=5000)
    objectives = {r.data.params.get("objective") for r in runs}
    if not objectives & set(GENERATION_OBJECTIVES):
        return None
    pair: dict[str, Optional[Baseline]] = {}
    for objective, label in GENERATION_OBJECTIVES.items():
        scored = [r for r in runs if r.data.params.get("objective") == objective
                  and _finite(r.data.metrics.get(GENERATION_METRIC))]
        if not scored:
            pair[label] = None
            continue
        pair[label] = _baseline(client, label, min(scored, key=lambda r: r.data.metrics[GENERATION_METRIC]))
    return pair


def _baseline(client, label: str, run) -> Baseline:
    metrics = {k: v for k, v in run.data.metrics.items() if k.startswith("eval/")}
    return Baseline(label, run.info.run_id, run.info.run_name or run.info.run_id, metrics,
                    image_data_uri(client, run.info.run_id, "samples.png"))


def sweep_pair(client, sweep: Optional[Sweep]) -> dict[str, Optional[Baseline]] | None:
    """RF + LZN: the sweep's best trial; RF: the baseline the sweep trained at that trial's
    values and budget. None when the sweep has no finished baseline with an FID."""
    if sweep is None or sweep.best is None or not sweep.best.run_id:
        return None
    runs = client.search_runs([sweep.experiment_id], f"tags.`{BASELINE_TAG}` = '{sweep.parent_run_id}' "
                              "and attributes.status = 'FINISHED'")
    scored = [r for r in runs if _finite(r.data.metrics.get(GENERATION_METRIC))]
    if not scored:
        return None
    return {"RF": _baseline(client, "RF", scored[0]),
            "RF + LZN": _baseline(client, "RF + LZN", client.get_run(sweep.best.run_id))}


# ------------------------------------------------------------------------------ figures


def _axis(key: str, kind: str, values: list[str]) -> dict:
    """One parallel-coordinates dimension: log10 for log-uniform keys, indices for choices."""
    numbers = [_float(v) for v in values]
    if kind in ("choice", "grid") or any(n is None for n in numbers):
        levels = sorted(set(values), key=lambda v: (_float(v) is None, _float(v) or 0.0, v))
        return dict(label=key, values=[levels.index(v) for v in values], tickvals=list(range(len(levels))),
                    ticktext=levels, range=[-0.5, len(levels) - 0.5])
    if kind == "loguniform" and all(n > 0 for n in numbers):
        logs = [math.log10(n) for n in numbers]
        lo, hi = math.floor(min(logs)), math.ceil(max(logs))
        ticks = list(range(lo, hi + 1)) if hi > lo else [lo]
        return dict(label=f"{key} (log)", values=logs, tickvals=ticks, ticktext=[f"1e{t}" for t in ticks])
    return dict(label=key, values=numbers)


def parallel_coordinates(sweep: Sweep):
    """Swept hyperparameters against the metric, one line per trial with a value; colour is
    the metric, best bright."""
    import plotly.graph_objects as go

    trials = [t for t in sweep.trials if _finite(t.value) and all(k in t.params for k in sweep.space)]
    if not trials:
        return None
    dims = [_axis(k, kind, [t.params[k] for t in trials]) for k, kind in sweep.space.items()]
    values = [t.value for t in trials]
    dims.append(dict(label=sweep.metric, values=values))
    line = dict(color=values, colorscale="Viridis", reversescale=sweep.mode == "min", showscale=True,
                colorbar=dict(title=dict(text=sweep.metric)))
    fig = go.Figure(go.Parcoords(line=line, dimensions=dims))
    fig.update_layout(height=420, margin=dict(l=80, r=80, t=60, b=30))
    return fig


def curves_figure(named_curves: dict[str, dict[str, tuple[list[int], list[float]]]], key: str = "loss"):
    import plotly.graph_objects as go

    fig = go.Figure()
    for name, series in named_curves.items():
        if key in series:
            steps, values = series[key]
            fig.add_trace(go.Scatter(x=steps, y=values, mode="lines+markers", name=name))
    if not fig.data:
        return None
    fig.update_layout(height=380, xaxis_title="step", yaxis_title=key, margin=dict(l=60, r=20, t=30, b=50),
                      legend=dict(orientation="h"))
    return fig


# ------------------------------------------------------------------------------ HTML


CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1200px;
       color: #1d232a; padding: 0 1rem; }
h1 { margin-bottom: .2rem; } .meta { color: #5c6670; margin-top: 0; }
section { margin: 2rem 0; } h2 { border-bottom: 1px solid #d6dbe0; padding-bottom: .3rem; }
table { border-collapse: collapse; font-size: .9rem; } th, td { padding: .3rem .6rem; text-align: right; }
th { background: #eef1f4; } tr:nth-child(even) td { background: #f7f9fa; } td.left, th.left { text-align: left; }
tr.best td { font-weight: 600; } .note { color: #5c6670; font-style: italic; }
.images { display: flex; flex-wrap: wrap; gap: 1.5rem; } figure { margin: 0; }
figure img { max-width: 540px; image-rendering: pixelated; border: 1px solid #d6dbe0; }
figcaption { color: #5c6670; font-size: .9rem; }
"""


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    number = _float(value)
    return f"{number:.4g}" if number is not None and not str(value).lstrip("-").isdigit() else html.escape(str(value))


def _section(section_id: str, title: str, body: str) -> str:
    return f'<section id="{section_id}"><h2>{html.escape(title)}</h2>\n{body}\n</section>'


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _figure_html(fig, div_id: str) -> str:
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id,
                       config={"displaylogo": False, "responsive": True})


def _link(uri: str, sweep: Sweep, run_id: Optional[str], text: str) -> str:
    from dashboards.ui import run_url

    if not run_id:
        return html.escape(text)
    return f'<a href="{html.escape(run_url(uri, sweep.experiment_id, run_id))}">{html.escape(text)}</a>'


def leaderboard_html(uri: str, sweep: Sweep) -> str:
    keys = list(sweep.space)
    head = ["rank", "trial", "status", sweep.metric, "steps", *keys]
    rows = [f"<tr>{''.join(f'<th>{html.escape(h)}</th>' for h in head)}</tr>"]
    best = sweep.best
    for i, t in enumerate(sweep.trials, 1):
        cells = [str(i), _link(uri, sweep, t.run_id, t.trial), html.escape(t.status), _fmt(t.value), str(t.steps),
                 *[_fmt(t.params.get(k)) for k in keys]]
        css = ' class="best"' if t is best else ""
        rows.append(f"<tr{css}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f'<table id="leaderboard-table">{"".join(rows)}</table>'


def _img(uri: Optional[str], caption: str, img_id: str) -> str:
    if uri is None:
        return f"<figure>{_note(caption + ': not logged')}</figure>"
    return f'<figure><img id="{img_id}" src="{uri}" alt="{html.escape(caption)}"><figcaption>{html.escape(caption)}' \
           "</figcaption></figure>"


def render(client, uri: str, experiment_id: str, experiment: str, sweep: Optional[Sweep],
           pair: dict[str, Optional[Baseline]] | None) -> str:
    """The report's HTML."""
    import plotly.offline

    sections = []
    if sweep is None:
        sections.append(_section("leaderboard", "Leaderboard", _note(
            f"experiment {experiment!r} holds no sweep: `make sweep TASK={experiment}` makes one")))
    else:
        best = sweep.best
        sections.append(_section("leaderboard", f"Leaderboard: {sweep.metric} ({sweep.mode})",
                                 leaderboard_html(uri, sweep)))
        fig = parallel_coordinates(sweep)
        sections.append(_section("parallel-coordinates", "Hyperparameters against the metric",
                                 _figure_html(fig, "parallel-coordinates-plot") if fig is not None
                                 else _note("no trial has a value of the metric yet")))
        top = [t for t in sweep.trials if t.run_id][:TOP_TRIALS]
        fig = curves_figure({t.trial: curves(client, t.run_id) for t in top})
        sections.append(_section("training-curves", f"Training loss of the top {len(top)} trials",
                                 _figure_html(fig, "training-curves-plot") if fig is not None
                                 else _note("no training curves logged yet")))
        if best is None:
            body = _note("no trial has finished")
        else:
            head = (f"<p>Trial {_link(uri, sweep, best.run_id, best.trial)}: {html.escape(sweep.metric)} = "
                    f"{_fmt(best.value)}, " + ", ".join(f"{html.escape(k)} = {_fmt(v)}" for k, v in best.params.items())
                    + "</p>")
            images = [_img(image_data_uri(client, best.run_id, name) if best.run_id else None,
                           name.removesuffix(".png").replace("_", " "), f"best-{name.removesuffix('.png')}")
                      for name in PLOTS]
            body = head + f'<div class="images">{"".join(images)}</div>'
        sections.append(_section("best-trial", "Best trial", body))
    if pair is not None:
        sections.append(_section("rf-vs-lzn", "RF against RF + LZN", _pair_html(uri, experiment_id, pair,
                                                                              experiment)))
    title = f"{experiment}: sweep {sweep.name!r}" if sweep else experiment
    generated = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    meta = f"MLflow {html.escape(uri)}, experiment {html.escape(experiment)}" + (
        f", parent run {html.escape(sweep.parent_run_id)}, {len(sweep.trials)} trials" if sweep else "") + \
        f". Generated {generated}."
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{CSS}</style>"
            f"<script>{plotly.offline.get_plotlyjs()}</script></head>\n<body>"
            f"<h1>{html.escape(title)}</h1><p class=\"meta\">{meta}</p>\n" + "\n".join(sections) + "\n</body></html>\n")


def _pair_html(uri: str, experiment_id: str, pair: dict[str, Optional[Baseline]], experiment: str) -> str:
    from dashboards.ui import run_url

    missing = [label for label, b in pair.items() if b is None]
    if missing:
        hint = {"RF": "objective=rf ~optim.lr.encoder", "RF + LZN": "objective=generation"}  # RF has no encoder
        return _note(f"no finished {' or '.join(missing)} run with {GENERATION_METRIC} in {experiment!r}: train one "
                     f"with `make train TASK={experiment} ARGS='{' '.join(hint[m] for m in missing)}'` to compare")
    keys = sorted(set.intersection(*(set(b.metrics) for b in pair.values())))  # what both runs measured
    rows = ["<tr><th class=\"left\">metric</th>" + "".join(f"<th>{html.escape(b.label)}</th>" for b in pair.values())
            + "</tr>"]
    for k in keys:
        rows.append(f"<tr><td class=\"left\">{html.escape(k)}</td>"
                    + "".join(f"<td>{_fmt(b.metrics.get(k))}</td>" for b in pair.values()) + "</tr>")
    images = []
    for b in pair.values():
        slug = "rf" if b.label == "RF" else "lzn"
        link = f'<a href="{html.escape(run_url(uri, experiment_id, b.run_id))}">{html.escape(b.run_name)}</a>'
        images.append(f"<div><h3>{html.escape(b.label)}: {link}</h3>"
                      + _img(b.samples, f"{b.label} samples", f"samples-{slug}") + "</div>")
    counts = {b.metrics.get(FID_SAMPLES) for b in pair.values()}
    caveat = "" if len(counts) == 1 else _note(
        "the two FIDs come from different sample counts (" + " vs ".join(
            f"{b.label}: {_fmt(b.metrics.get(FID_SAMPLES))}" for b in pair.values())
        + "), and FID depends on the count: evaluate both alike (`make eval ... ARGS='eval.fid_samples=N'`) to compare")
    return (f'<table id="rf-vs-lzn-table">{"".join(rows)}</table>{caveat}'
            f'<div class="images">{"".join(images)}</div>')


def build_report(uri: str, experiment: str | None = None, sweep: str | None = None,
                 out: str | Path | None = None, output_dir: str | Path = "outputs") -> Path:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = experiment or latest_sweep_experiment(client)
    data = load_sweep(client, experiment, sweep)
    experiment_id = _experiment(client, experiment).experiment_id
    pair = sweep_pair(client, data) or generation_pair(client, experiment_id)
    if data is None and pair is None:
        raise ReportError(f"experiment {experiment!r} holds no sweep and no RF/RF + LZN runs to compare: "
                          f"`make sweep TASK=<task>` makes a sweep")
    page = render(client, uri, experiment_id, experiment, data, pair)
    name = f"{experiment}-{data.name}.html" if data else f"{experiment}.html"
    path = Path(out) if out else Path(output_dir) / "reports" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> int:
    from dashboards.ui import check_reachable, store_uri

    parser = argparse.ArgumentParser(prog="python -m dashboards.report", description=__doc__.split("\n")[0])
    parser.add_argument("--experiment", default=None, help="MLflow experiment (default: the latest sweep's)")
    parser.add_argument("--sweep", default=None, help="sweep name within it (default: its latest)")
    parser.add_argument("--out", default=None, help="HTML file (default: <output-dir>/reports/<experiment>-<sweep>.html)")
    parser.add_argument("--output-dir", default="outputs", help="the project's outputs (local MLflow store)")
    args = parser.parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = store_uri(args.output_dir)
    check_reachable(uri)
    try:
        path = build_report(uri, args.experiment or None, args.sweep, args.out, args.output_dir)
    except ReportError as e:  # bad input (no such experiment or sweep): exit 2, as the pipelines' commands
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"report: {path.resolve()} ({path.stat().st_size / 1e6:.1f} MB, opens offline in any browser)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
