"""ensure_prepared: a dataset name pointed at another folder, size or held-out split is
prepared again; the same request rewrites nothing."""
import json

from lzn.data.shards import MANIFEST
from lzn.task import DataConfig
from pipelines.stages.prepare import ensure_prepared, stale
from tests.lzn.data.mixed_images import mixed_folder


def data(root, tmp_path, **kw) -> DataConfig:
    d = DataConfig(name="shapes", source="imagefolder", root=str(root), shards_dir=str(tmp_path / "data"),
                   **{"image_size": 8, "channels": 1, **kw})
    d.prepare.executor, d.prepare.resize = "serial", True
    return d


def manifest(tmp_path) -> dict:
    return json.loads((tmp_path / "data" / "shapes" / MANIFEST).read_text())


def test_another_folder_size_or_holdout_is_prepared_again(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    mixed_folder(a, per_class=6, seed=0)
    mixed_folder(b, per_class=8, seed=1)
    ensure_prepared(data(a, tmp_path))
    first = manifest(tmp_path)
    assert stale(data(a, tmp_path)) is None
    ensure_prepared(data(a, tmp_path))
    assert manifest(tmp_path)["created"] == first["created"] and "preparing it again" not in capsys.readouterr().out
    ensure_prepared(data(b, tmp_path))
    assert "preparing it again" in capsys.readouterr().out and manifest(tmp_path)["source"]["root"] == str(b)
    assert sum(e["rows"] for e in manifest(tmp_path)["splits"].values()) == 16
    bigger = data(b, tmp_path, image_size=12)
    assert "not 12x12x1" in stale(bigger)
    ensure_prepared(bigger)
    assert manifest(tmp_path)["resize"]["size"] == 12
    other = data(b, tmp_path, image_size=12, holdout=0.25)
    assert "0.1 at seed 0" in stale(other)
    ensure_prepared(other)
    assert manifest(tmp_path)["holdout"]["counts"]["disc"] == {"train": 6, "test": 2}
