"""`make report` and `make ui` start in a fraction of a second: importing the dashboards
loads neither torch nor the model library, only lzn's torch-free leaves that the MLflow
tracker writes and fails with."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# lzn.atomic (the tracker's atomic writes) and lzn.errors (UserError) import only the standard library.
TORCH_FREE_LZN = {"lzn", "lzn.atomic", "lzn.errors"}
PROBE = """
import sys
import dashboards.report, dashboards.ui
loaded = sorted(m for m in sys.modules if m in ("torch", "torchvision") or m.startswith("torch.")
                or (m == "lzn" or m.startswith("lzn.")) and m not in {allowed!r})
print(" ".join(loaded))
"""


def test_importing_the_dashboards_loads_neither_torch_nor_lzn():
    done = subprocess.run([sys.executable, "-c", PROBE.format(allowed=TORCH_FREE_LZN)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    offenders = done.stdout.split()
    assert not offenders, f"import dashboards.report, dashboards.ui loaded: {offenders}"
