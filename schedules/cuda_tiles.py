"""Tuned tiles of the CUDA int8 tensor-core matmul: a tile search measured on a GPU, and the table it leaves.

The design space is :class:`~.cuda_int8_matmul.MatmulTile` (block and warp tiles, K per stage, copy width,
pipeline stages); :data:`CANDIDATES` are the tiles tried at :data:`TILE_ROWS`, :data:`FEW_ROWS_CANDIDATES` those
tried at :data:`FEW_TILE_ROWS` (a layer's calls of up to ``FEW_ROWS`` rows run a kernel of their own, see
:mod:`.cuda_int8_matmul`). Each candidate is compiled for each linear-layer shape (K x N) at its row counts,
checked against NumPy (exact int32) and timed; for each shape the exact tile of least summed time is kept, and
the exact few-rows tile of least summed time at the few rows (the entry's ``few``). The table is
``cuda_tiles.json`` in the target's database folder (``schedules/tuned/cuda-sm90/`` ships one); shapes it lacks
get the architecture's default tile, and :data:`~.cuda_int8_matmul.FEW_ROWS_TILE` for few rows.

A search runs in two halves where the GPU machine cannot compile (``scripts/cuda_gpu_check.py prepare --tiles``
here, ``run`` there, ``tiles`` back here), or whole on a GPU machine with the compile extras (``int8mt tune
--target cuda-*``): both go through :func:`best_tiles`.
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from int8mt.errors import UserError

if TYPE_CHECKING:
    from int8mt.targets import TargetPreset

    from .cuda_int8_matmul import MatmulTile

TILES_FILE = "cuda_tiles.json"

# The tiles a search tries (MatmulTile fields): the portable one, 16-byte copies, pipelines of 2-4 stages (dynamic
# shared memory), then larger block tiles and more warps.
CANDIDATES: list[dict] = [
    dict(vector=4), dict(vector=16), dict(vector=16, stages=2), dict(vector=16, stages=2, k_frags=4),
    dict(vector=16, stages=3, k_frags=4),
    dict(vector=16, stages=2, frags_n=4, k_frags=4),
    dict(vector=16, stages=2, frags_m=4, k_frags=4),
    dict(vector=16, stages=2, frags_m=4, frags_n=4, k_frags=4),
    dict(vector=16, stages=3, frags_m=4, frags_n=4, k_frags=4),
    dict(vector=16, stages=2, frags_m=4, frags_n=4, k_frags=2),
    dict(vector=16, stages=4, frags_m=4, frags_n=4, k_frags=2),
    dict(vector=16, stages=2, warps_n=4, frags_m=4, frags_n=2, k_frags=4),
    dict(vector=16, stages=3, warps_n=4, frags_m=4, frags_n=2, k_frags=4),
    dict(vector=16, stages=2, warps_n=4, frags_m=4, frags_n=4, k_frags=4),
    dict(vector=16, stages=3, warps_n=4, frags_m=4, frags_n=4, k_frags=2),
    dict(vector=16, stages=2, warps_m=4, frags_m=4, frags_n=4, k_frags=2),
    dict(vector=16, stages=3, warps_m=4, warps_n=2, frags_m=2, frags_n=4, k_frags=4),
    dict(vector=16, stages=4, frags_m=4, frags_n=4, k_frags=4),
    dict(vector=16, stages=2, frags_m=4, frags_n=4, k_frags=8),
    dict(vector=16, stages=3, frags_m=4, frags_n=4, k_frags=8),
    dict(vector=16, stages=3, frags_m=2, frags_n=4, k_frags=4),
    dict(vector=16, stages=3, frags_m=4, frags_n=2, k_frags=8),
    dict(vector=16, stages=2, warps_m=4, frags_m=4, frags_n=4, k_frags=4),
    dict(vector=16, stages=3, warps_m=4, frags_m=4, frags_n=4, k_frags=4),
    dict(vector=16, stages=3, warps_n=4, frags_m=4, frags_n=4, k_frags=4),
    dict(vector=16, stages=3, warps_m=4, warps_n=4, k_frags=4),
    dict(vector=16, stages=2, warps_m=4, warps_n=4, frags_m=4, frags_n=4, k_frags=2),
]
TILE_ROWS = (128, 640)  # rows a linear layer is tuned at: a beam-4 decoder step and an encoder call, 32 sentences
# tiles of one warp row (16 or 32 rows) for a layer's calls of few rows, tried at FEW_TILE_ROWS
FEW_ROWS_CANDIDATES: list[dict] = [
    dict(warps_m=1, warps_n=4, frags_m=2, frags_n=1, k_frags=8, vector=16, stages=2),
    dict(warps_m=1, warps_n=4, frags_m=1, frags_n=1, k_frags=8, vector=16, stages=2),
    dict(warps_m=1, warps_n=4, frags_m=1, frags_n=2, k_frags=8, vector=16, stages=2),
    dict(warps_m=1, warps_n=4, frags_m=2, frags_n=2, k_frags=4, vector=16, stages=3),
    dict(warps_m=1, warps_n=2, frags_m=2, frags_n=1, k_frags=8, vector=16, stages=2),
    dict(warps_m=1, warps_n=8, frags_m=2, frags_n=1, k_frags=4, vector=16, stages=2),
]
FEW_TILE_ROWS = (4, 32)  # a beam-4 step of one sentence, a greedy step of 32
CHECKED_ROWS = (7, 100)  # rows each candidate is also checked at (padding to the tile), besides its own
CANDIDATES_FILE = "candidates.json"  # in a folder of built candidates: what each kernel is

TiledShapes = dict[tuple[int, int], "MatmulTile"]  # (K, N) of a linear layer -> its tile


def best_tiles(measurements: list[dict]) -> dict[tuple[int, int], dict]:
    """For each (K, N) of ``measurements`` (rows with ``k``, ``n``, ``rows``, ``tile`` (fields), ``exact``, ``ms``;
    ``error`` where it failed), the tile of least time summed over its row counts above ``FEW_ROWS`` among those
    exact at every one: ``{"tile": fields, "label": ..., "us": {rows: time}}``, with ``"few"`` the same for the
    row counts up to ``FEW_ROWS`` where the search measured those."""
    from .cuda_int8_matmul import FEW_ROWS

    best = _least_time([row for row in measurements if row["rows"] > FEW_ROWS])
    for shape, few in _least_time([row for row in measurements if row["rows"] <= FEW_ROWS]).items():
        if shape in best:
            best[shape]["few"] = few
    return best


def _least_time(measurements: list[dict]) -> dict[tuple[int, int], dict]:
    """:func:`best_tiles` over one group of row counts."""
    from .cuda_int8_matmul import MatmulTile

    times: dict[tuple[int, int], dict[str, dict]] = defaultdict(dict)
    failed: set[tuple[tuple[int, int], str]] = set()
    for row in measurements:
        shape, tile = (row["k"], row["n"]), MatmulTile(**row["tile"])
        if "error" in row or not row.get("exact"):
            failed.add((shape, tile.label))
            continue
        entry = times[shape].setdefault(tile.label, {"tile": asdict(tile), "label": tile.label, "us": {}})
        entry["us"][str(row["rows"])] = round(row["ms"] * 1e3, 2)
    best = {}
    for shape, entries in times.items():
        rows = {r for entry in entries.values() for r in entry["us"]}
        usable = [e for label, e in entries.items() if (shape, label) not in failed and set(e["us"]) == rows]
        if usable:
            best[shape] = min(usable, key=lambda e: sum(e["us"].values()))
    return best


def write_tiles(folder: Path, measurements: list[dict], gpu: str) -> Path:
    """The best tiles of ``measurements`` (see :func:`best_tiles`), measured on ``gpu``, as ``folder``'s table."""
    best = best_tiles(measurements)
    if not best:
        raise UserError("no tile computed every shape exactly: nothing to write")
    folder.mkdir(parents=True, exist_ok=True)
    table = {"gpu": gpu, "shapes": [{"k": k, "n": n, **entry} for (k, n), entry in sorted(best.items())]}
    path = folder / TILES_FILE
    path.write_text(json.dumps(table, indent=1) + "\n")
    return path


def load_tiles(folder: Path, few_rows: bool = False) -> TiledShapes:
    """The tile table in ``folder`` (empty where there is none); with ``few_rows``, its few-rows tiles."""
    from .cuda_int8_matmul import MatmulTile

    path = Path(folder) / TILES_FILE
    if not path.is_file():
        return {}
    try:
        table = json.loads(path.read_text())
        known = {f.name for f in fields(MatmulTile)}
        entries = [(s, s["few"] if few_rows else s) for s in table["shapes"] if not few_rows or "few" in s]
        return {(s["k"], s["n"]): MatmulTile(**{k: v for k, v in entry["tile"].items() if k in known})
                for s, entry in entries}
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path} is not a CUDA tile table ({err}); rerun the tile search or delete it") from None


def shipped_tiles(arch: str, few_rows: bool = False) -> TiledShapes:
    """The tile table shipped for the CUDA preset of ``arch`` (e.g. ``sm_90``), or its few-rows tiles; empty where
    none ships."""
    from int8mt.targets import PRESETS

    from .database import shipped_database

    names = [p.name for p in PRESETS.values() if p.device == "cuda" and p.target["arch"] == arch]
    return load_tiles(shipped_database(names[0]), few_rows) if names else {}


def measuring_gpu(preset: TargetPreset, doing: str, without_gpu: str) -> Any:
    """This machine's first CUDA GPU (a TVM device) for ``doing`` (e.g. ``tuning cuda-sm90``), which measures
    on it: a clear error where there is none (``without_gpu`` says what to do instead) or it cannot run the
    preset's kernels."""
    from int8mt.runtime.bundle import import_tvm_runtime
    from int8mt.runtime.cuda import visible_gpu

    gpu = visible_gpu(import_tvm_runtime())
    if gpu is None:
        raise UserError(f"{doing} measures on its GPU, and no CUDA GPU is visible here. {without_gpu}")
    device, have = gpu
    if have < preset.compute_capability:
        raise UserError(f"this GPU (compute capability {have[0]}.{have[1]}) cannot run {preset.name}'s kernels; "
                        "use the preset of this GPU (`int8mt targets`)")
    return device


def dense_module(k: int, n: int) -> Any:
    """A linear layer without epilogue: ``x[rows, k] @ w[n, k]^T`` in int32, ``rows`` dynamic (a Relax module)."""
    import tvm
    from tvm import relax
    from tvm.script import relax as R

    x = relax.Var("x", R.Tensor((tvm.tirx.Var("rows", "int64"), k), "int8"))
    w = relax.Var("w", R.Tensor((n, k), "int8"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x, w]):
        with bb.dataflow():
            y = bb.emit_output(R.matmul(x, R.permute_dims(w), out_dtype="int32"))
        bb.emit_func_output(y)
    return relax.transform.FuseTransposeMatmul()(bb.get())


def build_kernel(mod: Any, preset: Any, folder: Path, name: str, rule: Any = None) -> str:
    """``mod`` compiled for the CUDA ``preset`` (its int8 matmul scheduled by ``rule``, a
    :class:`~.cuda_int8_matmul.CUDAInt8Matmul`, if given; else by the pipeline's) as ``name.so`` and ``name.fatbin``
    in ``folder``; returns the digest that :func:`load_kernel` needs."""
    import tvm
    from tvm import relax
    from tvm.s_tir import dlight

    from int8mt.compiler.cuda import compile_fatbin, cuda_source
    from int8mt.compiler.pipeline import compile_module
    from int8mt.runtime.cuda import source_digest

    if rule is not None:  # scheduled here; the pipeline leaves scheduled kernels as they are
        mod = relax.transform.LegalizeOps()(mod)
        with tvm.target.Target(preset.target):
            mod = dlight.ApplyDefaultSchedule(rule)(mod)
    executable = compile_module(mod, preset)
    source = cuda_source(executable)
    (folder / f"{name}.fatbin").write_bytes(compile_fatbin(source, preset.target["arch"]))
    executable.export_library(str(folder / f"{name}.so"))
    return source_digest(source)


def build_candidates(preset: Any, shapes: list[tuple[int, int, int]], folder: Path, first: int = 0) -> list[dict]:
    """Every candidate from ``first`` on (:data:`CANDIDATES` for ``(rows, k, n)`` of ``shapes`` above ``FEW_ROWS``
    rows, :data:`FEW_ROWS_CANDIDATES` for the others), built into ``folder`` with a list of them
    (``candidates.json``); one that does not compile (e.g. more shared memory than a block may have) is listed with
    its error."""
    from .cuda_int8_matmul import FEW_ROWS, CUDAInt8Matmul, MatmulTile

    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    tries = [(f"tile{index}", spec, [s for s in shapes if s[0] > FEW_ROWS]) for index, spec in enumerate(CANDIDATES)]
    tries += [(f"few{index}", spec, [s for s in shapes if s[0] <= FEW_ROWS])
              for index, spec in enumerate(FEW_ROWS_CANDIDATES)]
    for name, spec, sized in tries[first:]:
        tile = MatmulTile(**spec)
        for rows, k, n in sized:
            entry = {"kernel": f"{name}_k{k}_n{n}_rows{rows}", "tile": asdict(tile), "label": tile.label,
                     "rows": rows, "k": k, "n": n}
            try:
                entry["digest"] = build_kernel(dense_module(k, n), preset, folder, entry["kernel"],
                                               CUDAInt8Matmul(tile))
            except RuntimeError as err:
                entry["error"] = str(err).splitlines()[-1]
            entries.append(entry)
    (folder / CANDIDATES_FILE).write_text(json.dumps(entries, indent=1) + "\n")
    return entries


def random_int8(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.integers(-128, 128, shape, dtype=np.int8)


def exact_product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` of int8 operands, exactly (float64 holds every sum of these sizes), as int32."""
    return (a.astype(np.float64) @ b.astype(np.float64)).astype(np.int32)


def load_kernel(tvm: Any, folder: Path, name: str, digest: str) -> Any:
    """The VM of a kernel :func:`build_kernel` wrote, on the first GPU (TVM's runtime suffices)."""
    from int8mt.runtime.cuda import register_kernels

    register_kernels(digest, (folder / f"{name}.fatbin").read_bytes())
    return tvm.runtime.vm.VirtualMachine(tvm.runtime.load_module(str(folder / f"{name}.so")), tvm.cuda(0))


def measure_candidates(folder: Path, log: Any = None) -> tuple[str, list[dict]]:
    """The GPU's name and, for each candidate :func:`build_candidates` left in ``folder``, whether it is exact at
    its rows and at :data:`CHECKED_ROWS`, and its time (``ms``, best of 3 x 20 runs); ``log`` gets each row."""
    from int8mt.runtime.bundle import import_tvm_runtime
    from int8mt.runtime.cuda import GPUError, visible_gpu

    tvm = import_tvm_runtime()
    if visible_gpu(tvm) is None:
        raise GPUError("measuring CUDA kernels needs a CUDA GPU, and none is visible here")
    dev, rng = tvm.cuda(0), np.random.default_rng(0)
    operands: dict[tuple[int, int, int], tuple] = {}  # per shape: operands, on the device too, exact products
    rows = []
    for entry in json.loads((folder / CANDIDATES_FILE).read_text()):
        row = dict(entry)
        if "error" not in row:
            shape = (row["rows"], row["k"], row["n"])
            if shape not in operands:
                x, w = random_int8(rng, shape[:2]), random_int8(rng, (row["n"], row["k"]))
                operands[shape] = (x, tvm.runtime.tensor(x, dev), tvm.runtime.tensor(w, dev), exact_product(x, w.T))
            x, xt, wt, want = operands[shape]
            try:
                vm = load_kernel(tvm, folder, row["kernel"], row["digest"])
                row["exact"] = all(np.array_equal(vm["main"](tvm.runtime.tensor(x[:r], dev), wt).numpy(), want[:r])
                                   for r in (*CHECKED_ROWS, row["rows"]))
                row["ms"] = min(vm.time_evaluator("main", dev, number=20, repeat=3)(xt, wt).results) * 1e3
                row["tops"] = 2 * row["rows"] * row["k"] * row["n"] / row["ms"] / 1e9
            except Exception as err:  # noqa: BLE001  (e.g. more registers than a block may have: not launched)
                row["error"] = str(err).splitlines()[-1]
        rows.append(row)
        if log is not None:
            log(row)
    return dev.device_name, rows
