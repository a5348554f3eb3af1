"""What a Ray Train run is told to do about a lost node: elastic bounds that keep the global
batch whole, a bounded wait otherwise, and the driver's messages. The run itself, with a node
killed, is tests/integration/test_multinode.py."""
import pytest

from lzn.errors import UserError
from orchestration.ray import node_loss
from orchestration.ray.node_loss import NodeWatch, scaling_workers, start_tries
from orchestration.run import RayTrainerConfig, validate_trainer


def test_elastic_only_when_min_workers_is_below_num_workers():
    assert scaling_workers(RayTrainerConfig(num_workers=4)) == 4
    assert scaling_workers(RayTrainerConfig(num_workers=4, min_workers=4)) == 4
    assert scaling_workers(RayTrainerConfig(num_workers=4, min_workers=2)) == (2, 4)


def test_every_elastic_worker_count_must_divide_the_global_batch():
    validate_trainer(RayTrainerConfig(num_workers=2, min_workers=1), 16)
    validate_trainer(RayTrainerConfig(num_workers=4, min_workers=4), 12)
    with pytest.raises(UserError, match=r"not divisible by \[3\]"):  # 2 and 4 divide 16, 3 does not
        validate_trainer(RayTrainerConfig(num_workers=4, min_workers=2), 16)
    with pytest.raises(UserError, match=r"trainer.min_workers must be in \[1, trainer.num_workers=2\].*got 0"):
        validate_trainer(RayTrainerConfig(num_workers=2, min_workers=0), 16)
    with pytest.raises(UserError, match="got 3"):
        validate_trainer(RayTrainerConfig(num_workers=2, min_workers=3), 16)
    with pytest.raises(UserError, match="trainer.node_wait_s must be > 0 seconds, got 0"):
        validate_trainer(RayTrainerConfig(node_wait_s=0), 16)


def test_the_wait_for_a_lost_node_is_as_many_start_timeouts_as_fit_in_node_wait_s(monkeypatch):
    monkeypatch.delenv(node_loss.START_TIMEOUT_VAR, raising=False)
    assert start_tries(RayTrainerConfig(node_wait_s=600)) == 10  # Ray Train's 60 s a start
    assert start_tries(RayTrainerConfig(node_wait_s=61)) == 2
    assert start_tries(RayTrainerConfig(node_wait_s=1)) == 1
    monkeypatch.setenv(node_loss.START_TIMEOUT_VAR, "30")  # the user's setting is what Ray uses
    assert start_tries(RayTrainerConfig(node_wait_s=600)) == 20


def test_the_watch_names_the_lost_node_and_what_the_run_does(capsys):
    watch = NodeWatch(RayTrainerConfig(num_workers=2, min_workers=1))
    watch._alive = {"head" * 4: "10.213.0.11", "work" * 4: "10.213.0.12"}
    watch.update({"head" * 4: "10.213.0.11", "work" * 4: "10.213.0.12"})
    assert capsys.readouterr().err == ""  # nothing changed, nothing said
    watch.update({"head" * 4: "10.213.0.11"})
    said = capsys.readouterr().err
    assert "node 10.213.0.12 (workworkwork) is gone" in said and "trainer.min_workers=1" in said
    assert watch.lost() == ["10.213.0.12"]
    error = watch.failure(RuntimeError("boom"))
    assert "10.213.0.12" in str(error) and "min_workers=1" in str(error) and "boom" in str(error)
    watch.update({"head" * 4: "10.213.0.11", "back" * 4: "10.213.0.12"})  # a new raylet, a new node id
    assert "node 10.213.0.12 (backbackback) is back" in capsys.readouterr().err
    assert watch.lost() == [] and watch.failure(RuntimeError("boom")) is None


def test_a_fixed_size_run_says_how_long_it_waits():
    watch = NodeWatch(RayTrainerConfig(num_workers=2, node_wait_s=120))
    watch._alive = {"a" * 16: "10.213.0.11", "b" * 16: "10.213.0.12"}
    watch.update({"a" * 16: "10.213.0.11"})
    error = watch.failure(RuntimeError("startup timed out"))
    assert "did not hold trainer.num_workers=2 workers within trainer.node_wait_s=120 s" in str(error)
