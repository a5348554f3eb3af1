"""`python -m pipelines.prepare data=<source> [data.root=DIR] [data.name=NAME] [key=value ...]`:
turn a raw dataset into Parquet shards (the pipeline's first stage).

Sources (pipelines/conf/data/): digits, cifar10, imagenet, imagefolder. Shards go to
<data.shards_dir>/<data.name>/<split>/part-NNNNN.parquet with a manifest.json beside the
splits; data.shards_dir defaults to $LZN_DATA_DIR or ./data. Options under
data.prepare (lzn.data.prepare.PrepareConfig): executor=auto|ray|process|serial,
workers, shard_mb, shard_rows, raw_max_side, download, verify. Re-running the same
command rewrites nothing; an interrupted run resumes.
"""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from pipelines.cli import guarded, print_header
from pipelines.config import to_run_config
from pipelines.stages.prepare import prepare


@hydra.main(version_base="1.3", config_path="conf", config_name="prepare")
def main(dcfg: DictConfig) -> None:
    report = guarded(lambda: prepare(to_run_config(dcfg).data))
    print_header("prepare done")
    print(report.describe(), flush=True)


if __name__ == "__main__":
    from pipelines.cli import entry  # an unknown task= is refused with suggestions before Hydra composes

    sys.exit(entry(main))
