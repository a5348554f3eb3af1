import json

from pipelines import digits_results as dr


def _fake_runs(root, exp, values):
    for seed, value in enumerate(values):
        folder = root / exp.task / f"{exp.prefix}-seed{seed}"
        folder.mkdir(parents=True)
        metrics = {key: value for key in exp.metrics}
        metrics["train/seconds"] = 100.0 + seed
        (folder / "metrics.json").write_text(json.dumps(metrics))


def test_existing_runs_are_read_not_retrained_and_the_table_replaces_only_its_block(tmp_path, monkeypatch):
    exp, baseline = dr.EXPERIMENTS[:2]  # the two repr_digits experiments
    _fake_runs(tmp_path, exp, [0.98, 0.99, 1.0])
    _fake_runs(tmp_path, baseline, [0.97, 0.97, 0.97])
    monkeypatch.setattr(dr.subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
    doc = tmp_path / "results.md"
    doc.write_text("# Results\n\nProse above.\n")
    dr.main(["--output-dir", str(tmp_path), "--doc", str(doc), "--only", exp.task, "--seeds", "0", "1", "2"])
    first = doc.read_text()
    assert first.startswith("# Results\n\nProse above.\n")
    assert "| repr_digits: LZN | probe top-1 | 0.9900 ± 0.0100 (0.9800, 0.9900, 1.0000) | 101 ± 1" in first
    assert "| repr_digits: SimCLR baseline | probe top-1 | 0.9700 ± 0.0000 (0.9700, 0.9700, 0.9700) |" in first
    assert "python -m pipelines.train task=repr_digits train.seed=S run_name=lzn-seedS" in first
    doc.write_text(first + "\nProse below.\n")
    dr.main(["--output-dir", str(tmp_path), "--doc", str(doc), "--only", exp.task, "--seeds", "0", "1", "2"])
    second = doc.read_text()
    assert second == first + "\nProse below.\n"  # the block replaced in place, nothing duplicated


def test_missing_runs_are_trained_with_the_seed_and_run_name(tmp_path, monkeypatch):
    exp = dr.EXPERIMENTS[1]  # the SimCLR baseline
    calls = []

    def fake_train(cmd, check):
        calls.append(cmd)
        seed = int(next(a for a in cmd if a.startswith("train.seed=")).split("=")[1])
        folder = tmp_path / exp.task / f"{exp.prefix}-seed{seed}"
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps({"eval/linear_probe_top1": 0.5, "train/seconds": 1.0}))

    monkeypatch.setattr(dr.subprocess, "run", fake_train)
    runs = [dr.run_one(exp, s, str(tmp_path)) for s in (3, 4)]
    assert [r["eval/linear_probe_top1"] for r in runs] == [0.5, 0.5]
    assert [c[3:] for c in calls] == [
        ["task=repr_digits", "train.seed=3", "run_name=simclr-seed3", f"output_dir={tmp_path}", "objective=simclr"],
        ["task=repr_digits", "train.seed=4", "run_name=simclr-seed4", f"output_dir={tmp_path}", "objective=simclr"],
    ]


def test_every_experiment_command_trains(tmp_path):
    """The report's commands as a user runs them, shrunk to a smoke run: a baseline whose
    overrides do not compose (say, a learning rate for a module it lacks) fails here. The LZN
    commands are the plain task commands, which tests/pipelines/test_train.py's smoke runs
    train for every digits task; only the baselines' overrides are new here."""
    import os
    import subprocess

    plain = [exp for exp in dr.EXPERIMENTS if not exp.overrides]
    assert {exp.task for exp in plain} == {"repr_digits", "joint_digits", "gen_digits"}
    assert all(dr.command(exp, 0, "o")[3:] == [f"task={exp.task}", "train.seed=0", f"run_name={exp.prefix}-seed0",
                                               "output_dir=o"] for exp in plain)
    env = {**os.environ, "LZN_CACHE_DIR": str(tmp_path / "cache"), "LZN_DATA_DIR": str(tmp_path / "data"),
           "OMP_NUM_THREADS": "1"}
    for exp in [exp for exp in dr.EXPERIMENTS if exp.overrides]:
        done = subprocess.run([*dr.command(exp, 0, str(tmp_path)), "scale=smoke"], capture_output=True, text=True,
                              env=env, timeout=600, cwd=dr.Path(__file__).resolve().parents[2])
        assert done.returncode == 0, f"{exp.label}: {done.stderr[-2000:]}"
        metrics = json.loads((tmp_path / exp.task / f"{exp.prefix}-seed0" / "metrics.json").read_text())
        assert set(exp.metrics) <= set(metrics), exp.label
