"""orchestration.ray.tune on a local Ray: after the trials, the sweep waits for Ray to release
their placement groups before the baseline asks for the same CPUs."""
import threading

import pytest

from orchestration.ray.tune import wait_for_released

ray = pytest.importorskip("ray")


def state(pg) -> str:
    return ray.util.placement_group_table(pg)["state"]


def test_the_wait_lasts_until_a_trials_placement_group_is_removed(local_ray):
    from ray.util.placement_group import placement_group, remove_placement_group

    pg = placement_group([{"CPU": 1}])
    ray.get(pg.ready(), timeout=60)
    assert state(pg) == "CREATED" and pg.id.hex().endswith(ray.get_runtime_context().get_job_id())
    threading.Timer(1.0, remove_placement_group, [pg]).start()  # as Ray does, seconds after Tune returns
    assert wait_for_released(timeout_s=60, poll_s=0.1) == []
    assert state(pg) == "REMOVED"
    assert ray.available_resources().get("CPU") == 2  # the baseline gets both CPUs


def test_a_group_never_released_is_named_after_the_timeout(local_ray, capsys):
    from ray.util.placement_group import placement_group, remove_placement_group

    pg = placement_group([{"CPU": 1}])
    ray.get(pg.ready(), timeout=60)
    try:
        assert wait_for_released(timeout_s=0.5, poll_s=0.1) == [pg.id.hex()]
        assert state(pg) == "CREATED"
        assert f"still held after 0.5 s ({pg.id.hex()})" in capsys.readouterr().err
    finally:
        remove_placement_group(pg)
