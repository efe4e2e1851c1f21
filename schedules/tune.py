"""Tune int8 dense kernels with MetaSchedule: our design space, evolutionary search guided by the XGBoost
cost model, the in-process builder/runner of :mod:`.measure`, and a JSON database that resumes.

Each task's design space is ``schedule_int8_dense(sch, tiles=None)``: row tile (categorical), column and
reduction tiles (perfect tiles, which MetaSchedule's tile-size mutator explores); a candidate whose register tile
would not fit the vector registers is rejected before it is built (:func:`.int8_dense.fits_registers`). A task
that already has ``trials`` records in the database is skipped; one with fewer gets the difference, its earlier
records seeding the search. A time budget stops all tasks after the batch that crosses it.

Then :func:`confirm` re-times each task's few best distinct tiles side by side, in rounds over all tasks:
on this shared machine a single measurement can be 1.3-3x off, and without it the tuner kept lucky
candidates (``256 x 1024`` at 640 rows: 3x64 tiles, 778 GOPS in a quiet benchmark, where 6x64 tiles gave 916).
"""
from __future__ import annotations

import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import tvm
from tqdm import tqdm
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback
from tvm.s_tir.meta_schedule.postproc import PyPostproc

from int8mt.errors import UserError
from int8mt.targets import TargetPreset, host_arch

from .database import DenseTask, TuningDatabase
from .int8_dense import DenseTiles, fits_registers, schedule_int8_dense, scheduled_int8_dense, tiles_from_trace
from .intrin import Int8Dot
from .measure import CheckedRunner, InProcessBuilder
from .rpc import RPCTracker

CONFIRM_CANDIDATES, CONFIRM_ROUNDS = 4, 3
POPULATION = 64  # the evolutionary search's population per task


@dataclass
class TaskReport:
    """What tuning did for one task in this run."""

    task: DenseTask
    trials_before: int
    trials: int = 0
    build_failures: int = 0
    run_failures: int = 0
    best_seconds: float | None = None
    errors: list[str] = field(default_factory=list)

    @property
    def gops(self) -> float | None:
        return self.task.ops / self.best_seconds / 1e9 if self.best_seconds else None

    def to_dict(self) -> dict:
        return {"task": self.task.name, "n": self.task.n, "k": self.task.k, "rows": self.task.rows,
                "trials_before": self.trials_before, "trials": self.trials, "build_failures": self.build_failures,
                "run_failures": self.run_failures, "best_seconds": self.best_seconds, "gops": self.gops,
                "errors": self.errors[:3]}


@derived_object
class _Progress(PyMeasureCallback):
    """Counts trials and failures per task, updates the progress bar, enforces the time budget."""

    def __init__(self, reports: list[TaskReport], bar: tqdm, deadline: float | None) -> None:
        super().__init__()
        self.reports, self.bar, self.deadline = reports, bar, deadline

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
        report = self.reports[task_id]
        for built, ran in zip(builder_results, runner_results):
            report.trials += 1
            if built.error_msg:
                report.build_failures += 1
                report.errors.append(built.error_msg.splitlines()[0])
            elif ran.error_msg:
                report.run_failures += 1
                report.errors.append(ran.error_msg.splitlines()[0])
            else:
                secs = sum(float(s) for s in ran.run_secs) / len(ran.run_secs)
                report.best_seconds = min(secs, report.best_seconds or secs)
        self.bar.update(len(builder_results))
        best = f"{report.gops:.0f} GOPS" if report.gops else "-"
        self.bar.set_postfix_str(f"{report.task.name} {report.trials_before + report.trials} trials, best {best}")
        if self.deadline is not None and time.time() > self.deadline:
            for i in range(len(self.reports)):
                task_scheduler.terminate_task(i)


@dataclass
class Measurement:
    """Where candidates run: here, or on a server of ``tracker`` (a board), linked with ``fcompile`` (its
    architecture's cross compiler where it is not this machine's). One session serves tuning and confirmation:
    a second request to a tracker whose only server is busy would wait for the first to end."""

    tracker: RPCTracker | None = None
    fcompile: Callable | None = None
    _session: object = field(default=None, init=False, repr=False)

    @classmethod
    def for_preset(cls, preset: TargetPreset, tracker: RPCTracker | None, doing: str) -> Measurement:
        """Where ``preset``'s kernels are measured for ``doing`` (e.g. "tune"): here, or on the board of
        ``tracker``, which must answer now. A preset of another architecture needs a board."""
        if tracker is None and preset.arch != host_arch():
            raise UserError(f"{preset.name} kernels are {preset.arch} code, which this {host_arch()} machine cannot "
                            f"run: {doing} them on a board through a TVM RPC tracker, --rpc HOST:PORT:KEY "
                            "(docs/targets.md)")
        if tracker is None:
            return cls()
        from int8mt.compiler.cross import library_linker

        tracker.check()
        return cls(tracker, library_linker(preset))

    def runner(self, dot: Int8Dot) -> CheckedRunner:
        if self.tracker is not None and self._session is None:
            self._session = self.tracker.connect()
        return CheckedRunner(dot, session=self._session, fcompile=self.fcompile)


STOCK_INTRINSICS = "tvm.s_tir.tensor_intrin"


@contextmanager
def _without_stock_intrinsics() -> Iterator[None]:
    """``TuneContext`` imports TVM's stock tensor intrinsics, which register hundreds of them on import (40-90 s
    here); our design spaces use only ours (:mod:`.intrin`), so the import is answered by an empty module for the
    while, unless the real one is already there."""
    if STOCK_INTRINSICS in sys.modules:
        yield
        return
    sys.modules[STOCK_INTRINSICS] = types.ModuleType(STOCK_INTRINSICS)
    try:
        yield
    finally:
        del sys.modules[STOCK_INTRINSICS]


def tune(tasks: list[DenseTask], target: tvm.target.Target, database: TuningDatabase, trials: int,
         budget_s: float | None = None, trials_per_iter: int = 16, seed: int = 0,
         measurement: Measurement | None = None) -> list[TaskReport]:
    """Tune each task up to ``trials`` measured candidates in all (database records count); the tasks are of
    one dot-product family (one target)."""
    families = {task.family for task in tasks}
    if len(families) > 1:
        raise ValueError(f"tasks of several dot-product families ({', '.join(sorted(families))}): "
                         "tune one target at a time")
    reports, contexts = [], []
    population = min(POPULATION, max(16, 4 * trials))  # a short run need not breed a full population first
    for task in tasks:
        report = TaskReport(task, trials_before=len(database.records(task)))
        reports.append(report)
        if report.trials_before < trials:
            with _without_stock_intrinsics():
                contexts.append(_context(task, target, seed, population))
    pending = [r for r in reports if r.trials_before < trials]
    deadline = time.time() + budget_s if budget_s else None
    if not pending:
        return reports
    measurement = measurement or Measurement()
    runner = measurement.runner(tasks[0].dot)
    total = sum(trials - r.trials_before for r in pending)
    with tempfile.TemporaryDirectory() as folder, tqdm(total=total, desc="tuning", unit="trial") as bar:
        for remaining in sorted({trials - r.trials_before for r in pending}, reverse=True):
            group = [i for i, r in enumerate(pending) if trials - r.trials_before == remaining]
            if deadline is not None and time.time() > deadline:
                break
            ms.task_scheduler.GradientBased(seed=seed).tune(
                tasks=[contexts[i] for i in group], task_weights=[1.0] * len(group),
                max_trials_global=remaining * len(group), max_trials_per_task=remaining,
                num_trials_per_iter=trials_per_iter, runner=runner,
                builder=InProcessBuilder(Path(folder) if measurement.tracker else None, measurement.fcompile),
                measure_callbacks=[ms.measure_callback.AddToDatabase(), ms.measure_callback.UpdateCostModel(),
                                   _Progress([pending[i] for i in group], bar, deadline)],
                database=database.db, cost_model=ms.cost_model.XGBModel(num_tuning_cores=2))
    return reports


@derived_object
class _FitsRegisters(PyPostproc):
    """Rejects a candidate whose register tile does not fit the dot product's vector registers (its accumulators
    would spill: never the fastest, and a measurement lost). The design space samples rows and columns
    independently, so this bound on their product is checked on each sampled or mutated candidate."""

    def __init__(self, dot: Int8Dot) -> None:
        super().__init__()
        self.dot = dot

    def _initialize_with_tune_context(self, context: ms.TuneContext) -> None:
        pass

    def apply(self, sch: tvm.s_tir.Schedule) -> bool:
        return fits_registers(tiles_from_trace(sch.trace, self.dot), self.dot)

    def clone(self) -> _FitsRegisters:
        return _FitsRegisters(self.dot)


def _context(task: DenseTask, target: tvm.target.Target, seed: int, population: int) -> ms.TuneContext:
    """MetaSchedule's task for ``task``: our design space (tiles that fit the registers), evolutionary search,
    tile-size mutations only."""
    return ms.TuneContext(
        mod=task.workload(), target=target, task_name=task.name, rand_state=seed, num_threads=2,
        space_generator=ms.space_generator.ScheduleFn(
            lambda sch, dot=task.dot: schedule_int8_dense(sch, None, dot), sch_rules=[],
            postprocs=[_FitsRegisters(task.dot)], mutator_probs={ms.mutator.MutateTileSize(): 1.0}),
        search_strategy=ms.search_strategy.EvolutionarySearch(population_size=population,
                                                              init_min_unmeasured=min(16, population)))


def confirm(tasks: list[DenseTask], target: tvm.target.Target, database: TuningDatabase,
            candidates: int = CONFIRM_CANDIDATES, rounds: int = CONFIRM_ROUNDS,
            measurement: Measurement | None = None) -> dict[DenseTask, DenseTiles]:
    """Re-time the ``candidates`` fastest distinct tiles of every task, ``rounds`` times each in rounds over all
    of them (each time the best of 5 repeats), and record each task's winner (its best time) in the database."""
    timers: list[tuple[DenseTask, DenseTiles, object, list]] = []
    measurement = measurement or Measurement()
    runners: dict[str, CheckedRunner] = {}
    for task in tasks:
        if task.family not in runners:
            runners[task.family] = measurement.runner(task.dot)
        runner = runners[task.family]
        for tiles, _ in database.candidates(task, candidates):
            kernel = scheduled_int8_dense(task.n, task.k, tiles, task.dot, task.rows)
            module = runner.load(tvm.compile(tvm.IRModule({"main": kernel}), target=target))
            args = runner.checked_args(module, ((task.rows, task.k), (), (), (task.rows, task.n)))
            if args is None:
                raise RuntimeError(f"{task.name} with tiles {tiles} disagrees with NumPy: the database holds a "
                                   "broken record")
            timers.append((task, tiles, runner.timer(module), args))
    best: dict[DenseTask, tuple[float, DenseTiles]] = {}
    for _ in tqdm(range(rounds), desc="confirming the best tiles", unit="round"):
        for task, tiles, timer, args in timers:
            seconds = min(float(t) for t in timer(*args).results)
            if task not in best or seconds < best[task][0]:
                best[task] = (seconds, tiles)
    for task, (seconds, tiles) in best.items():
        database.confirm(task, tiles, seconds)
    return {task: tiles for task, (_, tiles) in best.items()}
