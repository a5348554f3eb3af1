"""Small raw datasets built in tmp, in the layouts the data sources read: an image folder
with bad files, a CIFAR10 pickle archive, ImageNet archives and their extracted form."""
from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def _image(rng: np.random.Generator, size: int, mode: str) -> Image.Image:
    shape = (size, size) if mode == "L" else (size, size, 3)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


def _save(img: Image.Image, path: Path, fmt: str) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, fmt, quality=90) if fmt == "JPEG" else img.save(path, fmt)
    return path.read_bytes()


def image_folder(root: Path, *, per_class: int = 5, size: int = 12, seed: int = 0) -> dict[str, np.ndarray]:
    """root/train/<cat|dog>/*.png (+ one large JPEG) and root/val/...; plus three bad files.

    Returns {path: pixels (H, W, C)} of every good image as PIL decodes it."""
    rng = np.random.default_rng(seed)
    good = {}
    for split, n in (("train", per_class), ("val", 2)):
        for cls in ("cat", "dog"):
            for i in range(n):
                path = root / split / cls / f"{i:03d}.png"
                _save(_image(rng, size, "L" if i % 2 else "RGB"), path, "PNG")
                good[str(path)] = _pixels(path)
    big = root / "train" / "cat" / "large.jpg"  # larger than raw_max_side: kept as JPEG bytes
    _save(_image(rng, 80, "RGB"), big, "JPEG")
    good[str(big)] = _pixels(big)
    bad = root / "train" / "dog"
    (bad / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + rng.bytes(200))
    png = (root / "train" / "cat" / "000.png").read_bytes()
    (bad / "truncated.png").write_bytes(png[: len(png) // 2])
    (bad / "notes.png").write_text("this is a text file, not an image\n")
    return good


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        img = img.convert("L" if img.mode == "L" else "RGB")
        return np.asarray(img).reshape(img.height, img.width, -1)


CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def cifar10(root: Path, *, per_batch: int = 12, archive: bool = True, seed: int = 0) -> dict[str, tuple]:
    """cifar-10-batches-py/ (and, with `archive`, cifar-10-python.tar.gz of it) in the real
    format. Returns {split: (pixels (n, 32, 32, 3), labels (n,))}."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": CIFAR_CLASSES, "num_vis": 3072}))
    out = {"train": ([], []), "test": ([], [])}
    names = [("train", f"data_batch_{i}") for i in range(1, 6)] + [("test", "test_batch")]
    for split, name in names:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        (folder / name).write_bytes(pickle.dumps({"batch_label": name, "labels": labels, "data": data}))
        out[split][0].append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        out[split][1].append(np.asarray(labels))
    if archive:
        with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
            tar.add(folder, arcname="cifar-10-batches-py")
    return {s: (np.concatenate(p), np.concatenate(y)) for s, (p, y) in out.items()}


WNIDS = ["n01440764", "n01443537", "n01484850"]


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _jpeg(rng: np.random.Generator, size: int) -> bytes:
    buf = io.BytesIO()
    _image(rng, size, "RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _devkit_files(val_wnids: list[str]) -> dict[str, bytes]:
    """meta.mat (synsets with ILSVRC2012_ID, WNID, words, ..., num_children) and the ground truth."""
    import scipy.io

    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images"]
    synsets = np.zeros((len(WNIDS) + 1,), dtype=[(f, object) for f in fields])
    for i, wnid in enumerate(WNIDS):  # IDs deliberately not in sorted-wnid order
        synsets[i] = (len(WNIDS) - i, wnid, f"class {wnid}", "", 0, np.zeros(0), 0, 3)
    synsets[len(WNIDS)] = (len(WNIDS) + 1, "n00000001", "an inner node", "", 3, np.arange(1, 4), 1, 0)
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"synsets": synsets})
    wnid_to_id = {w: len(WNIDS) - i for i, w in enumerate(WNIDS)}
    truth = "".join(f"{wnid_to_id[w]}\n" for w in val_wnids)
    return {"ILSVRC2012_devkit_t12/data/meta.mat": buf.getvalue(),
            "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt": truth.encode()}


def imagenet(root: Path, *, per_class: int = 3, n_val: int = 4, size: int = 72, extracted: bool = False,
             seed: int = 0) -> dict[str, list[tuple[bytes, str]]]:
    """The ILSVRC2012 archives (or, with `extracted`, train/<wnid>/ + flat val/ + devkit/).
    Returns {split: [(jpeg bytes, wnid)]} in file-name order."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    train = {w: [(f"{w}_{i}.JPEG", _jpeg(rng, size)) for i in range(per_class)] for w in WNIDS}
    val_wnids = [WNIDS[i % len(WNIDS)] for i in range(n_val)]
    val = [(f"ILSVRC2012_val_{i + 1:08d}.JPEG", _jpeg(rng, size)) for i in range(n_val)]
    devkit = _devkit_files(val_wnids)
    if extracted:
        for w, files in train.items():
            for name, data in files:
                (root / "train" / w).mkdir(parents=True, exist_ok=True)
                (root / "train" / w / name).write_bytes(data)
        (root / "val").mkdir()
        for name, data in val:
            (root / "val" / name).write_bytes(data)
        for name, data in devkit.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(data)
    else:
        with tarfile.open(root / "ILSVRC2012_img_train.tar", "w") as outer:
            for w, files in train.items():
                inner = io.BytesIO()
                with tarfile.open(fileobj=inner, mode="w") as t:
                    for name, data in files:
                        _add_bytes(t, name, data)
                _add_bytes(outer, f"{w}.tar", inner.getvalue())
        with tarfile.open(root / "ILSVRC2012_img_val.tar", "w") as t:
            for name, data in val:
                _add_bytes(t, name, data)
        with tarfile.open(root / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as t:
            for name, data in devkit.items():
                _add_bytes(t, name, data)
    return {"train": [(d, w) for w in WNIDS for _, d in train[w]],
            "val": [(d, w) for (_, d), w in zip(val, val_wnids)]}


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))
