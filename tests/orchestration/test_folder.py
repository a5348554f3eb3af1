"""A run folder's layout, from its definition (orchestration/folder.py's docstring): files are
made by hand at the documented paths and RunFolder must find them there."""
import json

import pytest

from orchestration.folder import EvalFolder, RunFolder, checkpoint_step


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not a real checkpoint")
    return path


@pytest.fixture
def both_layouts(tmp_path):
    """A run folder with lzn's checkpoint at step 2 and Ray Train's at step 5."""
    local = _touch(tmp_path / "checkpoints" / "ckpt-000000002.pt")
    ray = _touch(tmp_path / "ray" / "ckpt-000000005" / "ckpt.pt")
    return tmp_path, local, ray


def test_checkpoints_of_both_layouts_are_found_and_the_latest_is_the_highest_step(both_layouts):
    root, local, ray = both_layouts
    folder = RunFolder(root)
    assert sorted(folder.all_checkpoints()) == [(2, local), (5, ray)]
    assert folder.latest_checkpoint() == ray
    assert folder.has_checkpoints() and folder.has_ray_checkpoints()
    assert checkpoint_step(local) == 2 and checkpoint_step(ray) == 5


def test_a_folder_with_lzn_checkpoints_only(tmp_path):
    local = _touch(tmp_path / "checkpoints" / "ckpt-000000002.pt")
    folder = RunFolder(tmp_path)
    assert folder.latest_checkpoint() == local
    assert folder.has_checkpoints() and not folder.has_ray_checkpoints()


def test_an_empty_folder_has_no_checkpoints(tmp_path):
    folder = RunFolder(tmp_path)
    assert folder.all_checkpoints() == []
    assert folder.latest_checkpoint() is None
    assert not folder.has_checkpoints()


def test_ray_checkpoints_and_worker_records_are_named_as_documented(tmp_path):
    folder = RunFolder(tmp_path)
    name = folder.ray_checkpoint_name(5)
    assert name == "ckpt-000000005"
    assert folder.ray_checkpoint(name) == tmp_path / "ray" / "ckpt-000000005" / "ckpt.pt"
    assert folder.worker_record(3) == tmp_path / "workers" / "rank-3.json"


def test_a_checkpoint_outside_a_run_folder_has_none(both_layouts):
    root, local, ray = both_layouts
    assert RunFolder.of_checkpoint(local) is None
    assert RunFolder.of_checkpoint(ray) is None


@pytest.mark.parametrize("marker", [".hydra/config.yaml", "mlflow_run.json"])
def test_the_run_folder_of_a_checkpoint_is_found_from_either_layout(both_layouts, marker):
    root, local, ray = both_layouts
    _touch(root / marker)
    assert RunFolder.of_checkpoint(local) == RunFolder(root)
    assert RunFolder.of_checkpoint(ray) == RunFolder(root)


def test_an_evaluation_folder_holds_its_files_where_documented(tmp_path):
    evaluation = RunFolder(tmp_path).evaluation(7, "0123456789ab")
    path = tmp_path / "eval" / "step-7-0123456789ab"
    assert evaluation == EvalFolder(path) and evaluation.path == path
    assert evaluation.metrics == path / "metrics.json"
    assert evaluation.settings == path / "settings.json"
    assert evaluation.plots == path / "plots"
    assert evaluation.parts == path / "parts"
    assert evaluation.complete == path / ".complete"
    assert evaluation.logged == path / ".logged"
    assert evaluation.part_ranks == path / "parts" / "ranks.json"


def test_a_training_runs_own_evaluations_have_folders_no_evaluate_stage_hash_can_name(tmp_path):
    folder = RunFolder(tmp_path)
    assert folder.final_evaluation(40).path == tmp_path / "eval" / "step-40-train"
    assert folder.checkpoint_evaluation(20).path == tmp_path / "eval" / "step-20-report"
    for name in ("train", "report"):  # the evaluate stage's key is 12 hex digits
        assert not all(c in "0123456789abcdef" for c in name)


def test_metrics_round_trip_and_are_written_as_json_sorted_by_key(tmp_path):
    folder = RunFolder(tmp_path)
    assert folder.read_metrics() is None
    metrics = {"train/steps": 10, "eval/fid": 2.5, "a": [1, 2]}
    folder.write_metrics(metrics)
    assert folder.read_metrics() == metrics
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk == metrics
    assert list(on_disk) == ["a", "eval/fid", "train/steps"]
