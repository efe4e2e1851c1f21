"""Tune the int8 kernels of a model (or bundle) for a target preset into a tuning database."""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from int8mt.errors import UserError
from int8mt.runtime.bundle import MANIFEST_FILE, REPORT_FILE
from int8mt.schedules.database import DenseTask, bench_tasks, shipped_database
from int8mt.schedules.rpc import RPCTracker
from int8mt.schedules.tile_label import tile_label
from int8mt.targets import TargetPreset, amx_permission, missing_features

LOG_FILE = "tuning-log.json"  # per run: what was tuned, trials, failures, best GOPS


@dataclass(frozen=True)
class TuneArgs:
    source: Path  # a model directory or a bundle
    preset: TargetPreset
    database: Path | None  # None: the folders shipped in the package
    trials: int
    budget_minutes: float
    bench_shapes: bool = False  # also tune every shape of `int8mt bench kernels`
    untuned_only: bool = False  # a bundle's kernels that were built with default tiles, not all of them
    rpc: RPCTracker | None = None  # measure on a board through this tracker, not here
    fp32: bool = False  # a model directory's FP32 linear layers (float32 kernels), not its int8 ones


REPORT_KERNELS = ("kernels", "float_kernels")  # a build report's int8 and float32 dense kernels


def dense_tasks(source: Path, preset: TargetPreset, untuned_only: bool = False, fp32: bool = False
                ) -> list[DenseTask]:
    """The dense kernels of a bundle (from its build report: int8 ones and the float32 ones of FP32 layers; with
    ``untuned_only``, those it was built with default tiles for) or of a model directory (through the compile
    pipeline's first phases: quantized with run-time ranges, which give the same shapes as any other range
    method; ``fp32``: compiled as FP32), as tasks of ``preset``'s dot products."""
    source = Path(source)
    is_bundle = (source / MANIFEST_FILE).is_file()
    if untuned_only and not is_bundle:
        raise UserError(f"--untuned-only picks kernels from a bundle's build report; {source} is not a bundle")
    if is_bundle:
        if fp32:
            raise UserError(f"{source} is a bundle: its own kernels are tuned, int8 and float32 alike; --fp32 picks "
                             "the FP32 layers of a model directory")
        report = json.loads((source / REPORT_FILE).read_text()) if (source / REPORT_FILE).is_file() else {}
        families = dict(zip(REPORT_KERNELS, (preset.int8_dot, preset.float_dot)))
        tasks = {DenseTask(k["n"], k["k"], k["rows_tuned_for"], families[key]) for key in REPORT_KERNELS
                 for k in report.get(key, ()) if families[key] is not None and not (untuned_only and k["tuned"])}
        if not any(report.get(key) for key in REPORT_KERNELS):
            raise UserError(f"bundle {source} has no dense kernels of our own to tune; compile it for a CPU preset "
                             "(int8mt targets), or pass the model directory")
        return sorted(tasks)
    from int8mt.compiler.pipeline import CompileOptions, import_model, integer_graph
    from int8mt.compiler.quant_report import dense_kernel_report
    from int8mt.model.checkpoint import load_model_dir
    from int8mt.quant.checkpoint import quantized_model
    from int8mt.quant.config import QuantConfig
    from int8mt.schedules.database import TileChooser

    family = preset.float_dot if fp32 else preset.int8_dot
    print(f"extracting {'float32' if fp32 else 'int8'} kernels of {source}", file=sys.stderr)
    qcfg = None if fp32 else QuantConfig(ranges="runtime", runtime_attention="int8")  # every matmul int8
    model = load_model_dir(source) if fp32 else quantized_model(source, qcfg, None)
    chooser = TileChooser(None, family)
    options = (CompileOptions(preset, None, float_tiles=chooser) if fp32
               else CompileOptions(preset, qcfg, chooser, float_tiles=TileChooser(None, preset.float_dot)))
    mod = integer_graph(import_model(model, options), options)
    return sorted({DenseTask(k["n"], k["k"], k["rows_tuned_for"], family) for k in dense_kernel_report(mod, chooser)})


def tune(args: TuneArgs) -> list[dict]:
    """Tune every kernel of ``args.source`` (and the benchmark shapes if asked); returns one row per task and
    appends the run to the database's tuning log. A preset that takes its tiles from another (x86-amx: the VNNI
    kernel of its few-rows branch) tunes that one's kernels; AMX kernels then get their block search."""
    if args.database is not None and args.database.exists() and not args.database.is_dir():
        raise UserError(f"--db {args.database} is a file, not a folder; name the database's folder")
    if args.preset.device == "cuda":
        if args.fp32:
            raise UserError(f"{args.preset.name} runs FP32 layers with TVM's GPU schedules, not kernels of ours: "
                             "there is nothing to tune with --fp32; tune its int8 kernels without it")
        return tune_cuda(args)
    if (args.preset.float_dot if args.fp32 else args.preset.int8_dot) is None:
        kind = "float32 dense" if args.fp32 else "int8 dot-product"
        raise UserError(f"target preset {args.preset.name} has no {kind} kernels to tune; `int8mt targets` lists "
                         "the presets that have")
    if args.trials < 1 or args.budget_minutes <= 0:
        raise UserError("--trials must be at least 1 and --budget-minutes positive")
    preset, tuned = args.preset, args.preset.tuned_preset
    folder = args.database or shipped_database(tuned.name)
    if preset.tiles_from:  # what its tiles tile is that preset's kernel: tune that one
        print(f"{preset.name} takes its tiles from {tuned.name}: tuning {tuned.name}'s kernels into {folder}",
              file=sys.stderr)
    os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))  # measure on every CPU
    from int8mt.schedules.tune import Measurement

    # before the kernels are extracted: a wrong address or key, or AMX tiles Linux refuses, are known at once
    measurement = Measurement.for_preset(tuned, args.rpc, "tune")
    amx = None if args.fp32 else _amx_blocks_measurement(preset, args.rpc)
    tasks = dense_tasks(args.source, tuned, args.untuned_only, args.fp32)
    if not tasks:
        raise UserError(f"every dense kernel of {args.source} was built with tuned tiles: nothing to tune")
    if args.bench_shapes:
        tasks = sorted(set(tasks) | {b for f in {t.family for t in tasks} for b in bench_tasks(f)})
    import tvm

    from int8mt.schedules.database import TuningDatabase
    from int8mt.schedules.tune import confirm
    from int8mt.schedules.tune import tune as tune_tasks

    database = TuningDatabase(folder, create=True)
    where = f" on the board of tracker {args.rpc}" if args.rpc else ""
    print(f"tuning {len(tasks)} kernels for {tuned.name}{where}, {args.trials} trials each, database {folder}",
          file=sys.stderr)
    t0 = time.time()
    target = tvm.target.Target(tuned.target)
    deadline = time.time() + args.budget_minutes * 60
    try:
        reports = []
        for group in sorted({t.family for t in tasks}):  # one dot product per tuning run
            reports += tune_tasks([t for t in tasks if t.family == group], target, database, args.trials,
                                  budget_s=max(deadline - time.time(), 1), measurement=measurement)
        confirm(tasks, target, database, measurement=measurement)
        int8_tasks = [t for t in tasks if t.family == tuned.int8_dot]
        blocks = _search_amx_blocks(int8_tasks, preset, args.database, amx) if amx is not None and int8_tasks else {}
    except (KeyboardInterrupt, RuntimeError) as err:
        # MetaSchedule runs our callbacks from C++, which hands a Ctrl-C back as a RuntimeError naming it
        if isinstance(err, RuntimeError) and "KeyboardInterrupt" not in str(err):
            raise
        print(f"interrupted: {folder} keeps every candidate measured so far; the same command resumes "
              "from there", file=sys.stderr)
        raise KeyboardInterrupt from None
    rows = []
    for report in reports:
        best = database.best(report.task)
        tiles = best[0] if best else None
        amx = blocks.get((report.task.n, report.task.k, report.task.rows))
        if tiles is not None and amx is not None:
            tiles = replace(tiles, amx_small=amx[0], amx=amx[1])
        rows.append({**report.to_dict(), "block": [report.task.dot.lanes, report.task.dot.reduce],
                     "best_tiles": tiles.to_dict() if tiles else None,
                     "best_gops_all_runs": report.task.ops / best[1] / 1e9 if best else None})
    log = folder / LOG_FILE
    runs = json.loads(log.read_text()) if log.is_file() else []
    runs.append({"source": str(args.source), "preset": preset.name, "trials": args.trials,
                 "measured_on": f"rpc {args.rpc}" if args.rpc else "this machine",
                 "seconds": round(time.time() - t0, 1), "tasks": rows})
    log.write_text(json.dumps(runs, indent=1) + "\n")
    return rows


def _amx_blocks_measurement(preset: TargetPreset, rpc: RPCTracker | None):
    """The runner that times ``preset``'s AMX blocks on this machine, or None where its kernels have no AMX tiles;
    a clear error where this machine cannot run them."""
    from int8mt.schedules.intrin import int8_dot

    dot = int8_dot(preset.int8_dot)
    if not dot.amx_tiles:
        return None
    if rpc is not None:
        raise UserError(f"{preset.name}'s AMX blocks are timed on this machine; tune on the AMX machine itself, "
                        "without --rpc")
    missing = missing_features(preset)
    refused = amx_permission() if not missing else None
    if missing or refused:
        raise UserError(f"tuning {preset.name} times its AMX kernels, which this machine cannot run "
                        f"({'it lacks ' + ', '.join(missing) if missing else refused}); tune on a CPU with AMX")
    from int8mt.schedules.tune import Measurement

    return Measurement().runner(dot)


def _search_amx_blocks(tasks: list[DenseTask], preset: TargetPreset, database: Path | None, runner) -> dict:
    """Every AMX block of every task's layer at the row counts of its two blocks, timed
    (:mod:`~int8mt.schedules.amx_blocks`); the best per layer and row count into the block table of ``database``
    (None: the one shipped for ``preset``). Returns ``{(n, k, rows of a task): (small block, large block)}``."""
    import tvm

    from int8mt.schedules.amx_blocks import best_block, search_blocks, write_blocks
    from int8mt.schedules.amx_dense import block_rows

    amx_tasks = sorted({DenseTask(t.n, t.k, rows, preset.int8_dot) for t in tasks for rows in block_rows(t.rows)})
    seconds = search_blocks(amx_tasks, tvm.target.Target(preset.target), runner,
                            log=lambda line: print(line, file=sys.stderr))
    path = write_blocks(database or shipped_database(preset.name), seconds)
    print(f"AMX blocks of {len(amx_tasks)} kernels into {path}", file=sys.stderr)
    best = {(t.n, t.k, t.rows): best_block(times) for t, times in seconds.items()}
    return {(t.n, t.k, t.rows): tuple(best[(t.n, t.k, rows)] for rows in block_rows(t.rows)) for t in tasks}


def tune_cuda(args: TuneArgs) -> list[dict]:
    """The tile search of a CUDA preset on this machine's GPU (:mod:`int8mt.schedules.cuda_tiles`): every
    candidate tile for every linear layer of the model at an encoder's and a beam-4 step's rows, and every few-rows
    candidate at few rows; the best exact tiles per shape go to the database folder's ``cuda_tiles.json``."""
    import tempfile

    from int8mt.model.checkpoint import model_config
    from int8mt.schedules.cuda_tiles import (FEW_TILE_ROWS, TILE_ROWS, build_candidates, measure_candidates,
                                             measuring_gpu, write_tiles)
    from int8mt.schedules.database import BENCH_MODELS, linear_shapes

    if args.rpc is not None:
        raise UserError("--rpc measures on a CPU board; a CUDA preset is tuned on a machine with its GPU")
    device = measuring_gpu(args.preset, f"tuning {args.preset.name}",
                           "Without a GPU where the model compiles: `python scripts/cuda_gpu_check.py prepare DIR "
                           "--tiles` here, `run DIR --out R` on the GPU machine, then `tiles R/results.json --out DB` "
                           "(docs/cuda.md)")
    if (Path(args.source) / MANIFEST_FILE).is_file():
        raise UserError(f"{args.source} is a bundle; a CUDA preset is tuned from the model directory")
    cfg = model_config(Path(args.source))
    dims = {(cfg.d_model, cfg.ffn_dim, cfg.vocab_size)} | (set(BENCH_MODELS.values()) if args.bench_shapes else set())
    shapes = sorted({(rows, k, n) for d in dims for n, k in linear_shapes(*d) for rows in TILE_ROWS + FEW_TILE_ROWS})
    t0 = time.time()
    print(f"tile search for {args.preset.name} on {device.device_name}: {len(shapes)} shapes", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="int8mt-cuda-tiles-") as work:
        build_candidates(args.preset, shapes, Path(work))
        gpu_name, rows = measure_candidates(Path(work))
    path = write_tiles(args.database or shipped_database(args.preset.name), rows, gpu_name)
    print(f"wrote {path} in {time.time() - t0:.0f} s", file=sys.stderr)
    return rows


def format_rows(rows: list[dict]) -> str:
    if rows and "tile" in rows[0]:  # a CUDA tile search (a CPU run reports "best_tiles")
        return _format_tile_rows(rows)
    header = "| kernel (n x k, rows) | trials run | build failures | run failures | best GOPS | tiles |"
    lines = [header, "|---|---|---|---|---|---|"]
    for r in rows:
        tiles = tile_label(**r["best_tiles"], block=r["block"]) if r["best_tiles"] else "-"
        gops = f"{r['best_gops_all_runs']:.0f}" if r["best_gops_all_runs"] else "-"
        lines.append(f"| {r['n']} x {r['k']}, {r['rows']} | {r['trials']} (had {r['trials_before']}) | "
                     f"{r['build_failures']} | {r['run_failures']} | {gops} | {tiles} |")
    trials = sum(r["trials"] for r in rows)
    failed = sum(r["build_failures"] + r["run_failures"] for r in rows)
    lines.append(f"\n{trials} trials, {failed} failed ({100 * failed / max(trials, 1):.1f} %)")
    return "\n".join(lines)


def _format_tile_rows(rows: list[dict]) -> str:
    from int8mt.schedules.cuda_tiles import best_tiles

    lines = ["| K x N | best tile | µs at each row count | candidates failed |", "|---|---|---|---|"]
    for (k, n), entry in sorted(best_tiles(rows).items()):
        failed = sum(1 for r in rows if (r["k"], r["n"]) == (k, n) and ("error" in r or not r.get("exact")))
        for tile in (entry, entry.get("few")):
            if tile is not None:
                times = ", ".join(f"{us} at {r}" for r, us in sorted(tile["us"].items(), key=lambda kv: int(kv[0])))
                lines.append(f"| {k} x {n} | {tile['label']} | {times} | {failed} |")
    return "\n".join(lines)
