"""lzn.evaluate.ranks: an evaluation sharded over two gloo processes gives the numbers of one
process, with both ranks computing parts; a unit failing on one rank fails the evaluation on
rank 0 instead of hanging either."""
import json
import os
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lzn import evaluate as ev
from lzn.errors import UserError
from lzn.eval_data import ShardData
from lzn.evaluate import core
from lzn.objectives import AlignConfig, LatentConfig
from lzn.task import DataConfig, EvalConfig, ModelConfig, TaskConfig
from tests.lzn.evaluate.tasks import gen_cfg, model_of
from tests.ports import free_port

WORLD = 2


def repr_cfg(digits: Path) -> TaskConfig:
    return TaskConfig(name="repr_digits", objective="representation",
                      data=DataConfig(name="digits", shards_dir=str(digits.parent)),
                      model=ModelConfig(encoder="digits_cnn"), latent=LatentConfig(dim=8, steps=2),
                      align=AlignConfig(steps=2),
                      eval=EvalConfig(batch_size=8, chunk_size=16, probe_epochs=3, probe_lr=3e-3))


def evaluations(digits: Path) -> dict:
    """name -> (task, metrics): FID in digits_cnn features (KID, precision/recall, IS with it)
    and the linear probe, in shards of 16 rows so each has dozens of units."""
    return {"fid": (gen_cfg(digits, chunk_size=16, kid_pr_samples=30, is_splits=4), ["fid"]),
            "probe": (repr_cfg(digits), ["linear_probe"])}


def _worker(rank, port, digits, out):
    digits, out = Path(digits), Path(out)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # as the single-process run: the same reduction order in every kernel
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        data, found = ShardData(digits, image_size=8, channels=1), {}
        for name, (cfg, chosen) in evaluations(digits).items():
            model = model_of(cfg)
            if rank == 1:  # only rank 0's weights, broadcast, can give rank 0's numbers
                with torch.no_grad():
                    for p in model.objective.parameters():
                        p.add_(0.1)
            ran = {}
            metrics = ev.evaluate_on_ranks(cfg, model, data, cache_dir=out / "cache", parts_dir=out / name,
                                           chosen=chosen, progress=False, record=ran.update)
            found[name] = {"metrics": metrics, "ran": ran}
        cfg, chosen = evaluations(digits)["probe"]
        if rank == 1:  # a unit that fails on rank 1 alone
            def broken(self, unit):
                raise UserError(f"unit {unit.name} is broken")

            core.Evaluator.run = broken
        try:
            result = ev.evaluate_on_ranks(cfg, model_of(cfg), data, cache_dir=out / "cache",
                                          parts_dir=out / "failing", chosen=chosen, progress=False)
            found["failing"] = {"returned": result}
        except UserError as e:
            found["failing"] = {"raised": str(e)}
        (out / f"rank{rank}.json").write_text(json.dumps(found))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(600)
def test_two_ranks_give_the_metrics_of_one_process_and_share_the_units(digits, tmp_path):
    data = ShardData(digits, image_size=8, channels=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = {name: ev.evaluate_here(cfg, model_of(cfg), data, cache_dir=tmp_path / "cache",
                                         parts_dir=tmp_path / "single" / name, chosen=chosen, progress=False)
                  for name, (cfg, chosen) in evaluations(digits).items()}
    finally:
        torch.set_num_threads(threads)
    for cached in (digits / "fid_stats").glob("*.pt"):  # the ranks compute the reference in units too
        cached.unlink()
    mp.start_processes(_worker, args=(free_port(), str(digits), str(tmp_path)), nprocs=WORLD, join=True,
                       start_method="spawn")
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD))

    assert {"eval/fid", "eval/kid", "eval/is"} <= set(single["fid"])
    assert {"eval/linear_probe_top1", "eval/linear_probe_top5"} <= set(single["probe"])
    for name in ("fid", "probe"):
        # Exactly equal, not to a tolerance: the same units with the same seeds, each computed
        # by one thread, merged in the same order; the probe trains on the same features.
        assert rank0[name]["metrics"] == single[name], name
        assert rank1[name]["metrics"] is None
        ran = rank0[name]["ran"]
        parts = {p.stem for p in (tmp_path / name).glob("*.pt")}
        assert set(ran) == parts and len(parts) > 40  # every unit computed once, by one of the ranks
        counts = Counter(ran.values())
        assert set(counts) == {0, 1} and abs(counts[0] - counts[1]) <= 1, counts
    samples = {rank for unit, rank in rank0["fid"]["ran"].items() if unit.startswith("samples")}
    assert samples == {0, 1}  # the costly units are shared too, not only the reference rows

    assert rank0["failing"]["raised"].startswith("the evaluation failed on rank 1: UserError: unit ")
    assert rank1["failing"] == {"returned": None}


def test_units_are_dealt_in_turn_so_every_kind_is_shared_evenly():
    units = ev.units_of("reference", 50, 7) + ev.units_of("samples", 30, 8) + ev.units_of("probe_test", 9, 4)
    for world in (1, 2, 3, 5, 20):
        shares = ev.assign(units, world)
        assert ev.assign(units, world) == shares and len(shares) == world
        assert sorted((u.kind, u.index) for s in shares for u in s) == sorted((u.kind, u.index) for u in units)
        for kind in ("reference", "samples", "probe_test"):
            per_rank = [sum(u.kind == kind for u in s) for s in shares]
            assert max(per_rank) - min(per_rank) <= 1, (world, kind, per_rank)
    with pytest.raises(ValueError, match="world must be >= 1"):
        ev.assign(units, 0)
