"""The AMX block search and the table it leaves: which :class:`~.amx_dense.AmxBlock` each linear layer's AMX
kernel uses above ``ONE_TILE_ROWS`` rows, up to ``SMALL_ROWS`` and above (:func:`~.amx_dense.block_rows`: searched
at 32 rows, and at 128 for a decoder step's kernels or 640 for an encoder's).

The blocks are few (:data:`~.amx_dense.BLOCKS`: six shapes that fit the eight tile registers, two orders), so the
search measures every one that fits a layer rather than sampling: each is compiled at each of the layer's row
counts, checked against NumPy and timed in rounds over all layers and blocks, the order reversed
every other round, each time the best of its repeats (as :func:`.tune.confirm` re-times the VNNI tiles). Each is
timed on one thread (a translator of one-thread replicas, the fastest layout on 2 vCPUs) and on all of them (one
replica): the best block differs (the reference model's 256 x 1024 layer at 32 rows: 2 x 2 tiles on one thread, 1
x 2 on two, which gives the second thread blocks), so a layer keeps the block of least time relative to the best
at each thread count, summed. The table is ``amx_blocks.json`` in the target's database folder
(``schedules/tuned/x86-amx/`` ships one); layers it lacks get :func:`~.amx_dense.default_block`.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import tvm
from tqdm import tqdm

from int8mt.errors import UserError
from int8mt.runtime.bundle import set_thread_count
from int8mt.targets import host_cpu_name

from .amx_dense import BLOCKS, ONE_TILE_ROWS, AmxBlock, default_block
from .database import DenseTask
from .int8_dense import default_tiles, padded, scheduled_int8_dense

BLOCKS_FILE = "amx_blocks.json"
SEARCH_ROUNDS = 5

BlockTable = dict[tuple[int, int, int], AmxBlock]  # (n, k, rows) of a tuning task -> its block
BlockTimes = dict[int, dict[AmxBlock, float]]  # threads -> block -> seconds


def candidate_blocks(task: DenseTask) -> list[AmxBlock]:
    """The blocks of the design space that fit ``task``'s padded columns."""
    np_, _ = padded(task.n, task.k, task.dot)
    return [block for block in BLOCKS if block.fits(np_)]


def search_blocks(tasks: list[DenseTask], target: tvm.target.Target, runner, rounds: int = SEARCH_ROUNDS,
                  log: Callable[[str], None] | None = None) -> dict[DenseTask, BlockTimes]:
    """Seconds of every fitting block of every task (AMX family, more than ``ONE_TILE_ROWS`` rows) on one thread
    and on all of this process's CPUs, the least of ``rounds`` rounds, on ``runner`` (a
    :class:`~.measure.CheckedRunner` of this machine); a block whose kernel disagrees with NumPy is an error."""
    timers = []
    for task in tasks:
        if not task.dot.amx_tiles or task.rows <= ONE_TILE_ROWS:
            raise ValueError(f"{task.name}: AMX blocks are searched for AMX kernels of more than {ONE_TILE_ROWS} rows")
        for block in candidate_blocks(task):
            # (static rows: only this block runs, whichever of the two it is for)
            tiles = replace(default_tiles(task.n, task.k, task.dot), amx=block, amx_small=block)
            kernel = scheduled_int8_dense(task.n, task.k, tiles, task.dot, task.rows)
            module = runner.load(tvm.compile(tvm.IRModule({"main": kernel}), target=target))
            args = runner.checked_args(module, ((task.rows, task.k), (), (), (task.rows, task.n)))
            if args is None:
                raise RuntimeError(f"{task.name} with {block.label} disagrees with NumPy")
            timers.append((task, block, runner.timer(module), args))
    cpus = len(os.sched_getaffinity(0))
    seconds: dict[DenseTask, BlockTimes] = {task: {threads: {} for threads in sorted({1, cpus})} for task in tasks}
    try:
        for round_ in tqdm(range(rounds), desc="timing AMX blocks", unit="round"):
            for threads in sorted({1, cpus}):
                set_thread_count(threads)  # (the pool of this thread, which time_evaluator runs on)
                for task, block, timer, args in timers if round_ % 2 == 0 else reversed(timers):
                    best = min(float(t) for t in timer(*args).results)
                    seconds[task][threads][block] = min(best, seconds[task][threads].get(block, best))
    finally:
        set_thread_count(cpus)
    if log is not None:
        for task, times in seconds.items():
            block, default = best_block(times), default_block(padded(task.n, task.k, task.dot)[0])
            log(f"{task.name}: {block.label}, " + ", ".join(
                f"{threads} thread{'s' if threads > 1 else ''} {by[block] * 1e6:.1f} us (default {by[default] * 1e6:.1f})"
                for threads, by in times.items()))
    return seconds


def best_block(times: BlockTimes) -> AmxBlock:
    """The block of least time relative to the fastest at each thread count, summed over them."""
    fastest = {threads: min(by.values()) for threads, by in times.items()}
    blocks = next(iter(times.values()))
    return min(blocks, key=lambda b: sum(by[b] / fastest[threads] for threads, by in times.items()))


def write_blocks(folder: Path, seconds: dict[DenseTask, BlockTimes]) -> Path:
    """Each task's :func:`best_block` (with every block's microseconds per thread count) into ``folder``'s table,
    kept beside the table's other layers; returns its path."""
    path = Path(folder) / BLOCKS_FILE
    entries = {(e["n"], e["k"], e["rows"]): e for e in _read(path)["kernels"]} if path.is_file() else {}
    for task, times in seconds.items():
        block = best_block(times)
        entries[(task.n, task.k, task.rows)] = {
            "n": task.n, "k": task.k, "rows": task.rows, "block": block.to_dict(), "label": block.label,
            "us": {str(threads): {b.label: round(s * 1e6, 2) for b, s in sorted(by.items(), key=lambda item: item[1])}
                   for threads, by in times.items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    table = {"cpu": host_cpu_name(), "kernels": [entries[key] for key in sorted(entries)]}
    path.write_text(json.dumps(table, indent=1) + "\n")
    return path


def load_blocks(folder: Path | None) -> BlockTable:
    """The block table in ``folder`` (empty where there is none)."""
    path = Path(folder) / BLOCKS_FILE if folder is not None else None
    if path is None or not path.is_file():
        return {}
    kernels = _read(path)["kernels"]
    try:
        return {(int(e["n"]), int(e["k"]), int(e["rows"])): AmxBlock(**e["block"]) for e in kernels}
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"{path} is not an AMX block table ({err}); run `int8mt tune --target x86-amx` again or "
                        "delete it") from None


def _read(path: Path) -> dict:
    try:
        table = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not an AMX block table ({err}); run `int8mt tune --target x86-amx` again or "
                        "delete it") from None
    if not isinstance(table, dict) or not isinstance(table.get("kernels"), list):
        raise UserError(f"{path} is not an AMX block table (no list of kernels); run `int8mt tune --target x86-amx` "
                        "again or delete it")
    return table
