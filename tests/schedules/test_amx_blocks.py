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
from int8mt.schedules.amx_dense import BLOCKS, AmxBlock, default_block
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
        scheduled_int8_dense(64, 64, replace(default_tiles(64, 64, DOT), amx=AmxBlock(1, 3)), DOT, 32)


@pytest.mark.parametrize("block", [AmxBlock(2, 2), AmxBlock(1, 2, by_columns=True), AmxBlock(3, 1)])
def test_the_kernel_computes_its_block_and_records_it(block):
    tiles = replace(default_tiles(256, 64, DOT), amx=block)
    kernel = scheduled_int8_dense(256, 64, tiles, DOT, rows=40)  # static rows above one tile: the block alone
    assert kernel.script().count('"llvm.x86.tdpbusd"') == block.row_tiles * block.col_tiles
    assert dense_attrs(kernel)[2] == tiles


@pytest.mark.parametrize("preset", [runnable(AMX)])
@pytest.mark.parametrize("n,k", [(48, 200), (64, 64)])
def test_every_block_equals_numpy(n, k, preset):
    """Each block of the design space that fits (odd and even column tiles, K padded to 64), in both orders, at rows
    around its block's rows, on every thread of the pool."""
    rng = np.random.default_rng(n + k)
    w = rng.integers(-128, 128, (n, k), dtype=np.int8)
    packed, correction = pack_weight(w, DOT)
    for block in candidate_blocks(DenseTask(n, k, 32, "amx")):
        kernel = scheduled_int8_dense(n, k, replace(default_tiles(n, k, DOT), amx=block), DOT)
        module = tvm.compile(tvm.IRModule({"main": kernel}), target=tvm.target.Target(preset.target)).mod
        for rows in (17, 40, 100):
            a = rng.integers(-128, 128, (rows, k), dtype=np.int8)
            out = tvm.runtime.tensor(np.zeros((rows, n), np.int32))
            module["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(packed), tvm.runtime.tensor(correction), out)
            np.testing.assert_array_equal(out.numpy(), a.astype(np.int32) @ w.T.astype(np.int32), err_msg=block.label)


@pytest.mark.parametrize("rows,n,block", [(32, 32, AmxBlock(2, 2)), (12, 32, AmxBlock(2, 2)), (48, 16, AmxBlock(3, 1))])
def test_a_kernel_of_one_block_compiles(rows, n, block):
    """Static rows whose whole output is one block (a tuning task of a small model) have no parallel loop, which
    TVM would otherwise drop from the tiles' launch point and then fail to compile."""
    kernel = scheduled_int8_dense(n, 64, replace(default_tiles(n, 64, DOT), amx=block), DOT, rows)
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


def test_tile_chooser_takes_the_table_block_for_the_row_bucket(tmp_path):
    vnni = TuningDatabase(shipped_database("x86-vnni"))
    chooser = TileChooser(TuningDatabase(tmp_path, create=True), "vnni", fallback=vnni,
                          amx_blocks={(256, 256, 32): AmxBlock(1, 2, True)})
    tuned = chooser.choice(256, 256, "decode_step")
    assert tuned.tuned and tuned.tiles == replace(vnni.best(DenseTask(256, 256, 32, "vnni"))[0], amx=AmxBlock(1, 2, True))
    lacking = chooser.choice(256, 256, "encode")  # 640 rows: VNNI tiles shipped, no block
    assert lacking.tiles.amx is None and not lacking.tuned
    assert TileChooser(None, "vnni")(256, 256, "encode").amx is None  # not an AMX preset: no block at all


def test_shipped_blocks_cover_the_reference_models_layers():
    from int8mt.compiler.pipeline import tile_chooser

    table = load_blocks(shipped_database(AMX.name))
    for n, k in linear_shapes(*BENCH_MODELS["reference"]):
        for rows in ROW_BUCKETS:
            assert table[(n, k, rows)] in candidate_blocks(DenseTask(n, k, rows, "amx")), (n, k, rows)
    choice = tile_chooser(AMX, None).choice(1024, 256, "decode_step")
    assert choice.tuned and choice.tiles.amx == table[(1024, 256, 32)]
    assert default_block(1024) == AmxBlock(2, 2) and default_block(48) == AmxBlock(2, 1)


@pytest.mark.slow
@pytest.mark.parametrize("preset", [runnable(AMX)])
def test_tune_cli_searches_the_blocks_of_every_kernel(capsys, tiny_model_dir, tmp_path, preset):
    from int8mt.cli import main

    assert main(["tune", str(tiny_model_dir), "--target", "x86-amx", "--trials", "2", "--db", str(tmp_path)]) == 0
    table = load_blocks(tmp_path)
    log = json.loads((tmp_path / "tuning-log.json").read_text())[0]
    assert len(table) == len(log["tasks"]) == 7 and all("amx_block" in task for task in log["tasks"])
    assert "AMX" in capsys.readouterr().out  # the table names each kernel's block
