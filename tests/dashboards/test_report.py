"""`make report`: the sweep report built from a real MLflow server, opened from disk in a real
headless Chromium with the network cut off: every section and plot renders, no JavaScript
error, nothing fetched from anywhere."""
import io
import os
import subprocess
from pathlib import Path

import pytest

from tests.dashboards.store import TRIALS, make_sweep_store

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = ["leaderboard", "parallel-coordinates", "training-curves", "best-trial", "rf-vs-lzn"]


def colours(png: bytes) -> int:
    """Distinct colours of a screenshot: a blank or single-colour area has one or two."""
    from PIL import Image

    return len(Image.open(io.BytesIO(png)).convert("RGB").getcolors(maxcolors=1 << 20) or [])


@pytest.fixture(scope="module")
def store(mlflow_tracking_uri):
    return make_sweep_store(mlflow_tracking_uri)


def make_report(tmp_path, *args, experiment=None) -> subprocess.CompletedProcess:
    cmd = ["make", "-s", "-C", str(ROOT), "report", f"OUTPUT_DIR={tmp_path}", f"ARGS={' '.join(args)}"]
    if experiment:
        cmd.append(f"EXPERIMENT={experiment}")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=os.environ.copy())


def test_report_renders_every_section_offline(store, tmp_path, page):
    out = tmp_path / "report.html"
    done = make_report(tmp_path, f"--out {out}", experiment=store.experiment)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"report: {out}" in done.stdout
    pg = page.page
    pg.route("**/*", lambda route: route.continue_() if route.request.url.startswith(("file:", "data:", "blob:"))
             else route.abort())
    pg.goto(out.as_uri())
    pg.wait_for_selector("#parallel-coordinates-plot .main-svg", timeout=30_000)
    pg.wait_for_selector("#training-curves-plot .main-svg", timeout=30_000)
    assert [r for r in page.requests if not r.startswith(("file:", "data:", "blob:"))] == []
    assert page.errors == []
    for section in SECTIONS:
        shot = pg.locator(f"section#{section}").screenshot()
        assert colours(shot) > 8, f"section {section} renders blank"
    # The leaderboard: finished by FID, then the stopped trial, then the error; links to the runs.
    cells = pg.eval_on_selector_all("#leaderboard-table tr td:nth-child(2)", "tds => tds.map(t => t.innerText)")
    assert cells == ["t0", "t2", "t1", "t3"]
    href = pg.get_attribute("#leaderboard-table tr.best a", "href")
    assert href.startswith(store.uri) and store.runs["t0"] in href
    # Parallel coordinates: the two swept keys and the metric, one line per trial with a value.
    dims = pg.evaluate("() => document.getElementById('parallel-coordinates-plot').data[0].dimensions"
                       ".map(d => [d.label, d.values.length])")
    with_value = sum(fid is not None for *_, fid, _ in TRIALS)
    assert dims == [["optim.lr.encoder (log)", with_value], ["latent.dim", with_value], ["eval/fid", with_value]]
    # Curves of every trial with a run (4 <= the top 5), each with its own steps.
    traces = pg.evaluate("() => document.getElementById('training-curves-plot').data.map(t => [t.name, t.x.length])")
    assert sorted(map(tuple, traces)) == sorted((t, steps // 50) for t, _, _, _, _, steps in TRIALS)
    # The best trial's plots and both sides of RF vs RF + LZN are real, decoded images.
    for img in ["best-samples", "best-latent_zones", "samples-rf", "samples-lzn"]:
        assert pg.evaluate(f"() => document.getElementById('{img}').naturalWidth") > 0, img
    table = pg.inner_text("#rf-vs-lzn-table")
    assert "52" in table and "35.5" in table
    assert "different sample counts" not in pg.content()
    pg.screenshot(path=str(tmp_path / "report.png"), full_page=True)


def test_report_defaults_to_the_latest_sweep(store, tmp_path):
    later = make_sweep_store(store.uri, with_rf=False)
    done = make_report(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    path = tmp_path / "reports" / f"{later.experiment}-smoke.html"
    assert f"report: {path}" in done.stdout
    text = path.read_text()
    assert later.parent_run_id in text
    assert "no finished RF run with eval/fid" in text  # and how to train one
    assert f"make train TASK={later.experiment} ARGS=&#x27;objective=rf ~optim.lr.encoder&#x27;" in text


def test_report_of_a_running_sweep_reads_the_trial_runs(store):
    """Before the sweep writes leaderboard.csv, the trials come from their own runs."""
    from mlflow import MlflowClient

    from dashboards.report import load_sweep

    running = make_sweep_store(store.uri, with_rf=False, leaderboard_file=False)
    sweep = load_sweep(MlflowClient(store.uri), running.experiment)
    assert [t.trial for t in sweep.trials] == ["t0", "t2", "t1", "t3"]
    assert sweep.best.value == 35.5 and sweep.best.params == {"optim.lr.encoder": "0.0001", "latent.dim": "16"}


def test_report_errors_name_what_exists(store, tmp_path):
    done = make_report(tmp_path, experiment="no-such-experiment")
    assert done.returncode != 0
    assert "no experiment 'no-such-experiment'" in done.stderr and store.experiment in done.stderr
    done = make_report(tmp_path, "--sweep nope", experiment=store.experiment)
    assert done.returncode != 0 and "no sweep 'nope'" in done.stderr and "['smoke']" in done.stderr


def test_fids_from_different_sample_counts_are_flagged(store, tmp_path):
    """A better RF run evaluated on another number of samples becomes the RF side, and the
    report says its FID is not comparable as it stands."""
    from mlflow import MlflowClient

    from dashboards.report import build_report

    client = MlflowClient(store.uri)
    run = client.create_run(store.experiment_id, run_name="rf-more-samples")
    client.log_param(run.info.run_id, "objective", "rf")
    client.log_metric(run.info.run_id, "eval/fid", 20.0, step=400)
    client.log_metric(run.info.run_id, "eval/fid_samples", 1257.0, step=400)
    client.set_terminated(run.info.run_id)
    text = build_report(store.uri, store.experiment, out=tmp_path / "r.html").read_text()
    assert "rf-more-samples" in text and "RF samples: not logged" in text
    assert "the two FIDs come from different sample counts (RF: 1257 vs RF + LZN: 500)" in text


def test_the_sweeps_own_baseline_is_the_rf_side_beside_its_best_trial(mlflow_tracking_uri, tmp_path):
    """The RF run the sweep trained at its best trial's values and budget (tag
    lzn.sweep.baseline = the parent run) is the RF side, even beside a better RF run of other
    settings; the sweep's best trial is the RF + LZN side."""
    from mlflow import MlflowClient

    from dashboards.report import build_report

    sweep = make_sweep_store(mlflow_tracking_uri, with_rf=True)  # rf-seed0: FID 52, not the sweep's
    client = MlflowClient(sweep.uri)
    run = client.create_run(sweep.experiment_id, run_name="smoke-baseline-rf",
                            tags={"lzn.sweep.baseline": sweep.parent_run_id})
    client.log_param(run.info.run_id, "objective", "rf")
    for key, value in {"eval/fid": 61.5, "eval/fid_samples": 500.0}.items():
        client.log_metric(run.info.run_id, key, value, step=400)
    client.set_terminated(run.info.run_id)
    text = build_report(sweep.uri, sweep.experiment, out=tmp_path / "r.html").read_text()
    section = text[text.index('id="rf-vs-lzn"'):]
    best = min((t for t in TRIALS if t[1] == "finished"), key=lambda t: t[4])
    assert "smoke-baseline-rf" in section and "rf-seed0" not in section
    assert f"trial-{best[0]}" in section and "61.5" in section
