"""Tuning tasks and the tuning database of one target.

A task is one dense kernel shape (``n`` x ``k`` weight; int8, or float32 for FP32 linear layers) at a
representative row count: kernels run
with any number of rows, but MetaSchedule measures static shapes, so each kernel is tuned at the row
bucket its call site lives in and the tiles found apply to every row count (``ENTRY_ROWS``).

The database is MetaSchedule's JSON database: two append-only JSON-lines files in one folder per target.
Each measured candidate is appended as it finishes, so an interrupted tuning run loses at most the batch
in flight and the next run resumes from what is there. Beside them, ``confirmed.json`` holds each task's
winner of the confirmation rounds (:func:`.tune.confirm`): a candidate timed once can look fastest because
the machine was quiet just then, so the few best are re-timed side by side and the winner is kept.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import tvm
import tvm_ffi
from tvm.s_tir.meta_schedule.database import JSONDatabase, TuningRecord

from int8mt.errors import UserError

from .amx_dense import AmxBlock, block_rows
from .int8_dense import DenseTiles, default_tiles, dense_kind, fits_registers, int8_dense, tiles_from_trace
from .intrin import Int8Dot, dense_dot

ROW_BUCKETS = (32, 640)  # rows a decoder step (32 sentences) and an encoder call (32 x 20 tokens) see
ENTRY_ROWS = {"encode": 640, "decode_step": 32}  # the row bucket of each entry point's matmuls
DATABASE_FILES = ("database_workload.json", "database_tuning_record.json")
CONFIRMED_FILE = "confirmed.json"
SCANNED_RECORDS = 512  # a task's fastest records read for its best distinct tiles
SHIPPED = Path(__file__).resolve().parent / "tuned"  # pre-tuned databases, one folder per target preset


def shipped_database(preset: str) -> Path:
    """The folder of the database shipped for the target preset ``preset``."""
    return SHIPPED / preset


def database_or_shipped(preset: str, folder: Path | None) -> Path | None:
    """``folder`` if given (it must hold a database when opened), else the one shipped for ``preset`` if
    there is one, else None (default tiles)."""
    if folder is not None:
        return folder
    shipped = shipped_database(preset)
    return shipped if shipped.is_dir() else None


# Linear-layer shapes of the kernel benchmark's models: (d_model, ffn_dim, vocabulary).
BENCH_MODELS = {"reference": (256, 1024, 8000), "transformer-base": (512, 2048, 32000)}


def linear_shapes(d_model: int, ffn_dim: int, vocab: int) -> list[tuple[int, int]]:
    """The distinct (n, k) weights of a Transformer's linear layers: attention projections, both FFN
    matmuls and the logits projection."""
    return [(d_model, d_model), (ffn_dim, d_model), (d_model, ffn_dim), (vocab, d_model)]


def bench_tasks(family: str) -> list[DenseTask]:
    """Every kernel benchmark shape at every row bucket, for the dot-product ``family``."""
    return [DenseTask(n, k, rows, family) for dims in BENCH_MODELS.values() for n, k in linear_shapes(*dims)
            for rows in ROW_BUCKETS]


def row_bucket(rows: int) -> int:
    """The tuned row count closest to ``rows`` (by ratio)."""
    return min(ROW_BUCKETS, key=lambda b: max(b / rows, rows / b))


@dataclass(frozen=True, order=True)
class DenseTask:
    """One kernel to tune: an ``n`` x ``k`` weight applied to ``rows`` rows with the ``family`` dot product (an
    int8 one, or a float32 multiply-add)."""

    n: int
    k: int
    rows: int
    family: str

    @property
    def dot(self) -> Int8Dot:
        return dense_dot(self.family)

    @property
    def name(self) -> str:
        return f"{dense_kind(self.dot)}_n{self.n}_k{self.k}_m{self.rows}"

    @property
    def ops(self) -> int:
        return 2 * self.n * self.k * self.rows

    def workload(self) -> tvm.IRModule:
        """The static-shape kernel MetaSchedule tunes (and the key of its records)."""
        kernel = int8_dense(self.n, self.k, self.rows, self.dot)
        return tvm.IRModule({"main": kernel.with_attr("global_symbol", "main")})


class TuningDatabase:
    """The JSON tuning database in ``folder``; ``create`` makes it if missing, otherwise it must exist."""

    def __init__(self, folder: Path, create: bool = False) -> None:
        self.folder = Path(folder)
        missing = [f for f in DATABASE_FILES if not (self.folder / f).is_file()]
        if missing and not create:
            raise UserError(f"no tuning database in {self.folder} (missing {', '.join(missing)}); "
                             "create one with `int8mt tune`, or compile without --db")
        self.folder.mkdir(parents=True, exist_ok=True)
        for name in DATABASE_FILES:
            _check_json_lines(self.folder / name)
        self.db = JSONDatabase(*(str(self.folder / f) for f in DATABASE_FILES), allow_missing=True)

    def records(self, task: DenseTask) -> list[TuningRecord]:
        """Every measured candidate of ``task`` (failed ones included)."""
        mod = task.workload()
        if not self.db.has_workload(mod):
            return []
        key = tvm_ffi.structural_hash(mod)
        return [r for r in self.db.get_all_tuning_records() if tvm_ffi.structural_hash(r.workload.mod) == key]

    def candidates(self, task: DenseTask, count: int) -> list[tuple[DenseTiles, float]]:
        """Up to ``count`` distinct tiles of ``task`` that fit the registers (:func:`fits_registers`: a database
        tuned without that bound may hold tiles that spill), fastest measured first, with
        their mean seconds."""
        mod = task.workload()
        if not self.db.has_workload(mod):
            return []
        found: dict[DenseTiles, float] = {}
        for record in self.db.get_top_k(self.db.commit_workload(mod), SCANNED_RECORDS):
            tiles = tiles_from_trace(record.trace, task.dot)
            if fits_registers(tiles, task.dot):
                secs = [float(s) for s in record.run_secs]
                found.setdefault(tiles, sum(secs) / len(secs))
                if len(found) == count:
                    break
        return list(found.items())

    def best(self, task: DenseTask) -> tuple[DenseTiles, float] | None:
        """The tiles of ``task`` that won its confirmation rounds, else its fastest measured ones, with their
        seconds (tiles that fit the registers only); None if it was not tuned."""
        confirmed = self.confirmed().get(task.name)
        if confirmed is not None and confirmed["family"] == task.family:
            tiles = DenseTiles(**confirmed["tiles"])
            if fits_registers(tiles, task.dot):
                return tiles, confirmed["seconds"]
        top = self.candidates(task, 1)
        return top[0] if top else None

    def confirmed(self) -> dict[str, dict]:
        path = self.folder / CONFIRMED_FILE
        if not path.is_file():
            return {}
        try:
            confirmed = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"{path} is corrupt ({err}); delete it and run `int8mt tune` again to confirm "
                             "the best tiles") from None
        if not isinstance(confirmed, dict):
            raise UserError(f"{path} is corrupt (not a mapping of kernels); delete it and run `int8mt tune` again")
        return confirmed

    def confirm(self, task: DenseTask, tiles: DenseTiles, seconds: float) -> None:
        """Record ``tiles`` as the winner of ``task``'s confirmation rounds."""
        confirmed = self.confirmed()
        confirmed[task.name] = {"family": task.family, "tiles": tiles.to_dict(), "seconds": seconds}
        (self.folder / CONFIRMED_FILE).write_text(json.dumps(confirmed, indent=1, sort_keys=True) + "\n")


def _check_json_lines(path: Path) -> None:
    """Every line of a JSON-lines database file parses; a torn last line (a killed tuning run's half-written
    record: no newline at its end) is removed with a warning, any other bad line is an error naming it."""
    if not path.is_file():
        return
    data = path.read_bytes()
    lines = data.split(b"\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            if number == len(lines) and not data.endswith(b"\n"):
                print(f"warning: {path}: line {number} was cut short (an interrupted tuning run); it is removed",
                      file=sys.stderr)
                path.write_bytes(data[:len(data) - len(line)])
                return
            raise UserError(f"{path}: line {number} is not valid JSON; the tuning database is damaged: restore "
                             "it, or delete that line (its one record is lost)") from None


def chosen_tiles(database: TuningDatabase | None, task: DenseTask) -> tuple[DenseTiles, bool]:
    """The database's best tiles for ``task`` and True, or the default tiles and False."""
    found = database.best(task) if database is not None else None
    return (found[0], True) if found else (default_tiles(task.n, task.k, task.dot), False)


@dataclass(frozen=True)
class TileChoice:
    """The tiles chosen for one kernel of one entry function, and whether a tuning run found them."""

    task: DenseTask
    tiles: DenseTiles
    tuned: bool


class TileChooser:
    """``tiles_for(n, k, function)`` for :class:`~int8mt.compiler.passes.PackDense`: the database's
    best tiles for the function's row bucket, else ``fallback``'s, else the defaults (:meth:`choice` says
    which); for AMX kernels (``amx_blocks`` given: their block table) with the table's blocks for that bucket
    (:func:`~.amx_dense.block_rows`), else the default block (then not tuned)."""

    def __init__(self, database: TuningDatabase | None, family: str, fallback: TuningDatabase | None = None,
                 amx_blocks: dict[tuple[int, int, int], AmxBlock] | None = None) -> None:
        self.database, self.family, self.fallback, self.amx_blocks = database, family, fallback, amx_blocks
        self._choices: dict[DenseTask, TileChoice] = {}  # the database is read once per kernel

    def choice(self, n: int, k: int, function: str) -> TileChoice:
        """The tiles of the ``n`` x ``k`` kernel of entry function ``function`` (tuned for its row bucket)."""
        return self.task_choice(DenseTask(n, k, ENTRY_ROWS.get(function, ROW_BUCKETS[-1]), self.family))

    def task_choice(self, task: DenseTask) -> TileChoice:
        """The tiles of ``task`` (of this chooser's family)."""
        if task not in self._choices:
            tiles, tuned = chosen_tiles(self.database, task)
            if not tuned and self.fallback is not None:
                tiles, tuned = chosen_tiles(self.fallback, task)
            if self.amx_blocks is not None:
                small, large = (self.amx_blocks.get((task.n, task.k, rows)) for rows in block_rows(task.rows))
                tiles = replace(tiles, amx=large, amx_small=small)
                tuned = tuned and small is not None and large is not None
            self._choices[task] = TileChoice(task, tiles, tuned)
        return self._choices[task]

    def __call__(self, n: int, k: int, function: str) -> DenseTiles:
        return self.choice(n, k, function).tiles
