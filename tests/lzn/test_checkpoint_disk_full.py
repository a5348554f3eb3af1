"""A checkpoint that does not fit the disk: a real, small file system (a 1 MiB tmpfs mounted
for each test, unmounted after it; needs root, as `mount` does, and is skipped without it).
The previous checkpoint stays whole and loads back; the error names the file, the bytes
needed and free, and what to do."""
import os
import re
import subprocess

import pytest
import torch

from lzn.atomic import DiskFullError, write_atomically
from lzn.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint

DISK = 1 << 20  # bytes


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK}", "tmpfs", str(mnt)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (root needed): {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def _free(folder) -> int:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def _number(text: str, before: str) -> int:
    return int(re.search(rf"([\d,]+) {before}", text).group(1).replace(",", ""))


def _state(seed: int, n: int = 150_000) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"model": {"w": torch.randn(n, generator=g)}, "step": seed}


def test_a_checkpoint_too_big_for_the_free_space_is_refused_before_writing_and_the_previous_loads(small_disk):
    folder = small_disk / "checkpoints"
    first = save_checkpoint(_state(1), folder, step=10)
    free = _free(small_disk)
    assert free < 600_000  # the second checkpoint's 150,000 float32 cannot fit

    with pytest.raises(DiskFullError) as caught:
        save_checkpoint(_state(2), folder, step=20)
    message = str(caught.value)
    assert f"no space left for {folder / 'ckpt-000000020.pt'}" in message
    assert _number(message, "bytes and") == 600_000 == caught.value.needed  # the tensors' bytes
    assert _number(message, "are free on") == free == caught.value.free
    assert f"on {small_disk}" in message and f"The previous checkpoint {first} is intact" in message
    assert "output_dir=" in message and "run the same command again" in message
    assert sorted(p.name for p in folder.iterdir()) == ["ckpt-000000010.pt"]  # no temporary left
    assert _free(small_disk) == free
    assert torch.equal(load_checkpoint(first)["model"]["w"], _state(1)["model"]["w"])


def test_a_checkpoint_that_fills_the_disk_while_written_leaves_the_previous_whole(small_disk):
    """Many small tensors: their bytes fit, the file's per-record overhead does not, so the
    disk fills in the middle of torch.save (which raises a RuntimeError from the OSError)."""
    folder = small_disk / "checkpoints"
    first = save_checkpoint(_state(1), folder, step=10)
    free = _free(small_disk)
    many = {"model": {f"p{i}": torch.full((2,), float(i)) for i in range(5000)}}  # 40,000 bytes of tensors
    with pytest.raises(DiskFullError) as caught:
        save_checkpoint(many, folder, step=20)
    message = str(caught.value)
    written = _number(message, "written before the disk filled")
    assert 0 < written <= free and caught.value.needed == written > 40_000
    assert f"The previous checkpoint {first} is intact" in message
    assert isinstance(caught.value.__cause__, DiskFullError) and caught.value.__cause__.__cause__ is not None
    assert [step for step, _ in list_checkpoints(folder)] == [10]
    assert sorted(p.name for p in folder.iterdir()) == ["ckpt-000000010.pt"]
    assert torch.equal(load_checkpoint(first)["model"]["w"], _state(1)["model"]["w"])


def test_any_atomic_write_that_fills_the_disk_keeps_the_old_file(small_disk):
    path = small_disk / "metrics.json"
    write_atomically(path, lambda f: f.write(b"old"))
    with pytest.raises(DiskFullError) as caught:
        write_atomically(path, lambda f: f.write(b"x" * (2 * DISK)))
    assert path.read_bytes() == b"old" and sorted(p.name for p in small_disk.iterdir()) == ["metrics.json"]
    assert f"no space left for {path}" in str(caught.value) and "the previous metrics.json is untouched" in str(
        caught.value)
