"""The on-disk format of a prepared dataset: Parquet shards and their manifest.

    <shards dir>/<name>/manifest.json
    <shards dir>/<name>/<split>/part-NNNNN.parquet

Every row is one image with a fixed schema (SCHEMA). Small images are stored as raw
uint8 pixels (H, W, C) so reading them costs a memcpy; larger ones keep their encoded
bytes exactly as the source stored them (JPEG, PNG, ...), so nothing is re-compressed.
A shard is written under a temporary name and renamed, and carries in its Parquet
metadata the fingerprint of the inputs it was made from and the files it rejected:
an interrupted preparation resumes from the shards that exist. The manifest is written
last and lists every shard with its size and SHA-256, so a reader never accepts a half
dataset and a shard altered after the fact is detected.
"""
from __future__ import annotations

import collections
import hashlib
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lzn.atomic import write_atomically
from lzn.errors import UserError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SCHEMA = pa.schema([
    ("image", pa.binary()),  # raw uint8 pixels (H, W, C) row-major, or the encoded file bytes
    ("encoding", pa.string()),  # "raw", or the file format: "png", "jpeg", "webp", ...
    ("height", pa.int32()),
    ("width", pa.int32()),
    ("channels", pa.int8()),  # 1 (grayscale) or 3 (RGB): what decoding yields
    ("label", pa.int32()),  # -1: unlabelled
    ("class_name", pa.string()),
    ("source_index", pa.int64()),  # position of the item in its split's source listing
    ("source_path", pa.string()),  # the file, archive member or array row it came from
])
ROW_GROUP_BYTES = 1 << 20  # a random read loads one row group of about this size
FINGERPRINT_KEY, REJECTED_KEY = b"lzn.fingerprint", b"lzn.rejected"


class ShardError(UserError, RuntimeError):
    """A prepared dataset is missing, incomplete, or its shards no longer match the manifest."""


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# --- one image <-> one row -------------------------------------------------------------

_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


def encode_image(data: bytes | np.ndarray, raw_max_side: int) -> dict:
    """One image as the columns image/encoding/height/width/channels.

    data: the file bytes as stored, or pixels (H, W) / (H, W, C) uint8. Raises on anything
    that does not fully decode (truncated, corrupt, not an image): callers reject the item.
    """
    if isinstance(data, np.ndarray):
        pixels = data if data.ndim == 3 else data[:, :, None]
        if pixels.dtype != np.uint8 or pixels.shape[2] not in (1, 3):
            raise ValueError(f"pixels must be uint8 (H, W, 1 or 3), got {pixels.dtype} {pixels.shape}")
        return _raw(pixels)
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img.load()  # a full decode: truncated files fail here, not at training time
        fmt = (img.format or "").lower()
        img = img.convert("L" if img.mode in _GRAY_MODES else "RGB")
        if max(img.size) <= raw_max_side:
            return _raw(np.asarray(img).reshape(img.height, img.width, -1))
        return {"image": bytes(data), "encoding": fmt, "height": img.height, "width": img.width,
                "channels": 1 if img.mode == "L" else 3}


def _raw(pixels: np.ndarray) -> dict:
    h, w, c = pixels.shape
    return {"image": np.ascontiguousarray(pixels).tobytes(), "encoding": "raw", "height": h, "width": w,
            "channels": c}


def decode_image(data: bytes, encoding: str, height: int, width: int, channels: int) -> np.ndarray:
    """The pixels (H, W, C) uint8 of one row."""
    if encoding == "raw":
        return np.frombuffer(data, np.uint8).reshape(height, width, channels).copy()
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.array(img.convert("L" if channels == 1 else "RGB")).reshape(height, width, channels)


# --- shards ----------------------------------------------------------------------------

@dataclass
class ShardSummary:
    """What the manifest records of one shard."""
    file: str
    rows: int
    bytes: int
    sha256: str
    fingerprint: str
    classes: dict[str, int] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)  # "HxWxC" -> count
    encodings: dict[str, int] = field(default_factory=dict)
    rejected: list[dict] = field(default_factory=list)  # {"path", "reason"}


def write_shard(path: Path, rows: list[dict], *, fingerprint: str, rejected: list[dict]) -> ShardSummary:
    """Write `rows` (dicts of SCHEMA's columns) as one Parquet shard, atomically."""
    table = pa.Table.from_pylist(rows, schema=SCHEMA).replace_schema_metadata(
        {FINGERPRINT_KEY: fingerprint.encode(), REJECTED_KEY: json.dumps(rejected).encode()})
    mean = max(1, sum(len(r["image"]) for r in rows) // max(1, len(rows)))
    group = int(np.clip(ROW_GROUP_BYTES // mean, 16, 4096))
    # Encoded images do not compress further: store them as they are, so a read is a copy.
    encoded = any(r["encoding"] != "raw" for r in rows)
    codec = {name: ("none" if encoded and name == "image" else "snappy") for name in SCHEMA.names}
    write_atomically(path, lambda f: pq.write_table(table, f, row_group_size=group, compression=codec))
    return summarize_shard(path)


def shard_fingerprint(path: Path) -> str | None:
    """The input fingerprint a finished shard was written from (None if unreadable)."""
    try:
        meta = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowException):
        return None
    value = meta.get(FINGERPRINT_KEY)
    return value.decode() if value else None


def summarize_shard(path: Path) -> ShardSummary:
    """Counts, checksum and rejected list of a written shard (reads no image bytes)."""
    path = Path(path)
    pf = pq.ParquetFile(path)
    meta = pf.schema_arrow.metadata or {}
    cols = pf.read(columns=["encoding", "height", "width", "channels", "class_name"]).to_pydict()
    sizes = collections.Counter(f"{h}x{w}x{c}" for h, w, c in zip(cols["height"], cols["width"], cols["channels"]))
    return ShardSummary(
        file=path.name, rows=pf.metadata.num_rows, bytes=path.stat().st_size, sha256=sha256_file(path),
        fingerprint=meta.get(FINGERPRINT_KEY, b"").decode(),
        classes=dict(sorted(collections.Counter(cols["class_name"]).items())), sizes=dict(sizes),
        encodings=dict(collections.Counter(cols["encoding"])),
        rejected=json.loads(meta.get(REJECTED_KEY, b"[]")))


# --- the manifest ----------------------------------------------------------------------

def split_entry(shards: list[ShardSummary]) -> dict:
    """The manifest's record of one split, from its shards in order."""
    total = lambda key: dict(sorted(sum((collections.Counter(getattr(s, key)) for s in shards),
                                        collections.Counter()).items()))
    return {
        "rows": sum(s.rows for s in shards), "classes": total("classes"), "image_sizes": total("sizes"),
        "encodings": total("encodings"), "rejected": [r for s in shards for r in s.rejected],
        "shards": [{k: v for k, v in asdict(s).items() if k in ("file", "rows", "bytes", "sha256", "fingerprint")}
                   for s in shards],
    }


def write_manifest(dataset_dir: Path, manifest: dict) -> None:
    text = json.dumps(manifest, indent=1) + "\n"
    write_atomically(Path(dataset_dir) / MANIFEST, lambda f: f.write(text.encode()))


def manifest_checksum(manifest: dict) -> str:
    """SHA-256 (hex) of what a prepared dataset is: its manifest (every split's shards by name,
    rows and SHA-256, the source, classes, resize and holdout) without its creation time. The
    same images prepared again give the same checksum; a changed, added or removed image, or
    another resize or holdout, changes it. It keys the DAG's prepare stage, the evaluation's
    caches and the MLflow dataset digest."""
    content = {k: v for k, v in manifest.items() if k != "created"}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def dataset_checksum(dataset_dir: str | Path) -> str:
    """`manifest_checksum` of the prepared dataset in `dataset_dir`."""
    return manifest_checksum(read_manifest(Path(dataset_dir)))


def read_manifest(dataset_dir: Path) -> dict:
    path = Path(dataset_dir) / MANIFEST
    if not path.is_file():
        raise ShardError(f"no prepared dataset at {dataset_dir} ({MANIFEST} missing): prepare it first with "
                         f"`python -m pipelines.prepare data=<source> data.name={Path(dataset_dir).name}`")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ShardError(f"{path} is not valid JSON ({e}): delete it and prepare the dataset again") from e
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ShardError(f"{path} has schema version {manifest.get('schema_version')!r}; this lzn reads version "
                         f"{SCHEMA_VERSION}: prepare the dataset again")
    return manifest


def split_files(dataset_dir: Path, split: str, manifest: dict | None = None) -> list[Path]:
    """The shard paths of `split`, in order, as the manifest lists them."""
    manifest = manifest or read_manifest(dataset_dir)
    if split not in manifest["splits"]:
        raise ShardError(f"dataset {manifest['name']!r} has no split {split!r}; it has {sorted(manifest['splits'])}")
    return [Path(dataset_dir) / split / s["file"] for s in manifest["splits"][split]["shards"]]


def verify_shards(dataset_dir: Path, *, checksums: bool = True, manifest: dict | None = None,
                  splits: list[str] | None = None) -> list[tuple[Path, str]]:
    """(shard, problem) for each shard of a prepared dataset (of `splits`, default all) that is
    missing, resized or (with `checksums`) altered since the manifest was written. Empty when
    all is well."""
    manifest = manifest or read_manifest(dataset_dir)
    problems = []
    for split, entry in manifest["splits"].items():
        if splits is not None and split not in splits:
            continue
        for s in entry["shards"]:
            path = Path(dataset_dir) / split / s["file"]
            if not path.is_file():
                problems.append((path, "missing"))
            elif path.stat().st_size != s["bytes"]:
                problems.append((path, f"{path.stat().st_size} bytes, the manifest says {s['bytes']}"))
            elif checksums and sha256_file(path) != s["sha256"]:
                problems.append((path, "SHA-256 does not match the manifest (altered or corrupted)"))
    return problems
