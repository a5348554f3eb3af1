"""The run/scheduler contract (orchestration/reporting.py), from its definition: a checkpoint's
report index is its number, ceil(step / checkpoint_every); the final result comes after the
last checkpoint; a finished run's result is its metrics.json, else its checkpoint log."""
import json

import pytest

from lzn.trainer import TrainConfig
from orchestration.folder import RunFolder
from orchestration.reporting import (
    checkpoint_report,
    checkpoints_of,
    final_report,
    finished_result,
    record_checkpoint_metric,
    report_index,
    tune_key,
)


@pytest.mark.parametrize("step, every, index", [(1, 4, 1), (4, 4, 1), (5, 4, 2), (8, 4, 2), (10, 4, 3),
                                                (1000, 1000, 1), (3, 1, 3)])
def test_report_index_is_the_checkpoint_number(step, every, index):
    assert report_index(step, every) == index


def test_a_run_of_10_steps_with_checkpoints_every_4_reports_1_2_3_then_a_final_4():
    train = TrainConfig(iterations=10, checkpoint_every=4)
    assert checkpoints_of(train) == 3
    # checkpoints at steps 4 and 8, and at the last step, 10
    assert [checkpoint_report("eval/fid", 1.0, step, train) for step in (4, 8, 10)] == [
        {"eval_fid": 1.0, "report": 1}, {"eval_fid": 1.0, "report": 2}, {"eval_fid": 1.0, "report": 3}]
    assert final_report(10, train, "eval/fid", 2.5) == {"step": 10, "final": 1, "report": 4, "eval_fid": 2.5}
    assert final_report(10, train, "eval/fid", None) == {"step": 10, "final": 1, "report": 4}


def test_tune_key_replaces_every_slash():
    assert tune_key("eval/fid") == "eval_fid"
    assert tune_key("eval/linear_probe/top1") == "eval_linear_probe_top1"
    assert tune_key("loss") == "loss"


def _metrics(root, **values):
    (root / "metrics.json").write_text(json.dumps(values))


def test_no_metrics_json_is_no_result(tmp_path):
    assert finished_result(tmp_path, "eval/fid", 10) is None


def test_a_run_short_of_its_iterations_is_no_result(tmp_path):
    _metrics(tmp_path, **{"train/steps": 8, "eval/fid": 3.0})
    assert finished_result(tmp_path, "eval/fid", 10) is None


def test_a_finished_run_returns_its_metric_from_metrics_json(tmp_path):
    _metrics(tmp_path, **{"train/steps": 10, "eval/fid": 3.0})
    (tmp_path / "checkpoint_metrics.jsonl").write_text(json.dumps({"step": 10, "eval/fid": 9.0}) + "\n")
    assert finished_result(tmp_path, "eval/fid", 10) == (10, 3.0)


def test_a_finished_run_without_the_metric_returns_the_last_checkpoint_log_row_at_its_step(tmp_path):
    _metrics(tmp_path, **{"train/steps": 10})
    rows = [{"step": 8, "eval/fid": 5.0}, {"step": 10, "eval/fid": 4.0}, {"step": 10, "other": 1.0},
            {"step": 10, "eval/fid": 3.5}]
    (tmp_path / "checkpoint_metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert finished_result(tmp_path, "eval/fid", 10) == (10, 3.5)


def test_a_finished_run_without_the_metric_anywhere_is_no_result(tmp_path):
    _metrics(tmp_path, **{"train/steps": 10})
    assert finished_result(tmp_path, "eval/fid", 10) is None
    (tmp_path / "checkpoint_metrics.jsonl").write_text(json.dumps({"step": 8, "eval/fid": 5.0}) + "\n")
    assert finished_result(tmp_path, "eval/fid", 10) is None


def test_recorded_checkpoint_metrics_are_what_a_finished_run_reads_back(tmp_path):
    _metrics(tmp_path, **{"train/steps": 10})
    folder = RunFolder(tmp_path)
    record_checkpoint_metric(folder, 8, "eval/fid", 5.0)
    record_checkpoint_metric(folder, 10, "eval/fid", 4.25)
    assert finished_result(tmp_path, "eval/fid", 10) == (10, 4.25)
