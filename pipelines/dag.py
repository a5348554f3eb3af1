"""A small stage DAG with content keys: a stage whose inputs, upstream outputs and own outputs
are unchanged is skipped.

Each stage declares what it depends on (`inputs`: the part of the config it reads, as
JSON) and the stages it needs. Its key hashes those inputs with the content keys of its
upstream stages' outputs, so changing an evaluation setting re-runs evaluation and what
follows it, and nothing before. A stage's record (<state dir>/<stage>.json) keeps its key,
its outputs and their content digests (SHA-256 of the files, or a stage-given digest such
as a manifest's checksum); an output that was deleted or altered re-runs the stage. Digests
are recomputed only when a file's size or modification time changed, never trusted from
timestamps alone.

A stage that fails loses its record (so it re-runs), keeps the records and outputs of the
stages before it, and raises `StageFailed` naming it: running the same command again
resumes at the failed stage.

With `ranks` (pipelines.ranks.Ranks: every rank of a torch.distributed process group runs the
same DAG) every rank decides each stage before any rank writes, a stage runs on rank 0 alone
unless it says `everywhere`, only rank 0 writes records, and a failure on any rank fails the
stage on every rank.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lzn.atomic import write_atomically
from lzn.data.shards import sha256_file
from lzn.errors import UserError


class StageFailed(RuntimeError):
    def __init__(self, stage: str, cause: BaseException):
        super().__init__(f"stage {stage!r} failed: {type(cause).__name__}: {cause}")
        self.stage, self.cause = stage, cause


@dataclass
class Stage:
    name: str
    run: Callable[[], dict[str, Path]]  # does the work; returns its outputs {name: file}
    inputs: Callable[[], dict] = dict  # what it reads of the config (JSON-able)
    needs: tuple[str, ...] = ()
    digests: dict[str, Callable[[Path], str]] = field(default_factory=dict)  # custom content digests
    everywhere: bool = False  # under a process group: runs on every rank (else on rank 0, the others wait)


class OneProcess:
    """The `ranks` of a DAG that one process runs (pipelines.ranks.Ranks has the same calls)."""

    lead = True

    def agree(self, what: str, decide):
        return decide()

    def settle(self, what: str, error: BaseException | None) -> None:
        if error is not None:
            raise error


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


class Pipeline:
    def __init__(self, stages: list[Stage], state_dir: str | Path, *, log=None, ranks=None):
        self.stages = {s.name: s for s in stages}
        order = [s.name for s in stages]
        for s in stages:
            unknown = [n for n in s.needs if n not in self.stages or order.index(n) > order.index(s.name)]
            if unknown:
                raise ValueError(f"stage {s.name!r} needs {unknown}, which are not stages listed before it")
        self.order, self.state_dir = order, Path(state_dir)
        self.ranks = ranks or OneProcess()
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        if not self.ranks.lead:  # rank 0 tells the story
            self.log = lambda msg: None

    # ------------------------------------------------------------------ records
    def _record_path(self, name: str) -> Path:
        return self.state_dir / f"{name}.json"

    def record(self, name: str) -> dict | None:
        path = self._record_path(name)
        try:
            return json.loads(path.read_text()) if path.is_file() else None
        except ValueError:
            return None

    def _digest(self, stage: Stage, name: str, path: Path, known: dict | None) -> str | None:
        """The content digest of one output, reusing `known` when the file's size and mtime match."""
        if not path.is_file():
            return None
        st = path.stat()
        if known and known.get("size") == st.st_size and known.get("mtime_ns") == st.st_mtime_ns:
            return known["digest"]
        return stage.digests.get(name, sha256_file)(path)

    def _outputs(self, stage: Stage, outputs: dict[str, Path], known: dict | None = None) -> dict | None:
        out = {}
        for name, path in outputs.items():
            path = Path(path)
            digest = self._digest(stage, name, path, (known or {}).get(name))
            if digest is None:
                return None
            st = path.stat()
            out[name] = {"path": str(path), "digest": digest, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        return out

    @staticmethod
    def output_key(record: dict) -> str:
        return _hash({k: v["digest"] for k, v in record["outputs"].items()})

    def key(self, name: str) -> str | None:
        """The stage's key now; None while an upstream stage is not up to date."""
        stage, upstream = self.stages[name], {}
        for dep in stage.needs:
            rec = self.current(dep)
            if rec is None:
                return None
            upstream[dep] = self.output_key(rec)
        return _hash({"stage": name, "inputs": stage.inputs(), "upstream": upstream})

    def current(self, name: str) -> dict | None:
        """The stage's record if it is up to date: same key, every output present and unchanged."""
        rec, key = self.record(name), None
        if rec is None or (key := self.key(name)) is None or rec.get("key") != key:
            return None
        outputs = self._outputs(self.stages[name], {k: Path(v["path"]) for k, v in rec["outputs"].items()},
                                rec["outputs"])
        if outputs is None or {k: v["digest"] for k, v in outputs.items()} != \
                {k: v["digest"] for k, v in rec["outputs"].items()}:
            return None
        return rec

    # ------------------------------------------------------------------ running
    def run(self, selected: list[str] | None = None) -> dict[str, str]:
        """Run the selected stages (default: all) in order, skipping those up to date.
        Returns {stage: "ran" | "skipped"}."""
        selected = list(self.order) if selected is None else list(selected)
        unknown = [s for s in selected if s not in self.stages]
        if unknown:
            raise UserError(f"stages={unknown} are not known; expected some of {self.order}")
        status, ranks = {}, self.ranks
        for name in self.order:
            if name not in selected:
                continue
            stage = self.stages[name]
            missing = ranks.agree(f"what stage {name!r} needs",
                                  lambda: [d for d in stage.needs if d not in selected and self.current(d) is None])
            if missing:
                raise UserError(f"stage {name!r} needs {missing}, which have not run with this config (or their "
                                f"outputs changed): add them to stages=, or leave stages= out")
            try:  # the stage's key reads its inputs, which can fail too (a missing weights file)
                # Every rank decides before any rank writes (rank 0 removes the record next).
                if ranks.agree(f"whether stage {name!r} is up to date", lambda: self.current(name) is not None):
                    self.log(f"[pipeline] {name}: up to date, skipped")
                    status[name] = "skipped"
                    continue
                error = None
                try:
                    self._run_stage(stage)
                except (Exception, SystemExit) as e:  # an interrupt propagates as it is
                    error = e
                ranks.settle(f"stage {name!r}", error)
            except (Exception, SystemExit) as e:
                raise StageFailed(name, e) from e
            status[name] = "ran"
        return status

    def _run_stage(self, stage: Stage) -> None:
        """Run `stage` (on this rank, if it runs here) and, on rank 0, record its outputs."""
        lead, name = self.ranks.lead, stage.name
        key = self.key(name) if lead else None
        if lead:
            self._record_path(name).unlink(missing_ok=True)
        self.log(f"[pipeline] {name}: running")
        start = time.perf_counter()
        outputs = stage.run() if lead or stage.everywhere else {}
        if not lead:
            return
        missing_out = [k for k, p in outputs.items() if p is None or not Path(p).is_file()]
        if missing_out:
            raise FileNotFoundError(f"it did not write its outputs {missing_out}")
        recorded = self._outputs(stage, outputs)
        record = {"stage": name, "key": key, "inputs": stage.inputs(), "outputs": recorded,
                  "seconds": round(time.perf_counter() - start, 3), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self.state_dir.mkdir(parents=True, exist_ok=True)
        write_atomically(self._record_path(name),
                         lambda f: f.write(json.dumps(record, indent=1, default=str).encode() + b"\n"))
        self.log(f"[pipeline] {name}: done in {record['seconds']:.1f} s")
