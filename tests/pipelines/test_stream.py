"""The torchrun path streams: two gloo processes train gen_digits from the shards
(data.loader=stream), each rank reading rows of its own every epoch."""
import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

CONF = Path(__file__).resolve().parents[2] / "pipelines" / "conf"
GLOBAL_BATCH, ITERATIONS = 400, 6  # 629 rows a rank, 200 a step: 3 steps an epoch, 2 epochs


def _config(shards: Path, output: Path):
    from hydra import compose, initialize_config_dir

    from pipelines.config import to_run_config

    with initialize_config_dir(str(CONF), version_base="1.3"):
        return to_run_config(compose("config", overrides=[
            "task=gen_digits", "scale=smoke", f"data.shards_dir={shards}", f"output_dir={output}",
            "data.loader=stream", "data.loader_workers=1", f"train.batch_size={GLOBAL_BATCH}",
            f"train.iterations={ITERATIONS}", "train.checkpoint_every=3"]))


class _Recording:
    """The stream, noting the dataset rows of every step it serves."""

    def __init__(self, stream):
        self.stream, self.rows = stream, {}

    def __call__(self, step: int) -> dict:
        batch = self.stream(step)
        self.rows[step] = self.stream.last_indices.tolist()
        return batch

    def close(self) -> None:
        self.stream.close()


def _rank(rank: int, world: int, shards: str, output: str, init: str) -> None:
    from orchestration.run import train_and_evaluate
    from pipelines.stages.train import shard_stream

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        cfg = _config(Path(shards), Path(output))
        source, recorders = shard_stream(cfg), []
        assert source is not None  # data.loader=stream: not held in memory

        def recording(batcher):
            recorders.append(_Recording(source(batcher)))
            return recorders[0]

        metrics = train_and_evaluate(cfg, Path(output) / "run", device=torch.device("cpu"), evaluate=False,
                                     progress=False, batch_source=recording)
        (Path(output) / f"rank-{rank}.json").write_text(json.dumps(
            {"rows": recorders[0].rows, "steps": metrics["train/steps"],
             "steps_per_epoch": recorders[0].stream.steps_per_epoch}))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_train_from_the_shards_on_disjoint_rows_each_epoch(tmp_path):
    from lzn.data.prepare import PrepareConfig, prepare_dataset

    prepare_dataset("digits", None, tmp_path / "data" / "digits", PrepareConfig(shard_rows=200))
    mp.spawn(_rank, args=(2, str(tmp_path / "data"), str(tmp_path), str(tmp_path / "init")), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [r["steps"] for r in ranks] == [ITERATIONS, ITERATIONS]
    per_epoch = ranks[0]["steps_per_epoch"]
    assert per_epoch == 629 // (GLOBAL_BATCH // 2) == 3
    for epoch in range(ITERATIONS // per_epoch):
        steps = [str(k) for k in range(epoch * per_epoch, (epoch + 1) * per_epoch)]
        mine = [[row for k in steps for row in r["rows"][k]] for r in ranks]
        assert all(len(m) == len(set(m)) == per_epoch * GLOBAL_BATCH // 2 for m in mine)
        assert not set(mine[0]) & set(mine[1]), f"epoch {epoch}: both ranks read some rows"
    assert (tmp_path / "run" / "checkpoints" / f"ckpt-{ITERATIONS:09d}.pt").exists()
