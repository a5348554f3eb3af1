"""Training checkpoints: atomic writes, safe loads, automatic discovery of the latest.

A checkpoint holds everything needed for a bit-identical continuation: model and EMA
weights, optimizer and scheduler state, every RNG state, the iteration and counters.
It is written to a temporary file in the same folder and renamed, so a crash never
leaves a half-written file under a checkpoint name, and loaded with
`torch.load(weights_only=True)`, so a checkpoint cannot execute code. A disk too full for
the new checkpoint is a `DiskFullError` that names it, the bytes needed and free, and the
previous checkpoint, which stays as it was (older ones are pruned only after a write).
"""
from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from lzn.atomic import DiskFullError, write_atomically
from lzn.errors import UserError

CHECKPOINT_DIR = "checkpoints"  # a run folder's checkpoint store (lzn.trainer.FolderCheckpoints)
_NAME = re.compile(r"^ckpt-(\d{9})\.pt$")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint exists but cannot be used (corrupt, truncated or from another run)."""


def checkpoint_path(folder: Path, step: int) -> Path:
    return Path(folder) / f"ckpt-{step:09d}.pt"


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), folder / m.group(0)) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def latest_checkpoint(folder: Path) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1][1] if found else None


def tensor_bytes(payload) -> int:
    """The bytes of the tensors in `payload` (nested dicts, lists, tuples), each storage once:
    a lower bound on its torch.save size."""
    seen, total, stack = set(), 0, [payload]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            key = (item.untyped_storage().data_ptr(), item.storage_offset(), item.numel(), item.dtype)
            if key not in seen:
                seen.add(key)
                total += item.numel() * item.element_size()
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return total


def save_atomically(payload: dict, path: Path) -> None:
    """torch.save through `write_atomically`: never a half-written checkpoint, and a disk that
    cannot hold its tensors refused before a byte is written."""
    write_atomically(path, lambda f: torch.save(payload, f), size_hint=tensor_bytes(payload))


def save_checkpoint(state: dict, folder: Path, step: int, keep: int = 3) -> Path:
    """Write `state` atomically as ckpt-<step>.pt and keep the `keep` newest checkpoints."""
    final = checkpoint_path(folder, step)
    try:
        save_atomically(state, final)
    except DiskFullError as e:
        previous = latest_checkpoint(folder)
        kept = (f"The previous checkpoint {previous} is intact, and the same command resumes from it"
                if previous else "No earlier checkpoint exists")
        raise DiskFullError(
            f"cannot write the checkpoint of step {step}: {e.facts}. {kept}. Free space on that disk (other runs' "
            f"outputs; this run keeps its {keep} newest checkpoints, train.keep_checkpoints=) or move the run "
            "folder to a larger disk (output_dir=), then run the same command again",
            path=e.path, needed=e.needed, free=e.free) from e
    for _, old in list_checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)
    return final


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a checkpoint ({type(err).__name__}: {err}). "
            "Delete it to resume from the previous one, or start a new run in another folder."
        ) from err


class CheckpointStore(Protocol):
    """Where a trainer's checkpoints live. `save` is called on every rank at the same steps
    (a store may need a collective, as Ray Train's report does); only rank 0's state is kept."""

    def latest(self, map_location="cpu") -> dict | None: ...
    def latest_path(self) -> Path | None: ...  # where `latest` reads from (for the record)
    def save(self, state: dict, step: int, rank: int) -> Path | None: ...


class FolderCheckpoints:
    """ckpt-<step>.pt files in one folder (a shared file system when several nodes train)."""

    def __init__(self, folder: str | Path, keep: int = 3):
        self.folder, self.keep = Path(folder), keep

    def latest_path(self) -> Path | None:
        return latest_checkpoint(self.folder)

    def latest(self, map_location="cpu") -> dict | None:
        path = latest_checkpoint(self.folder)
        return None if path is None else load_checkpoint(path, map_location=map_location)

    def save(self, state: dict, step: int, rank: int) -> Path | None:
        return save_checkpoint(state, self.folder, step, keep=self.keep) if rank == 0 else None


def rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np.frombuffer(np.random.get_state()[1].tobytes(), dtype=np.uint8).copy()),
        "numpy_pos": int(np.random.get_state()[2]),
        "python": list(random.getstate()[1]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    keys = np.frombuffer(state["numpy"].numpy().tobytes(), dtype=np.uint32)
    np.random.set_state(("MT19937", keys, state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
