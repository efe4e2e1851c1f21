"""Kernel benchmark (CPU presets; CUDA presets: :mod:`.bench_cuda_kernels`): every linear-layer shape of the reference model and of a Transformer-base-shaped one at
1 and 32 sentences of 20 tokens, as GOPS of

* int8mt tuned: the int8 kernel of the preset's dot product (VNNI, AVX-512 BW or AVX2) with the database's
  tiles (weights packed at compile time);
* int8mt default: the int8 matmul as legalized by TVM under our default (untuned) CPU schedule;
* PyTorch int8: ``torch.ao.nn.quantized.Linear`` (fbgemm/oneDNN with VNNI; int8 in, int8 out), and the
  dynamic one (FP32 in and out, activations quantized per call);
* oneDNN int8: ``torch._int_mm`` (int8 x int8 -> int32 like ours; oneDNN's GEMM, on AMX where the CPU has it);
* int8mt FP32: the float32 kernel of FP32 layers (the preset's ``float_dot``, the database's tiles, weights packed);
* PyTorch FP32: ``torch.nn.functional.linear``,

next to this CPU's int8 peak for that dot product (:mod:`int8mt.schedules.int8_peak`, on every core). All on
every CPU of this process; each number is the best of 9 runs of at least 50 ms, taken as 3 rounds over all
shapes, each round timing our kernels and then PyTorch's (this shared 2-vCPU machine varies by +-20 % from
run to run and has stretches that slow everything down; rounds spread each shape's runs over the whole
benchmark for both backends alike, and the best run is the least disturbed one).

Two shares of the peak are reported. "% of peak" divides the kernel's best by the run's best peak. "% of
peak, same moment" pairs each round's kernel timing with a short peak measurement taken just before it
and reports the median of the 3 ratios: the peak itself swings by up to 2x within seconds here (0.6-1.25
TOPS in consecutive 3 ms runs, when the host takes time from one of the two vCPUs), so a kernel timed in a
slow moment against the best peak of the run measures the moment, not the kernel.

With ``rpc`` (a board of another architecture, through a TVM RPC tracker) the kernels are cross-compiled here,
checked against NumPy and timed on the board: tuned and default schedules only (no PyTorch, no peak there).
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from int8mt.errors import UserError
from int8mt.schedules.database import BENCH_MODELS, DenseTask, database_or_shipped, linear_shapes, row_bucket
from int8mt.schedules.tile_label import tile_label
from int8mt.schedules.rpc import RPCTracker
from int8mt.targets import TargetPreset, amx_permission, needs_amx

if TYPE_CHECKING:
    from int8mt.schedules.database import TileChooser
    from int8mt.schedules.intrin import Int8Dot
    from int8mt.schedules.measure import CheckedRunner

TOKENS = 20  # tokens per sentence
ROUNDS, REPEATS, MIN_SECONDS = 3, 3, 0.05
PAUSE_SECONDS = 1.0  # after each phase of a round (see _rounds)
SHORT_PEAK_ITERS = 1_000_000  # ~3 ms per run on this machine


@dataclass
class KernelRow:
    model: str
    n: int
    k: int
    rows: int
    tiles: str
    tuned: bool
    int8mt_tuned: float
    int8mt_default: float
    int8mt_fp32: float
    torch_int8: float | None  # PyTorch and the peak: None when measured on a board over RPC
    torch_int8_dynamic: float | None
    torch_fp32: float | None
    onednn_int_mm: float | None
    peak_share_same_moment: float | None  # median over rounds of tuned GOPS / the peak measured just before


def _best_seconds(fn: Callable[[], object]) -> float:
    fn()
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-7)
    number = max(1, int(MIN_SECONDS / once))
    runs = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        runs.append((time.perf_counter() - t0) / number)
    return min(runs)


Timer = Callable[[], float]


def _tvm_timer(module, args, device) -> Timer:
    """Best seconds of REPEATS runs of ``module`` on ``args`` on ``device``, each call."""
    timer = module.time_evaluator("main", device, number=1, repeat=REPEATS, min_repeat_ms=int(MIN_SECONDS * 1e3))
    return lambda: min(timer(*args).results)


def _rounds(phases: list[list[list[Timer]]], desc: str) -> list[list[list[list[float]]]]:
    """Every timer's result in each of ROUNDS rounds (``[phase][row][timer][round]``). A round runs the phases
    one after the other (our kernels, then PyTorch's), each through all its rows, with a pause after each:
    PyTorch's OpenMP workers keep spinning for a while after its last call and would take the cores from
    TVM's thread pool. So both backends are timed in the same stretches of this machine's varying speed."""
    from tqdm import tqdm

    results = [[[[] for _ in row] for row in phase] for phase in phases]
    with tqdm(total=ROUNDS * sum(len(phase) for phase in phases), desc=desc) as bar:
        for _ in range(ROUNDS):
            for phase, phase_results in zip(phases, results):
                for row, row_results in zip(phase, phase_results):
                    for timer, runs in zip(row, row_results):
                        runs.append(timer())
                    bar.update()
                time.sleep(PAUSE_SECONDS)
    return results


def same_moment_share(gop: float, peak_runs: list[float], kernel_runs: list[float]) -> float:
    """Median over rounds of the kernel's GOPS (``gop`` / seconds) over the peak's GOPS measured just before it
    (``peak_runs``: seconds per 10^9 ops)."""
    return float(np.median([gop * peak / secs for peak, secs in zip(peak_runs, kernel_runs)]))


def _short_peak_timer(dot, target) -> Timer:
    """A short peak measurement (best of 3 runs of SHORT_PEAK_ITERS) as seconds per 10^9 int8 ops, to pair
    with the kernel timing taken right after it."""
    from int8mt.schedules.int8_peak import int8_peak_runner

    measure = int8_peak_runner(dot, target, SHORT_PEAK_ITERS)
    return lambda: 1.0 / measure(3)["gops"]


def _int8mt_kernels(n: int, k: int, rows: int, target, tiles: TileChooser, dot: Int8Dot,
                    where: CheckedRunner) -> tuple[Timer, Timer, str, bool]:
    """Timers of the kernel of ``dot`` with the tiles ``tiles`` chooses for it (the preset's, or those of the
    preset it takes its tiles from, and AMX blocks) and of the default schedule on ``where`` (a
    :class:`CheckedRunner`: this machine or a board), the tiles used and whether they were tuned."""
    import tvm
    from tvm import te
    from tvm.s_tir import dlight

    from int8mt.schedules.amx_dense import MIN_ROWS as AMX_MIN_ROWS
    from int8mt.schedules.amx_dense import static_rows_block
    from int8mt.schedules.cpu_generic import CPUGeneric
    from int8mt.schedules.int8_dense import pack_weight, padded, scheduled_int8_dense

    rng = np.random.default_rng(0)
    a = rng.integers(-128, 128, (rows, k), dtype=np.int8)
    w = rng.integers(-128, 128, (n, k), dtype=np.int8)
    choice = tiles.task_choice(DenseTask(n, k, row_bucket(rows), tiles.family))
    kernel = scheduled_int8_dense(n, k, choice.tiles, dot, rows)
    tuned = where.load(tvm.compile(tvm.IRModule({"main": kernel}), target=target))
    packed, correction = pack_weight(w, dot)
    tuned_args = [tvm.runtime.tensor(x, device=where.device)
                  for x in (a, packed, correction, np.zeros((rows, n), np.int32))]
    out = tuned_args[-1]
    tuned["main"](*tuned_args)
    expected = a.astype(np.float64) @ w.T.astype(np.float64)
    if not np.array_equal(out.numpy(), expected):
        raise RuntimeError(f"the tuned {n}x{k} kernel disagrees with NumPy; the database holds a broken record")
    x, wt = te.placeholder((rows, k), "int8", "x"), te.placeholder((n, k), "int8", "w")
    r = te.reduce_axis((0, k), "r")
    y = te.compute((rows, n), lambda i, j: te.sum(x[i, r].astype("int32") * wt[j, r].astype("int32"), axis=r))
    with target:
        generic = dlight.ApplyDefaultSchedule(CPUGeneric())(tvm.IRModule({"main": te.create_prim_func([x, wt, y])}))
    default = where.load(tvm.compile(generic, target=target))
    default_args = [tvm.runtime.tensor(x, device=where.device) for x in (a, w, np.zeros((rows, n), np.int32))]
    chosen = choice.tiles
    label = tile_label(chosen.rows, chosen.cols, chosen.depth, (dot.lanes, dot.reduce), chosen.row_split)
    if dot.amx_tiles and rows >= AMX_MIN_ROWS:  # static rows: only the AMX block runs
        label = static_rows_block(chosen.amx_small, chosen.amx, padded(n, k, dot)[0], rows).label
    return (_tvm_timer(tuned, tuned_args, where.device), _tvm_timer(default, default_args, where.device), label,
            choice.tuned)


def _float_kernel(n: int, k: int, rows: int, target, tiles: TileChooser, where: CheckedRunner) -> Timer:
    """Timer of the float32 kernel of FP32 layers (``tiles``' for its row bucket) on ``where``, checked against
    NumPy."""
    import tvm

    from int8mt.schedules.int8_dense import pack_weight, scheduled_int8_dense
    from int8mt.schedules.intrin import dense_dot

    dot = dense_dot(tiles.family)
    chosen = tiles.task_choice(DenseTask(n, k, row_bucket(rows), tiles.family)).tiles
    rng = np.random.default_rng(0)
    a, w = rng.standard_normal((rows, k)).astype(np.float32), rng.standard_normal((n, k)).astype(np.float32)
    module = where.load(tvm.compile(tvm.IRModule({"main": scheduled_int8_dense(n, k, chosen, dot, rows)}),
                                    target=target))
    args = [tvm.runtime.tensor(x, device=where.device)
            for x in (a, *pack_weight(w, dot), np.zeros((rows, n), np.float32))]
    module["main"](*args)
    if not np.allclose(args[-1].numpy(), a @ w.T, rtol=1e-4, atol=1e-3):
        raise RuntimeError(f"the float32 {n}x{k} kernel disagrees with NumPy")
    return _tvm_timer(module, args, where.device)


def _torch_timers(n: int, k: int, rows: int) -> list[Timer]:
    """Timers of PyTorch's static int8, dynamic int8 and FP32 linear and of oneDNN's int8 GEMM on the same shape."""
    import torch
    from torch.ao.nn.quantized import Linear as QLinear
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    from .bench import quiet_pytorch_quantization

    torch.backends.quantized.engine = "x86"
    x = torch.randn(rows, k)
    weight = torch.randn(n, k)
    with quiet_pytorch_quantization():
        qweight = torch.quantize_per_channel(weight, weight.abs().amax(1) / 127, torch.zeros(n, dtype=torch.long), 0,
                                             torch.qint8)
        qx = torch.quantize_per_tensor(x, 0.05, 128, torch.quint8)
    static = QLinear(k, n)
    static.set_weight_bias(qweight, None)
    static.scale, static.zero_point = 0.1, 128
    dynamic = DynamicLinear(k, n)
    dynamic.set_weight_bias(qweight, None)
    def timer(fn: Callable[[], object]) -> Timer:
        def run() -> float:
            with torch.inference_mode():
                return _best_seconds(fn)
        return run

    a8 = torch.randint(-128, 128, (rows, k), dtype=torch.int8)
    w8 = torch.randint(-128, 128, (n, k), dtype=torch.int8).t()  # [k, n], as our packed weights: laid out once
    return [timer(lambda: static(qx)), timer(lambda: dynamic(x)), timer(lambda: torch.nn.functional.linear(x, weight)),
            timer(lambda: torch._int_mm(a8, w8))]


def bench_kernels(preset: TargetPreset, database_dir: Path | None, sentences: tuple[int, ...] = (1, 32),
                  rpc: RPCTracker | None = None) -> dict:
    """The benchmark table rows and the measured peak (see the module docstring), with the tiles of
    ``database_dir`` (None: those shipped for the preset); with ``rpc``, measured on a board."""
    if preset.device == "cuda":
        if rpc is not None:
            raise UserError("--rpc measures on a CPU board; CUDA kernels are benchmarked on a machine with the GPU")
        from .bench_cuda_kernels import bench_cuda_kernels

        return bench_cuda_kernels(preset, database_or_shipped(preset.name, database_dir), sentences)
    if preset.int8_dot is None:
        raise UserError(f"the kernel benchmark measures int8 dot-product kernels; preset {preset.name} has none "
                         "(`int8mt targets` lists the presets that have)")
    if rpc is None and needs_amx(preset) and amx_permission() is not None:
        raise UserError(f"{preset.name} kernels use AMX tiles, but {amx_permission()}; benchmark x86-vnni instead")
    os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))
    import tvm
    from tqdm import tqdm

    from int8mt.compiler.pipeline import tile_choosers
    from int8mt.schedules.intrin import int8_dot
    from int8mt.schedules.tune import Measurement

    measurement = Measurement.for_preset(preset, rpc, "benchmark")

    target = tvm.target.Target(preset.target)
    tiles, float_tiles = tile_choosers(preset, database_dir)
    dot = int8_dot(preset.int8_dot)
    where = measurement.runner(dot)
    cases = [(model, n, k, s * TOKENS) for model, dims in BENCH_MODELS.items() for n, k in linear_shapes(*dims)
             for s in sentences]
    kernels = [(*_int8mt_kernels(n, k, m, target, tiles, dot, where),
                _float_kernel(n, k, m, target, float_tiles, where))
               for _, n, k, m in tqdm(cases, desc="compiling int8mt kernels")]
    if rpc is not None:
        ours, = _rounds([[[tuned, default, fp32] for tuned, default, _, _, fp32 in kernels]],
                        f"kernels (int8mt, on {rpc})")
        rows = [KernelRow(model, n, k, m, tiles, was_tuned,
                          *(round(2 * n * k * m / 1e9 / min(t), 1) for t in runs), None, None, None, None, None)
                for (model, n, k, m), (_, _, tiles, was_tuned, _), runs in zip(cases, kernels, ours)]
        return {"peak": None, "measured_on": f"rpc {rpc}", "rows": [asdict(r) for r in rows]}
    import torch

    from int8mt.schedules.int8_peak import int8_peak_runner

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    measure_peak = int8_peak_runner(dot, target)
    peak = measure_peak(5)
    short_peak = _short_peak_timer(dot, target)
    ours, theirs = _rounds([[[short_peak, tuned, default, fp32] for tuned, default, _, _, fp32 in kernels],
                            [_torch_timers(n, k, m) for _, n, k, m in cases]], "kernels (int8mt, PyTorch)")
    # measured again after the rounds: the better of the two, as every other number here is the least
    # disturbed run
    peak = max(peak, measure_peak(5), key=lambda p: p["gops"])
    rows = []
    for (model, n, k, m), (_, _, tiles, was_tuned, _), runs, torch_runs in zip(cases, kernels, ours, theirs):
        gop = 2 * n * k * m / 1e9
        peak_runs, tuned_runs, default_runs, fp32_runs = runs
        rows.append(KernelRow(model, n, k, m, tiles, was_tuned,
                              *(round(gop / min(t), 1) for t in (tuned_runs, default_runs, fp32_runs, *torch_runs)),
                              peak_share_same_moment=round(same_moment_share(gop, peak_runs, tuned_runs), 3)))
    return {"peak": peak, "measured_on": "this machine", "rows": [asdict(r) for r in rows]}


def format_kernel_table(result: dict) -> str:
    if "gpu" in result:
        from .bench_cuda_kernels import format_cuda_kernel_table

        return format_cuda_kernel_table(result)
    if result["peak"] is None:
        return _format_remote_table(result)
    peak = result["peak"]["gops"]
    header = ("| model | n x k | rows | int8mt tuned GOPS | % of peak | % of peak, same moment | tiles | "
              "int8mt default | PyTorch int8 | PyTorch int8 dynamic | oneDNN int8 (`_int_mm`) | int8mt FP32 | "
              "PyTorch FP32 | tuned / PyTorch int8 | tuned / oneDNN |")
    instruction = result["peak"]["instruction"].removeprefix("llvm.x86.")
    lines = [f"int8 peak ({instruction} streams, {result['peak']['threads']} threads): {peak:.0f} GOPS", "", header,
             "|" + "---|" * header.count(" | ") + "---|"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['n']} x {r['k']} | {r['rows']} | {r['int8mt_tuned']:.0f} | "
                     f"{100 * r['int8mt_tuned'] / peak:.0f} | {100 * r['peak_share_same_moment']:.0f} | "
                     f"{r['tiles']}{'' if r['tuned'] else ' (default)'} | "
                     f"{r['int8mt_default']:.0f} | {r['torch_int8']:.0f} | {r['torch_int8_dynamic']:.0f} | "
                     f"{r['onednn_int_mm']:.0f} | {r['int8mt_fp32']:.0f} | {r['torch_fp32']:.0f} | "
                     f"{r['int8mt_tuned'] / r['torch_int8']:.2f}x | {r['int8mt_tuned'] / r['onednn_int_mm']:.2f}x |")
    return "\n".join(lines)


def _format_remote_table(result: dict) -> str:
    """The table of a run on a board: our tuned and default kernels only."""
    lines = [f"int8 kernels measured on {result['measured_on']}", "",
             "| model | n x k | rows | int8mt tuned GOPS | tiles | int8mt default GOPS | tuned / default | "
             "int8mt FP32 GFLOPS |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['n']} x {r['k']} | {r['rows']} | {r['int8mt_tuned']:.1f} | "
                     f"{r['tiles']}{'' if r['tuned'] else ' (default)'} | {r['int8mt_default']:.1f} | "
                     f"{r['int8mt_tuned'] / r['int8mt_default']:.2f}x | {r['int8mt_fp32']:.1f} |")
    return "\n".join(lines)
