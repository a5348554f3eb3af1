"""A user's own folder of images through the generic tasks: real processes, real files.

The folder (tests.lzn.data.mixed_images) has two classes, mixed sizes (some over 2x the
16 px the tasks train at, some not square) and modes, and no split. gen_images and
repr_images prepare it (resized, a held-out split) and train in memory (data.loader=memory
refuses anything else); an unknown task names the close ones; a bad data root fails before
any server starts. About a minute and a half on 2 CPU cores.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.lzn.data.mixed_images import mixed_folder

ROOT = Path(__file__).resolve().parents[2]


def command(module: str, *overrides, out: Path, env: dict | None = None):
    env = {**os.environ, "LZN_DATA_DIR": str(out / "data"), "LZN_CACHE_DIR": str(out / "cache"),
           "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", module, f"output_dir={out}", *overrides], cwd=ROOT,
                          capture_output=True, text=True, env={k: v for k, v in env.items() if v is not None},
                          timeout=900)


def ok(done):
    assert done.returncode == 0, f"failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("user") / "shapes"
    mixed_folder(root, per_class=20)
    return root


SMALL = ["scale=smoke", "data.image_size=16", "data.loader=memory", "tracking.enabled=false",
         "train.iterations=6", "data.name=shapes"]


def test_gen_images_prepares_a_mixed_folder_and_trains_in_memory(folder, tmp_path):
    done = ok(command("pipelines.run", "task=gen_images", f"data.root={folder}", "data.channels=3", *SMALL,
                      out=tmp_path))
    manifest = json.loads((tmp_path / "data" / "shapes" / "manifest.json").read_text())
    assert {s: e["image_sizes"] for s, e in manifest["splits"].items()} == {"train": {"16x16x3": 36},
                                                                             "test": {"16x16x3": 4}}
    assert manifest["holdout"]["counts"] == {"disc": {"train": 18, "test": 2}, "square": {"train": 18, "test": 2}}
    assert manifest["resize"]["size"] == 16 and sum(manifest["resize"]["resized"].values()) == 40
    metrics = json.loads((tmp_path / "gen_images" / "smoke-seed0" / "metrics.json").read_text())
    assert metrics["train/steps"] == 6 and metrics["eval/fid"] >= 0 and metrics["eval/fid_features"] == "pixels"
    assert "eval/fid" in done.stdout


def test_repr_images_trains_in_memory_and_is_probed(folder, tmp_path):
    ok(command("pipelines.run", "task=repr_images", f"data.root={folder}", "data.channels=1", "data.num_classes=2",
               *SMALL, out=tmp_path))
    metrics = json.loads((tmp_path / "repr_images" / "smoke-seed0" / "metrics.json").read_text())
    assert 0 <= metrics["eval/linear_probe_top1"] <= 1 and metrics["train/steps"] == 6
    manifest = json.loads((tmp_path / "data" / "shapes" / "manifest.json").read_text())
    assert manifest["splits"]["test"]["image_sizes"] == {"16x16x1": 4}


def test_repr_images_with_the_wrong_class_count_says_the_right_one(folder, tmp_path):
    done = command("pipelines.train", "task=repr_images", f"data.root={folder}", "data.num_classes=5", *SMALL,
                   out=tmp_path)
    assert done.returncode == 2 and "data.num_classes=5" in done.stderr and "data.num_classes=2" in done.stderr


def test_an_unknown_task_names_the_closest_ones(tmp_path):
    done = command("pipelines.run", "task=gen_imags", out=tmp_path)
    assert done.returncode == 2 and "did you mean gen_images" in done.stderr and "gen_digits" in done.stderr
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("module, backend", [("pipelines.train", "ray"), ("pipelines.run", "local")])
def test_a_bad_data_root_fails_before_any_server_starts(tmp_path, module, backend):
    nowhere = tmp_path / "no-such-folder"
    # No tracking URI: a run that got past the checks would start its own MLflow server under
    # output_dir/mlflow; Ray would make its session folder under RAY_TMPDIR.
    done = command(module, "task=gen_images", f"data.root={nowhere}", f"backend={backend}", "scale=smoke",
                   out=tmp_path, env={"MLFLOW_TRACKING_URI": None, "RAY_TMPDIR": str(tmp_path / "ray"),
                                      "RAY_ADDRESS": None})
    assert done.returncode == 2, done.stderr[-2000:]
    assert str(nowhere) in done.stderr and "does not exist" in done.stderr and "<class>/<image>" in done.stderr
    assert not (tmp_path / "mlflow").exists() and not (tmp_path / "ray").exists()
    assert not [p for p in Path("/proc").iterdir() if p.name.isdigit() and _mentions(p, str(tmp_path))]


def _mentions(proc: Path, text: str) -> bool:
    try:
        return text in (proc / "cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
