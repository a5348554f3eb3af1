"""The FID reference statistics of a prepared dataset, computed once and cached next to its
shards: keyed by the manifest's checksum (the data) and the extractor's weights digest (the
feature space), so any change to either computes them again."""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import torch
from torch import nn

from lzn.atomic import write_atomically
from lzn.data.shards import dataset_checksum
from lzn.metrics.fid import extractor_name
from lzn.metrics.image_set import ImageSetPart


def weights_digest(module: nn.Module) -> str:
    """SHA-256 of a module's parameters and buffers (names, shapes and bytes)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


class ReferenceCache:
    """The train split's `ImageSetPart` (feature moments, and the features of its KID and
    precision/recall subset of `subset` rows), in <dataset>/fid_stats/:
    <extractor>-<weights digest>-<size>x<size>x<channels>-pr<subset>-<manifest checksum>.pt.
    A changed manifest (the data was prepared again differently) gets a new file; the
    statistics of older manifests (same extractor weights, size and subset) are removed when
    it is written. A folder that cannot be written (read-only shared storage) only costs the cache."""

    def __init__(self, dataset_dir: str | Path, extractor: nn.Module, *, image_size: int, channels: int,
                 subset: int):
        self.folder = Path(dataset_dir) / "fid_stats"
        base = f"{extractor_name(extractor)}-{weights_digest(extractor)[:8]}-{image_size}x{image_size}x{channels}"
        self.prefix = f"{base}-pr{subset}"
        self._old_format = f"{base}-" + "[0-9a-f]" * 16 + ".pt"  # before the KID/PR subset joined the name
        self.path = self.folder / f"{self.prefix}-{dataset_checksum(dataset_dir)[:16]}.pt"

    def load(self) -> ImageSetPart | None:
        if not self.path.is_file():
            return None
        try:
            return ImageSetPart.from_state_dict(torch.load(self.path, map_location="cpu", weights_only=True))
        except Exception as err:  # noqa: BLE001 - a broken cache file is recomputed, not trusted
            print(f"ignoring unreadable FID reference statistics {self.path} ({type(err).__name__}: {err})",
                  file=sys.stderr)
            return None

    def save(self, reference: ImageSetPart) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_atomically(self.path, lambda f: torch.save(reference.state_dict(), f))
            for stale in [*self.folder.glob(f"{self.prefix}-*.pt"), *self.folder.glob(self._old_format)]:
                if stale != self.path:
                    stale.unlink(missing_ok=True)
        except OSError as err:
            print(f"could not cache the FID reference statistics in {self.folder} ({err}); they will be "
                  "computed again next time", file=sys.stderr)
