"""Tuning with MetaSchedule: records land in the JSON database with no failed candidate, a second run
resumes instead of starting over, the confirmation rounds pick one of the best candidates, and compilation
picks the database's tiles."""
import json
import warnings

import numpy as np
import pytest
import tvm

from int8mt.cli import main
from int8mt.schedules.database import (BENCH_MODELS, ROW_BUCKETS, DenseTask, TileChooser, TuningDatabase, bench_tasks,
                                       linear_shapes, row_bucket, shipped_database)
from int8mt.schedules.int8_dense import DenseTiles, default_tiles, fits_registers, tiles_from_trace
from int8mt.schedules.intrin import int8_dot
from int8mt.targets import get_preset, missing_features

from ..conftest import HOST_PRESET, VNNI, needs_vnni

TASKS = [DenseTask(64, 32, 32, "vnni"), DenseTask(128, 64, 640, "vnni")]


def test_missing_database_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no tuning database in .*create one with `int8mt tune`"):
        TuningDatabase(tmp_path / "none")


def test_untuned_kernels_get_default_tiles(tmp_path):
    chooser = TileChooser(TuningDatabase(tmp_path, create=True), "vnni")
    assert chooser(64, 32, "decode_step") == default_tiles(64, 32, int8_dot("vnni"))
    choice = chooser.choice(64, 32, "decode_step")
    assert (choice.task, choice.tuned) == (DenseTask(64, 32, 32, "vnni"), False)


def test_kernels_a_database_lacks_take_the_shipped_tiles(tmp_path):
    avx2 = get_preset("x86-avx2")
    shipped = TuningDatabase(shipped_database(avx2.name))
    chooser = TileChooser(TuningDatabase(tmp_path, create=True), avx2.int8_dot, fallback=shipped)
    choice = chooser.choice(256, 256, "decode_step")  # a reference-model shape the shipped database has
    assert choice.tuned and choice.tiles == shipped.best(DenseTask(256, 256, 32, avx2.int8_dot))[0]
    assert not chooser.choice(40, 24, "decode_step").tuned  # in neither: default tiles


def test_tiles_that_spill_registers_are_never_chosen(tmp_path):
    """A database tuned without the register bound holds tiles that spill (the shipped AVX2 one keeps such
    records: 8 x 2 tiles on 16 registers); neither its candidates nor a confirmed winner of that kind are chosen."""
    shipped = TuningDatabase(shipped_database("x86-avx2"))
    task = DenseTask(8000, 256, 32, "avx2")
    measured = [tiles_from_trace(record.trace, task.dot) for record in shipped.records(task)]
    assert any(not fits_registers(tiles, task.dot) for tiles in measured)
    top = shipped.candidates(task, 48)  # (beyond its first 24 distinct tiles: the older records timed slower)
    assert len(top) == 48 and all(fits_registers(tiles, task.dot) for tiles, _ in top)
    assert fits_registers(shipped.best(task)[0], task.dot)
    database = TuningDatabase(tmp_path, create=True)
    spilling = DenseTiles(rows=8, cols=2, depth=4)
    database.confirm(task, spilling, 1e-5)
    assert database.best(task) is None
    assert TileChooser(database, "avx2")(8000, 256, "decode_step") == default_tiles(8000, 256, task.dot)
    database.confirm(task, DenseTiles(rows=6, cols=2, depth=4), 1e-5)
    assert database.best(task) == (DenseTiles(rows=6, cols=2, depth=4), 1e-5)


def test_tuning_measures_only_tiles_that_fit_the_registers(tmp_path):
    """Most of a 128 x 64 weight's row x column tiles spill AVX2's registers (3 to 8 rows x 4 or 8 columns):
    none is measured."""
    from int8mt.schedules.tune import tune

    task = DenseTask(128, 64, 32, "avx2")
    tune([task], tvm.target.Target(get_preset("x86-avx2").target), TuningDatabase(tmp_path, create=True), trials=16,
         trials_per_iter=16)
    measured = [tiles_from_trace(record.trace, task.dot) for record in TuningDatabase(tmp_path).records(task)]
    assert len(measured) == 16 and all(fits_registers(tiles, task.dot) for tiles in measured)


def test_row_buckets():
    assert [row_bucket(r) for r in (1, 20, 128, 200, 640, 5000)] == [32, 32, 32, 640, 640, 640]


@pytest.mark.slow
@needs_vnni
def test_tune_resume_and_apply(tmp_path):
    from int8mt.schedules.tune import tune

    target = tvm.target.Target(VNNI.target)
    database = TuningDatabase(tmp_path / "db", create=True)
    first = tune(TASKS, target, database, trials=8, trials_per_iter=8)
    assert [(r.trials_before, r.trials, r.build_failures, r.run_failures) for r in first] == [(0, 8, 0, 0)] * 2
    assert all(r.best_seconds > 0 for r in first)
    again = tune(TASKS, target, TuningDatabase(tmp_path / "db"), trials=12, trials_per_iter=4)
    assert [(r.trials_before, r.trials) for r in again] == [(8, 4), (8, 4)]
    database = TuningDatabase(tmp_path / "db")  # a database object reads the files when it is made
    assert len(database.records(TASKS[0])) == 12
    lines = (tmp_path / "db" / "database_tuning_record.json").read_text().splitlines()
    assert len(lines) == 24 and all(json.loads(line) for line in lines)
    chooser = TileChooser(TuningDatabase(tmp_path / "db"), "vnni")
    tiles, _ = database.best(TASKS[1])
    assert chooser(128, 64, "encode") == tiles and chooser.choice(128, 64, "encode").tuned


@pytest.mark.slow
@needs_vnni
def test_confirmation_rounds_record_a_winner_among_the_best(tmp_path):
    from int8mt.schedules.tune import confirm, tune

    target = tvm.target.Target(VNNI.target)
    database = TuningDatabase(tmp_path / "db", create=True)
    tune(TASKS[:1], target, database, trials=8, trials_per_iter=8)
    top = [tiles for tiles, _ in database.candidates(TASKS[0], 3)]
    assert len(top) == len(set(top)) == 3
    winners = confirm(TASKS[:1], target, database, candidates=3, rounds=2)
    assert winners[TASKS[0]] in top
    reopened = TuningDatabase(tmp_path / "db")
    assert reopened.best(TASKS[0])[0] == winners[TASKS[0]]
    assert TileChooser(reopened, "vnni")(64, 32, "decode_step") == winners[TASKS[0]]


def test_tune_and_bench_kernels_need_a_preset_with_int8_kernels(tmp_path, tiny_model_dir):
    from dataclasses import replace

    from int8mt.interface.bench_kernels import bench_kernels
    from int8mt.interface.tune import TuneArgs
    from int8mt.interface.tune import tune as tune_cli

    plain = replace(HOST_PRESET, name="x86-plain", int8_dot=None)
    with pytest.raises(ValueError, match="preset x86-plain has no int8 dot-product kernels to tune"):
        tune_cli(TuneArgs(tiny_model_dir, plain, tmp_path / "db", trials=4, budget_minutes=1))
    with pytest.raises(ValueError, match="preset x86-plain has none"):
        bench_kernels(plain, None)


def test_tasks_of_several_families_are_refused(tmp_path):
    from int8mt.schedules.tune import tune

    with pytest.raises(ValueError, match="several dot-product families"):
        tune([DenseTask(64, 32, 32, "vnni"), DenseTask(64, 32, 32, "avx2")], tvm.target.Target(VNNI.target),
             TuningDatabase(tmp_path, create=True), trials=4)


@pytest.mark.slow
@pytest.mark.skipif(bool(missing_features(get_preset("x86-avx2"))), reason="this CPU has no AVX2")
def test_tune_the_avx2_family(tmp_path):
    """The design space and the checked runner work for a fallback intrinsic too."""
    from int8mt.schedules.tune import tune

    task = DenseTask(64, 64, 32, "avx2")
    target = tvm.target.Target(get_preset("x86-avx2").target)
    [report] = tune([task], target, TuningDatabase(tmp_path, create=True), trials=4, trials_per_iter=4)
    assert (report.trials, report.build_failures, report.run_failures) == (4, 0, 0)
    tiles, _ = TuningDatabase(tmp_path).best(task)
    assert 8 % tiles.cols == 0 and TileChooser(TuningDatabase(tmp_path), "avx2")(64, 64, "decode_step") == tiles


def test_pytorch_s_quantized_linear_layers_are_timed_without_its_deprecation_notice():
    """`bench kernels` measures PyTorch's quantized Linear, whose quantized tensors PyTorch 2.13 deprecates with a
    warning at every shape; the benchmark's output is the table."""
    from int8mt.interface.bench_kernels import _torch_timers

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        timers = _torch_timers(64, 32, 4)
    assert len(timers) == 4 and not [w for w in seen if "quantize_per" in str(w.message)]


def test_kernel_table_shows_both_shares_of_the_peak():
    """"% of peak" divides by the run's best peak; "same moment" is the median of per-round ratios to the peak
    measured just before (1000, 500, 1000 GOPS there; the kernel at 500, 500, 250 GOPS -> 0.5, 1.0, 0.25)."""
    from int8mt.interface.bench_kernels import KernelRow, format_kernel_table, same_moment_share

    share = same_moment_share(1.0, [1e-3, 2e-3, 1e-3], [2e-3, 2e-3, 4e-3])
    assert share == 0.5
    row = KernelRow("reference", 256, 256, 640, "4x64 depth 8", True, 500.0, 25.0, 120.0, 250.0, 200.0, 100.0, 400.0,
                    share)
    result = {"peak": {"gops": 1000.0, "threads": 2, "instruction": "llvm.x86.avx512.vpdpbusd.512"},
              "rows": [row.__dict__]}
    assert ("| reference | 256 x 256 | 640 | 500 | 50 | 50 | 4x64 depth 8 | 25 | 250 | 200 | 400 | 120 | 100 | 2.00x "
            "| 1.25x |") in format_kernel_table(result)


@needs_vnni
def test_bench_kernels_with_a_missing_database_is_a_clear_error(capsys, tmp_path):
    assert main(["bench", "kernels", "--target", "x86-vnni", "--db", str(tmp_path / "none")]) == 2
    assert "no tuning database in" in capsys.readouterr().err


def test_tuning_a_bundle_without_kernels_of_ours_is_a_clear_error(capsys, bundle_copy):
    report = json.loads((bundle_copy / "report.json").read_text())
    del report["float_kernels"]  # as a bundle of a preset whose FP32 layers run TVM's default schedule
    (bundle_copy / "report.json").write_text(json.dumps(report))
    assert main(["tune", str(bundle_copy), "--target", "x86-vnni", "--db", str(bundle_copy.parent / "db")]) == 2
    assert "has no dense kernels of our own to tune" in capsys.readouterr().err


@pytest.mark.slow
@needs_vnni
def test_tune_cli_on_a_model(capsys, tiny_model_dir, tmp_path):
    assert main(["tune", str(tiny_model_dir), "--target", "x86-vnni", "--trials", "4", "--db", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| 8000 x 32, 32 | 4 (had 0) | 0 | 0 |" in out and "28 trials, 0 failed (0.0 %)" in out
    log = json.loads((tmp_path / "tuning-log.json").read_text())
    assert len(log) == 1 and len(log[0]["tasks"]) == 7


@needs_vnni
def test_tuning_x86_amx_tunes_the_vnni_kernel_it_takes_its_tiles_from(capsys, tiny_model_dir, tmp_path, monkeypatch):
    from int8mt.interface import tune as tune_interface

    tuned_for = []
    monkeypatch.setattr(tune_interface, "_amx_blocks_measurement", lambda preset, rpc: None)  # (any CPU)
    monkeypatch.setattr(tune_interface, "dense_tasks",
                        lambda source, preset, *_: tuned_for.append(preset.name) or [])
    assert main(["tune", str(tiny_model_dir), "--target", "x86-amx", "--db", str(tmp_path)]) != 0  # no tasks
    assert tuned_for == ["x86-vnni"] and "x86-amx takes its tiles from x86-vnni" in capsys.readouterr().err


def test_tuning_x86_amx_where_the_cpu_has_no_amx_is_a_clear_error(capsys, tiny_model_dir, tmp_path, monkeypatch):
    from int8mt.interface import tune as tune_interface

    monkeypatch.setattr(tune_interface, "missing_features", lambda preset: ["amx_tile", "amx_int8"])
    assert main(["tune", str(tiny_model_dir), "--target", "x86-amx", "--db", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "times its AMX kernels, which this machine cannot run (it lacks amx_tile, amx_int8)" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("preset", ["x86-vnni", "x86-avx512", "x86-avx2"])
def test_shipped_database_matches_the_kernels_workloads(preset):
    """The shipped records are keyed by the kernel's structure: a change to ``int8_dense`` that alters it
    would orphan them (their tiles stay reachable through confirmed.json, but resuming would start over)."""
    family = get_preset(preset).int8_dot
    database = TuningDatabase(shipped_database(preset))
    for n, k in linear_shapes(*BENCH_MODELS["reference"]):
        for rows in ROW_BUCKETS:
            assert database.records(DenseTask(n, k, rows, family)), (preset, n, k, rows)


def test_x86_vnni_ships_tuned_float_kernels():
    """x86-vnni's database (x86-amx's too) holds the FP32 layers' float32 kernels of both benchmark models."""
    preset = get_preset("x86-vnni")
    database = TuningDatabase(shipped_database(preset.name))
    for task in bench_tasks(preset.float_dot):
        assert database.records(task) and task.name in database.confirmed(), task


FLOAT_PRESET = HOST_PRESET.tuned_preset  # whose database holds the host preset's tiles, float32 ones included


def test_float_kernels_are_tuned_checked_and_chosen_beside_int8_ones(tmp_path):
    """FP32 layers' float32 kernels go through the same tuner: each candidate checked exactly (small integers),
    the best tiles chosen for them; an int8 kernel of the same shape in the same database stays untuned."""
    from int8mt.schedules.tune import tune

    task = DenseTask(64, 32, 32, FLOAT_PRESET.float_dot)
    assert task.name == "float_dense_n64_k32_m32"
    database = TuningDatabase(tmp_path, create=True)
    [report] = tune([task], tvm.target.Target(FLOAT_PRESET.target), database, trials=4, trials_per_iter=4)
    assert (report.trials, report.build_failures, report.run_failures) == (4, 0, 0)
    tiles, _ = TuningDatabase(tmp_path).best(task)
    choice = TileChooser(TuningDatabase(tmp_path), task.family).choice(64, 32, "decode_step")
    assert choice.tuned and choice.tiles == tiles
    if FLOAT_PRESET.int8_dot:
        assert not TileChooser(TuningDatabase(tmp_path), FLOAT_PRESET.int8_dot).choice(64, 32, "decode_step").tuned


def test_the_checked_runner_fails_a_wrong_float_kernel():
    """A float32 candidate whose result differs from NumPy's is a failed trial, never a record."""
    from tvm import te

    from int8mt.schedules.int8_dense import pack_weight, scheduled_int8_dense
    from int8mt.schedules.intrin import dense_dot
    from int8mt.schedules.measure import CheckedRunner

    dot = dense_dot(FLOAT_PRESET.float_dot)
    m, n, k = 32, 64, 48
    packed, correction = (np.zeros(x.shape, x.dtype) for x in pack_weight(np.zeros((n, k), np.float32), dot))
    a, w, c = (te.placeholder(shape, "float32") for shape in ((m, k), packed.shape, correction.shape))
    first_column = te.compute((m, n), lambda i, j: a[i, 0] * w[j // dot.lanes, 0, j % dot.lanes, 0])
    wrong = te.create_prim_func([a, w, c, first_column])
    right = scheduled_int8_dense(n, k, default_tiles(n, k, dot), dot, m)
    runner = CheckedRunner(dot)
    shapes = ((m, k), packed.shape, correction.shape, (m, n))
    target = tvm.target.Target(FLOAT_PRESET.target)
    for func, passes in ((right, True), (wrong, False)):
        module = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target).mod
        assert (runner.checked_args(module, shapes) is not None) == passes


def test_fp32_bundles_report_their_float_kernels_for_tuning(tiny_bundle, tiny_model_dir):
    """An FP32 bundle's build report lists its float32 kernels; `int8mt tune` takes them from it, and from a model
    directory with --fp32 (the same kernels)."""
    from int8mt.interface.tune import dense_tasks

    kernels = json.loads((tiny_bundle / "report.json").read_text())["float_kernels"]
    assert kernels and {k["dot"] for k in kernels} == {HOST_PRESET.float_dot}
    from_bundle = dense_tasks(tiny_bundle, FLOAT_PRESET)
    assert {(t.n, t.k, t.rows, t.family) for t in from_bundle} == {
        (k["n"], k["k"], k["rows_tuned_for"], FLOAT_PRESET.float_dot) for k in kernels}
    assert dense_tasks(tiny_model_dir, FLOAT_PRESET, fp32=True) == from_bundle
    with pytest.raises(ValueError, match="is a bundle: its own kernels are tuned"):
        dense_tasks(tiny_bundle, FLOAT_PRESET, fp32=True)


@pytest.mark.slow
def test_an_fp32_bundle_compiles_with_the_databases_float_tiles(tiny_bundle, tiny_model_dir, tmp_path):
    """Tiles tuned for one float32 kernel into a database reach the FP32 bundle compiled with it (--db)."""
    from int8mt.schedules.tune import tune

    kernel = json.loads((tiny_bundle / "report.json").read_text())["float_kernels"][0]
    task = DenseTask(kernel["n"], kernel["k"], kernel["rows_tuned_for"], FLOAT_PRESET.float_dot)
    tune([task], tvm.target.Target(FLOAT_PRESET.target), TuningDatabase(tmp_path / "db", create=True), trials=4,
         trials_per_iter=4)
    tiles, _ = TuningDatabase(tmp_path / "db").best(task)
    args = ["compile", str(tiny_model_dir), "--quant", "fp32", "--db", str(tmp_path / "db"), "-o", str(tmp_path / "b")]
    assert main(args) == 0
    built = json.loads((tmp_path / "b" / "report.json").read_text())["float_kernels"]
    same = [k for k in built if (k["function"], k["n"], k["k"]) == (kernel["function"], kernel["n"], kernel["k"])]
    assert same[0]["tuned"] and same[0]["tiles"] == tiles.to_dict()
