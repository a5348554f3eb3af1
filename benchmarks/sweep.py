"""What ASHA saves: the same digits sweep (`pipelines.sweep task=gen_digits`, its 8 trials
of 400 steps, the same random configs by seed) with ASHA early stopping and with every
trial run to the end (sweep.scheduler=fifo). Reports the trial-iterations each spent (the
sum of the steps its trials trained), the wall time, and the best FID each found.
Untracked (tracking.enabled=false), on a local Ray of this machine's CPUs.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.report import table

OUT = Path("bench-results")
ROOT = Path(__file__).resolve().parents[1]


def _sweep(out: Path, scheduler: str, extra: list[str]) -> dict:
    env = {**os.environ, "LZN_DATA_DIR": str(out / "data"), "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pipelines.sweep", "task=gen_digits", f"output_dir={out}",
                           "tracking.enabled=false", f"sweep.scheduler={scheduler}", f"sweep.name={scheduler}",
                           *extra], cwd=ROOT, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"sweep ({scheduler}) failed:\n{done.stderr[-3000:]}")
    seconds = time.perf_counter() - start
    rows = list(csv.DictReader((out / "gen_digits" / "sweeps" / scheduler / "leaderboard.csv").open()))
    finished = [float(r["eval/fid"]) for r in rows if r["status"] == "finished" and r["eval/fid"]]
    return {"scheduler": scheduler, "trials": len(rows),
            "stopped early": sum(r["status"] == "stopped early" for r in rows),
            "trial-iterations": sum(int(r["steps"]) for r in rows),
            "best eval/fid": min(finished) if finished else float("nan"), "wall s": seconds}


def main(quick: bool = False) -> None:
    extra = ["sweep.num_samples=4", "train.iterations=200", "train.checkpoint_every=50"] if quick else []
    with tempfile.TemporaryDirectory(prefix="lzn-bench-sweep-") as tmp:
        rows = [_sweep(Path(tmp), scheduler, extra) for scheduler in ("asha", "fifo")]
    asha, fifo = rows
    rows.append({"scheduler": "asha / fifo", "trial-iterations": asha["trial-iterations"] / fifo["trial-iterations"],
                 "wall s": asha["wall s"] / fifo["wall s"]})
    print("\nSweep: ASHA vs every trial to the end (gen_digits, same configs)\n" + table(rows))
    OUT.mkdir(exist_ok=True)
    (OUT / "sweep.json").write_text(json.dumps(rows, indent=1) + "\n")
