"""Where raw datasets come from: each source lists the images of every split.

A listing is cheap (file names, sizes and archive offsets; no image is decoded): the
prepare stage packs it into shards and decodes in parallel. Sources by name (SOURCES):
- digits: scikit-learn's handwritten digits, the stratified 70/30 split of lzn.data.digits;
- cifar10: `cifar-10-python.tar.gz` or its extracted `cifar-10-batches-py/` (torchvision
  downloads the archive with download=true);
- imagenet: the ILSVRC2012 archives (train tar of per-class tars, val tar, devkit) or an
  extracted train/<wnid>/*.JPEG + val/ layout;
- imagefolder: root/<class>/<image>, root/<split>/<class>/<image> or a flat folder of images
  (any format PIL reads; the prepare stage makes a held-out split when there is none).
"""
from __future__ import annotations

import hashlib
import os
import pickle
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

from lzn.errors import UserError


class SourceError(UserError):
    """The raw data is missing, empty or laid out differently from what the source expects."""


@dataclass(frozen=True)
class FileRef:
    path: str


@dataclass(frozen=True)
class ArchiveRef:
    """A member of an uncompressed tar (possibly inside another tar): bytes at an offset."""
    archive: str
    offset: int
    size: int


@dataclass(frozen=True)
class Item:
    """One image of a split: where its bytes (or pixels) are, and its label."""
    ref: Union[FileRef, ArchiveRef, np.ndarray]
    label: int
    class_name: str
    path: str  # what a person reads in the manifest (file, archive member, array row)
    size: int  # bytes, to pack shards
    stamp: str  # changes when the item's content may have changed (size + mtime, or a hash)

    def read(self) -> Union[bytes, np.ndarray]:
        if isinstance(self.ref, FileRef):
            return Path(self.ref.path).read_bytes()
        if isinstance(self.ref, ArchiveRef):
            with open(self.ref.archive, "rb") as f:
                f.seek(self.ref.offset)
                data = f.read(self.ref.size)
            if len(data) != self.ref.size:
                raise OSError(f"archive ends after {len(data)} of {self.ref.size} bytes")
            return data
        return self.ref


@dataclass
class Listing:
    splits: dict[str, list[Item]]
    classes: list[str]  # label i is classes[i]
    pixel_max: int = 255  # the value of a white pixel (digits: 16)
    rejected: dict[str, list[dict]] = field(default_factory=dict)  # split -> what could not be listed


def _array_item(pixels: np.ndarray, label: int, classes: list[str], path: str) -> Item:
    return Item(pixels, label, classes[label], path, pixels.nbytes, hashlib.sha1(pixels.tobytes()).hexdigest())


def _file_item(path: Path, label: int, class_name: str) -> Item:
    st = path.stat()
    return Item(FileRef(str(path)), label, class_name, str(path), st.st_size, f"{st.st_size}:{st.st_mtime_ns}")


def _need_root(root: Optional[str], source: str, layout: str) -> Path:
    if not root:
        raise SourceError(f"data source {source!r} needs data.root: the folder that holds\n{layout}")
    path = Path(root).expanduser()
    if not path.exists():
        raise SourceError(f"data.root {str(path)!r} does not exist; source {source!r} expects\n{layout}")
    return path


# --- digits ----------------------------------------------------------------------------

def list_digits(root: Optional[str] = None, **_) -> Listing:
    from lzn.data.digits import digits_raw_split

    classes = [str(d) for d in range(10)]
    splits = {}
    for split, (pixels, labels, index) in digits_raw_split().items():
        splits[split] = [_array_item(p, int(y), classes, f"sklearn digits #{i}") for p, y, i in zip(pixels, labels, index)]
    return Listing(splits, classes, pixel_max=16)


# --- CIFAR10 ---------------------------------------------------------------------------

CIFAR10_LAYOUT = """  cifar-10-python.tar.gz                 (the archive from https://www.cs.toronto.edu/~kriz/cifar.html)
or cifar-10-batches-py/data_batch_1..5, test_batch, batches.meta   (the archive extracted)
(or pass data.prepare.download=true to fetch it with torchvision)"""
_CIFAR_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


def list_cifar10(root: Optional[str], download: bool = False, **_) -> Listing:
    if download:
        _download_cifar10(root)
    base = _need_root(root, "cifar10", CIFAR10_LAYOUT)
    archive = base / "cifar-10-python.tar.gz" if base.is_dir() else base
    folder = base / "cifar-10-batches-py" if (base / "cifar-10-batches-py").is_dir() else base
    if (folder / "batches.meta").is_file():
        read = lambda name: (folder / name).read_bytes()
        where = str(folder)
    elif archive.is_file():
        with tarfile.open(archive, "r:*") as tar:
            blobs = {Path(m.name).name: tar.extractfile(m).read() for m in tar if m.isfile()}
        read = lambda name: blobs[name]
        where = str(archive)
    else:
        raise SourceError(f"no CIFAR10 data in {base}; expected in it\n{CIFAR10_LAYOUT}")
    try:
        classes = list(pickle.loads(read("batches.meta"), encoding="latin1")["label_names"])
    except Exception as e:  # noqa: BLE001 - any failure here means the same thing to the user
        raise SourceError(f"{where}: cannot read batches.meta ({type(e).__name__}: {e}); expected\n{CIFAR10_LAYOUT}")
    splits, rejected = {}, {}
    for split, names in _CIFAR_FILES.items():
        items = []
        for name in names:
            try:
                batch = pickle.loads(read(name), encoding="latin1")
                pixels = np.asarray(batch["data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
                labels = batch["labels"]
            except Exception as e:  # noqa: BLE001 - a bad batch is skipped and listed, not fatal
                rejected.setdefault(split, []).append({"path": f"{where}/{name}", "reason": f"{type(e).__name__}: {e}"})
                continue
            items += [_array_item(np.ascontiguousarray(p), int(y), classes, f"{name}[{i}]")
                      for i, (p, y) in enumerate(zip(pixels, labels))]
        splits[split] = items
    return Listing(splits, classes, rejected=rejected)


def _download_cifar10(root: Optional[str]) -> None:
    if not root:
        raise SourceError("data.prepare.download=true needs data.root: the folder to download CIFAR10 into")
    from torchvision.datasets import CIFAR10

    try:
        CIFAR10(root, train=True, download=True)
    except Exception as e:  # noqa: BLE001 - offline machines get a message that says what to do
        raise SourceError(f"downloading CIFAR10 into {root} failed ({type(e).__name__}: {e}). Without network "
                          f"access, copy the archive there yourself:\n{CIFAR10_LAYOUT}") from e


# --- ImageNet --------------------------------------------------------------------------

IMAGENET_LAYOUT = """  ILSVRC2012_img_train.tar  ILSVRC2012_img_val.tar  ILSVRC2012_devkit_t12.tar.gz   (the archives)
or train/<wnid>/*.JPEG  and  val/<wnid>/*.JPEG (or val/*.JPEG with the devkit beside it)   (extracted)"""
_IMAGENET_TRAIN, _IMAGENET_VAL, _IMAGENET_DEVKIT = (
    "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12")


class _Window:
    """A read-only file object over [start, start + size) of another one (a tar inside a tar)."""

    def __init__(self, f, start: int, size: int):
        self.f, self.start, self.size, self.pos = f, start, size, 0

    def read(self, n: int = -1) -> bytes:
        n = self.size - self.pos if n < 0 else min(n, self.size - self.pos)
        self.f.seek(self.start + self.pos)
        data = self.f.read(n)
        self.pos += len(data)
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = {0: pos, 1: self.pos + pos, 2: self.size + pos}[whence]
        return self.pos

    def tell(self) -> int:
        return self.pos


def _tar_members(f, start: int = 0, size: Optional[int] = None) -> list[tuple[str, int, int]]:
    """(name, absolute offset, size) of the files of an uncompressed tar at `start` in `f`."""
    view = _Window(f, start, size if size is not None else os.fstat(f.fileno()).st_size)
    with tarfile.open(fileobj=view, mode="r:") as tar:
        return [(m.name, start + m.offset_data, m.size) for m in tar if m.isfile()]


def _archive_item(archive: Path, member: tuple[str, int, int], label: int, class_name: str, stamp: str) -> Item:
    name, offset, size = member
    return Item(ArchiveRef(str(archive), offset, size), label, class_name, f"{archive.name}:{name}", size,
                f"{stamp}:{offset}:{size}")


def _archive_stamp(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def _devkit_val_wnids(root: Path) -> list[str]:
    """The wnid of each validation image, in file-name order, from the devkit."""
    import scipy.io

    def parse(devkit: Path) -> list[str]:
        synsets = scipy.io.loadmat(devkit / "data" / "meta.mat", squeeze_me=True)["synsets"]
        idx_to_wnid = {int(s[0]): str(s[1]) for s in synsets if int(s[4]) == 0}  # leaves are the classes
        truth = (devkit / "data" / "ILSVRC2012_validation_ground_truth.txt").read_text().split()
        return [idx_to_wnid[int(i)] for i in truth]

    if (root / _IMAGENET_DEVKIT).is_dir():
        return parse(root / _IMAGENET_DEVKIT)
    archive = root / f"{_IMAGENET_DEVKIT}.tar.gz"
    if not archive.is_file():
        raise SourceError(f"ImageNet validation images in {root} are not in class folders and there is no devkit "
                          f"({archive.name} or {_IMAGENET_DEVKIT}/) to label them; expected\n{IMAGENET_LAYOUT}")
    with tempfile.TemporaryDirectory() as tmp, tarfile.open(archive, "r:gz") as tar:
        tar.extractall(tmp, filter="data")
        return parse(Path(tmp) / _IMAGENET_DEVKIT)


def list_imagenet(root: Optional[str], **_) -> Listing:
    base = _need_root(root, "imagenet", IMAGENET_LAYOUT)
    if (base / _IMAGENET_TRAIN).is_file():
        return _list_imagenet_archives(base)
    if (base / "train").is_dir():
        val = base / "val"
        labelled_val = val.is_dir() and any(p.is_dir() for p in val.iterdir())
        listing = list_imagefolder(str(base), splits=["train", "val"] if labelled_val else ["train"])
        if val.is_dir() and not labelled_val:
            files = sorted(p for p in val.iterdir() if p.is_file())
            wnids = _devkit_val_wnids(base)
            if len(wnids) != len(files):
                raise SourceError(f"{val} holds {len(files)} images but the devkit labels {len(wnids)}")
            index = {c: i for i, c in enumerate(listing.classes)}
            listing.splits["val"] = [_file_item(p, index[w], w) for p, w in zip(files, wnids)]
        return listing
    raise SourceError(f"no ImageNet data in {base}; expected in it\n{IMAGENET_LAYOUT}")


def _list_imagenet_archives(base: Path) -> Listing:
    train_tar = base / _IMAGENET_TRAIN
    stamp = _archive_stamp(train_tar)
    with open(train_tar, "rb") as f:
        per_class = {Path(name).stem: (offset, size) for name, offset, size in _tar_members(f)}
        classes = sorted(per_class)
        train = []
        for label, wnid in enumerate(classes):
            offset, size = per_class[wnid]
            members = sorted(_tar_members(f, offset, size))
            train += [_archive_item(train_tar, m, label, wnid, stamp) for m in members]
    splits = {"train": train}
    val_tar = base / _IMAGENET_VAL
    if val_tar.is_file():
        with open(val_tar, "rb") as f:
            members = sorted(_tar_members(f))
        wnids = _devkit_val_wnids(base)
        if len(wnids) != len(members):
            raise SourceError(f"{val_tar} holds {len(members)} images but the devkit labels {len(wnids)}")
        index = {c: i for i, c in enumerate(classes)}
        vstamp = _archive_stamp(val_tar)
        splits["val"] = [_archive_item(val_tar, m, index[w], w, vstamp) for m, w in zip(members, wnids)]
    return Listing(splits, classes)


# --- image folders ---------------------------------------------------------------------

IMAGEFOLDER_LAYOUT = """  <class>/<image>            (no split: data.holdout of each class is held out as "test")
or <split>/<class>/<image>    (splits named train, val, valid, validation or test, or data.splits; kept)
or <split>/<image> or <image> (unlabelled images: generation)
with images in any format PIL reads (png, jpg, webp, ...), any sizes and modes"""
_SPLIT_NAMES = ("train", "val", "valid", "validation", "test")


def _image_extensions() -> set[str]:
    from PIL import Image

    return {ext.lower() for ext in Image.registered_extensions()}


def list_imagefolder(root: Optional[str], splits: Optional[list[str]] = None, **_) -> Listing:
    base = _need_root(root, "imagefolder", IMAGEFOLDER_LAYOUT)
    if not base.is_dir():
        raise SourceError(f"data.root {str(base)!r} is not a folder; source 'imagefolder' expects\n{IMAGEFOLDER_LAYOUT}")
    if splits:
        missing = [s for s in splits if not (base / s).is_dir()]
        if missing:
            raise SourceError(f"data.splits {missing} are not folders in {base}; expected\n{IMAGEFOLDER_LAYOUT}")
        folders = {s: base / s for s in splits}
    else:
        found = {p.name: p for p in sorted(base.iterdir()) if p.is_dir() and p.name.lower() in _SPLIT_NAMES}
        folders = found or {"train": base}
    ext = _image_extensions()
    images = lambda d: sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in ext
                              and not p.name.startswith("."))
    classes = sorted({c.name for d in folders.values() for c in d.iterdir() if c.is_dir() and not c.name.startswith(".")})
    index = {c: i for i, c in enumerate(classes)}
    out, rejected = {}, {}
    for split, d in folders.items():
        items = []
        for c in classes:
            if (d / c).is_dir():
                items += [_file_item(p, index[c], c) for p in images(d / c)]
        loose = images(d)
        if classes:  # images beside class folders have no class: say so instead of guessing
            rejected[split] = [{"path": str(p), "reason": "not inside a class folder"} for p in loose]
        else:
            items = [_file_item(p, -1, "") for p in loose]
        out[split] = items
    if not any(out.values()):
        raise SourceError(f"no images found under {base}; expected\n{IMAGEFOLDER_LAYOUT}")
    return Listing(out, classes, rejected=rejected)


SOURCES: dict[str, Callable[..., Listing]] = {
    "digits": list_digits,
    "cifar10": list_cifar10,
    "imagenet": list_imagenet,
    "imagefolder": list_imagefolder,
}
