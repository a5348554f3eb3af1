"""`python -m pipelines.prepare` end to end: real processes, real files."""
import json
import os
import subprocess
import sys
from pathlib import Path

from tests.lzn.data import builders

ROOT = Path(__file__).resolve().parents[2]


def prepare(*overrides, data_dir: Path):
    env = {**os.environ, "LZN_DATA_DIR": str(data_dir), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "pipelines.prepare", *overrides], cwd=ROOT, capture_output=True,
                          text=True, env=env, timeout=300)


def test_prepare_an_image_folder_then_rerun(tmp_path):
    builders.image_folder(tmp_path / "raw")
    args = ("data=imagefolder", f"data.root={tmp_path / 'raw'}", "data.name=pets", "data.prepare.executor=process")
    first = prepare(*args, data_dir=tmp_path / "data")
    assert first.returncode == 0, first.stderr[-3000:]
    manifest = json.loads((tmp_path / "data" / "pets" / "manifest.json").read_text())
    assert {s: e["rows"] for s, e in manifest["splits"].items()} == {"train": 11, "val": 4}
    assert "3 file(s) rejected" in first.stdout and "prepare pets" in first.stderr  # the progress bar
    again = prepare(*args, data_dir=tmp_path / "data")
    assert again.returncode == 0 and "up to date" in again.stdout and "nothing rewritten" in again.stdout


def test_missing_root_fails_with_the_expected_layout(tmp_path):
    done = prepare("data=imagenet", f"data.root={tmp_path / 'nowhere'}", data_dir=tmp_path / "data")
    assert done.returncode != 0
    assert "does not exist" in done.stderr and "ILSVRC2012_img_train.tar" in done.stderr
    assert not (tmp_path / "data").exists()


def test_unknown_source_lists_the_known_ones(tmp_path):
    done = prepare("data=imagefolder", "data.source=mnist", f"data.root={tmp_path}", data_dir=tmp_path / "data")
    assert done.returncode != 0 and "mnist" in done.stderr and "imagefolder" in done.stderr
