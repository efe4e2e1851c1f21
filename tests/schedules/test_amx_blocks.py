"""The AMX block design space: every block fits the tile registers and computes what NumPy computes; the search's
table picks the block of least relative time, keeps other layers, names damage; compilation takes the table's
block (shipped for the reference model's layers) and records it in the kernel."""
import json
from dataclasses import replace

import numpy as np
import pytest
import tvm

from int8mt.errors import UserError
from int8mt.schedules.amx_blocks import BLOCKS_FILE, best_block, candidate_blocks, load_blocks, write_blocks
from int8mt.schedules.amx_dense import BLOCKS, SMALL_ROWS, AmxBlock, block_rows, default_block
from int8mt.schedules.database import (BENCH_MODELS, ROW_BUCKETS, DenseTask, TileChooser, TuningDatabase,
                                       linear_shapes, shipped_database)
from int8mt.schedules.int8_dense import default_tiles, dense_attrs, pack_weight, scheduled_int8_dense
from int8mt.schedules.intrin import int8_dot
from int8mt.targets import get_preset

from ..conftest import runnable

AMX = get_preset("x86-amx")
DOT = int8_dot("amx")


def test_every_block_fits_the_tile_registers_and_a_larger_one_is_refused():
    assert len(set(BLOCKS)) == len(BLOCKS) and all(block.registers <= 8 for block in BLOCKS)
    with pytest.raises(ValueError, match="2 x 3 tiles needs 11 tile registers"):
        AmxBlock(2, 3)


def test_blocks_that_do_not_divide_the_columns_are_no_candidates():
    assert {b.col_tiles for b in candidate_blocks(DenseTask(48, 64, 32, "amx"))} == {1, 3}  # 3 column tiles
    assert {b.col_tiles for b in candidate_blocks(DenseTask(64, 64, 32, "amx"))} == {1, 2}
    with pytest.raises(ValueError, match="3 column tiles do not divide 64 columns"):
        scheduled_int8_dense(64, 64, replace(default_tiles(64, 64, DOT), amx=AmxBlock(1, 3)), DOT, 100)


@pytest.mark.parametrize("block", [AmxBlock(2, 2), AmxBlock(1, 2, by_columns=True), AmxBlock(3, 1)])
@pytest.mark.parametrize("rows", [40, 100])
def test_the_kernel_computes_its_block_for_its_rows_and_records_both(block, rows):
    """Static rows above one tile run one block: the small one up to 64 rows, the other above."""
    tiles = replace(default_tiles(256, 64, DOT), amx=block, amx_small=AmxBlock(1, 1))
    kernel = scheduled_int8_dense(256, 64, tiles, DOT, rows=rows)
    runs = block if rows > SMALL_ROWS else AmxBlock(1, 1)
    assert kernel.script().count('"llvm.x86.tdpbusd"') == runs.row_tiles * runs.col_tiles
    assert dense_attrs(kernel)[2] == tiles


@pytest.mark.parametrize("preset", [runnable(AMX)])
@pytest.mark.parametrize("n,k", [(48, 200), (64, 64)])
def test_every_block_equals_numpy(n, k, preset):
    """Each block of the design space that fits (odd and even column tiles, K padded to 64), in both orders, at rows
    around its block's rows, on every thread of the pool."""
    rng = np.random.default_rng(n + k)
    w = rng.integers(-128, 128, (n, k), dtype=np.int8)
    packed, correction = pack_weight(w, DOT)
    blocks = candidate_blocks(DenseTask(n, k, 32, "amx"))
    for block, small in zip(blocks, blocks[1:] + blocks[:1]):  # each block above 64 rows and up to 64
        kernel = scheduled_int8_dense(n, k, replace(default_tiles(n, k, DOT), amx=block, amx_small=small), DOT)
        module = tvm.compile(tvm.IRModule({"main": kernel}), target=tvm.target.Target(preset.target)).mod
        for rows in (17, 40, 64, 65, 100):
            a = rng.integers(-128, 128, (rows, k), dtype=np.int8)
            out = tvm.runtime.tensor(np.zeros((rows, n), np.int32))
            module["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(packed), tvm.runtime.tensor(correction), out)
            np.testing.assert_array_equal(out.numpy(), a.astype(np.int32) @ w.T.astype(np.int32), err_msg=block.label)


@pytest.mark.parametrize("rows,n,block", [(32, 32, AmxBlock(2, 2)), (12, 32, AmxBlock(2, 2)), (48, 16, AmxBlock(3, 1))])
def test_a_kernel_of_one_block_compiles(rows, n, block):
    """Static rows whose whole output is one block (a tuning task of a small model) have no parallel loop, which
    TVM would otherwise drop from the tiles' launch point and then fail to compile."""
    kernel = scheduled_int8_dense(n, 64, replace(default_tiles(n, 64, DOT), amx=block, amx_small=block), DOT, rows)
    asm = tvm.compile(tvm.IRModule({"main": kernel}), target=tvm.target.Target(AMX.target)).mod.inspect_source("asm")
    assert "tdpbusd" in asm and "ldtilecfg" in asm


def test_best_block_is_least_relative_time_over_thread_counts():
    one, two, three = AmxBlock(2, 2), AmxBlock(1, 2), AmxBlock(1, 1)
    # fastest on one thread (1.0 + 1.5), fastest on two (1.1 + 1.0), good at both (1.02 + 1.02)
    times = {1: {one: 1.0, two: 1.1, three: 1.02}, 2: {one: 1.5, two: 1.0, three: 1.02}}
    assert best_block(times) == three
    assert best_block({1: {one: 2.0, two: 1.0}}) == two


def test_block_table_keeps_other_layers_and_is_read_back(tmp_path):
    first, second = DenseTask(256, 256, 32, "amx"), DenseTask(256, 256, 640, "amx")
    write_blocks(tmp_path, {first: {1: {AmxBlock(2, 2): 2e-6, AmxBlock(1, 2): 3e-6}}})
    write_blocks(tmp_path, {second: {1: {AmxBlock(2, 2): 5e-6, AmxBlock(1, 2, True): 4e-6}}})
    assert load_blocks(tmp_path) == {(256, 256, 32): AmxBlock(2, 2), (256, 256, 640): AmxBlock(1, 2, True)}
    table = json.loads((tmp_path / BLOCKS_FILE).read_text())
    assert table["kernels"][1]["us"] == {"1": {"AMX 1x2 tiles, by columns": 4.0, "AMX 2x2 tiles": 5.0}}
    assert load_blocks(tmp_path / "none") == {}


@pytest.mark.parametrize("text", ["{", '{"kernels": 3}', '{"kernels": [{"n": 1}]}',
                                  '{"kernels": [{"n": 1, "k": 1, "rows": 32, "block": {"row_tiles": 4, "col_tiles": 4}}]}'])
def test_a_damaged_block_table_is_a_clear_error(tmp_path, text):
    (tmp_path / BLOCKS_FILE).write_text(text)
    with pytest.raises(UserError, match="is not an AMX block table .*`int8mt tune --target x86-amx` again or delete"):
        load_blocks(tmp_path)


def test_tile_chooser_takes_the_table_blocks_for_the_row_bucket(tmp_path):
    vnni = TuningDatabase(shipped_database("x86-vnni"))
    chooser = TileChooser(TuningDatabase(tmp_path, create=True), "vnni", fallback=vnni,
                          amx_blocks={(256, 256, 32): AmxBlock(1, 2, True), (256, 256, 128): AmxBlock(2, 1)})
    assert block_rows(32) == (32, 128) and block_rows(640) == (32, 640)
    tuned = chooser.choice(256, 256, "decode_step")  # searched at 32 and 128 rows
    assert tuned.tuned and tuned.tiles == replace(vnni.best(DenseTask(256, 256, 32, "vnni"))[0],
                                                  amx_small=AmxBlock(1, 2, True), amx=AmxBlock(2, 1))
    lacking = chooser.choice(256, 256, "encode")  # 32 and 640 rows: no block at 640
    assert (lacking.tiles.amx_small, lacking.tiles.amx, lacking.tuned) == (AmxBlock(1, 2, True), None, False)
    assert TileChooser(None, "vnni")(256, 256, "encode").amx is None  # not an AMX preset: no block at all


def test_shipped_blocks_cover_the_reference_models_layers():
    from int8mt.compiler.pipeline import tile_choosers

    table = load_blocks(shipped_database(AMX.name))
    for n, k in linear_shapes(*BENCH_MODELS["reference"]):
        for rows in {r for bucket in ROW_BUCKETS for r in block_rows(bucket)}:
            assert table[(n, k, rows)] in candidate_blocks(DenseTask(n, k, rows, "amx")), (n, k, rows)
    choice = tile_choosers(AMX, None)[0].choice(1024, 256, "decode_step")
    assert choice.tuned and (choice.tiles.amx_small, choice.tiles.amx) == (table[(1024, 256, 32)],
                                                                           table[(1024, 256, 128)])
    assert default_block(1024) == AmxBlock(2, 2) and default_block(48) == AmxBlock(2, 1)


@pytest.mark.slow
@pytest.mark.parametrize("preset", [runnable(AMX)])
def test_tune_cli_searches_the_blocks_of_every_kernel(capsys, tiny_model_dir, tmp_path, preset):
    from int8mt.cli import main

    assert main(["tune", str(tiny_model_dir), "--target", "x86-amx", "--trials", "2", "--db", str(tmp_path)]) == 0
    table = load_blocks(tmp_path)
    tasks = json.loads((tmp_path / "tuning-log.json").read_text())[0]["tasks"]
    assert len(tasks) == 7 and all({"amx", "amx_small"} <= set(task["best_tiles"]) for task in tasks)
    assert set(table) == {(t["n"], t["k"], rows) for t in tasks for rows in block_rows(t["rows"])}
    assert "AMX" in capsys.readouterr().out  # the table names each kernel's block
