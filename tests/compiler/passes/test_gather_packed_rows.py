"""GatherPackedRows: an embedding lookup in an int8 table reads its rows from the packed table, and shares the
packed constant a dense kernel of the same function already reads (a tied embedding is stored once)."""
import numpy as np
import tvm
from tvm import relax

from int8mt.compiler.passes import GatherPackedRows, PackDense
from int8mt.schedules.int8_dense import default_tiles, packed_rows

from ._modules import DOT, dense_kernel, function, packed, tiles_for, weight

TABLE = weight(40, 16)  # 40 rows: padded to a multiple of the lanes when packed


def _ids() -> relax.Var:
    return relax.Var("ids", relax.TensorType([tvm.tirx.Var("b", "int64"), 2], "int64"))


def _rows_kernel(bb: relax.BlockBuilder) -> tvm.ir.GlobalVar:
    name = "int8_packed_rows_n40_k16_int64"
    return bb.add_func(packed_rows(40, 16, "int64", DOT).without_attr("global_symbol"), name)


def test_lookup_reads_the_packed_table():
    before = function(relax.BlockBuilder(), [_ids()], lambda bb, ids: relax.op.take(relax.const(TABLE), ids, axis=0))
    bb = relax.BlockBuilder()
    kernel = _rows_kernel(bb)
    ids = _ids()
    b = ids.ty.shape[0]

    def body(bb, ids):
        flat = bb.emit(relax.op.reshape(ids, [b * 2]))
        rows = bb.emit(relax.call_tir(kernel, [flat, packed(TABLE)[0]], relax.TensorType([b * 2, 16], "int8")))
        return relax.op.reshape(rows, [b, 2, 16])

    tvm.ir.assert_structural_equal(GatherPackedRows(DOT)(before), function(bb, [ids], body))


def _tied(bb: relax.BlockBuilder, ids: relax.Var) -> relax.Expr:
    """take(E, ids), then logits = rows . E^T: a decoder's tied embedding and output projection."""
    table = relax.const(TABLE)
    rows = bb.emit(relax.op.reshape(bb.emit(relax.op.take(table, ids, axis=0)), [-1, 16]))
    return relax.op.matmul(rows, bb.emit(relax.op.permute_dims(table, [1, 0])), out_dtype="int32")


def test_tied_table_shares_the_dense_kernels_packed_constant():
    after = GatherPackedRows(DOT)(PackDense(tiles_for(), DOT)(function(relax.BlockBuilder(), [_ids()], _tied)))
    bb = relax.BlockBuilder()
    dense = dense_kernel(bb, 40, 16, default_tiles(40, 16, DOT))
    rows_kernel = _rows_kernel(bb)
    ids = _ids()
    b = ids.ty.shape[0]
    table, correction = packed(TABLE)

    def body(bb, ids):
        flat = bb.emit(relax.op.reshape(ids, [b * 2]))
        rows = bb.emit(relax.call_tir(rows_kernel, [flat, table], relax.TensorType([b * 2, 16], "int8")))
        h = bb.emit(relax.op.reshape(bb.emit(relax.op.reshape(rows, [b, 2, 16])), [b * 2, 16]))
        return relax.call_tir(dense, [h, table, correction], relax.TensorType([b * 2, 40], "int32"))

    tvm.ir.assert_structural_equal(after, function(bb, [ids], body))
    int8_constants = []
    relax.analysis.post_order_visit(after["main"], lambda e: int8_constants.append(e) if isinstance(
        e, tvm.ir.expr.Constant) and str(e.ty.dtype) == "int8" else None)
    assert len(int8_constants) == 2 and int8_constants[0].same_as(int8_constants[1])  # one object, stored once
    assert np.array_equal(int8_constants[0].value.numpy(), table.value.numpy())
