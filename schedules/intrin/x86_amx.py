"""Intel AMX (Advanced Matrix Extensions) for the int8 dense kernel: ``tdpbusd`` multiplies a 16 x 64 tile
of unsigned activation bytes by a 16 x 64 tile of signed weight bytes (16 columns x 4 bytes per row: exactly
the VNNI packing ``[N/16, K/4, 16, 4]``) into a 16 x 16 int32 tile, 16K multiply-adds per instruction.

The kernel (:mod:`int8mt.schedules.amx_dense`) computes 8 rows and more on tiles and fewer with the VNNI
dot product (one row of a 16-row tile would waste the rest), so the family shares VNNI's intrinsic, its
activation shift and its weight correction; K is padded to whole tiles (64 bytes). The attention's batched
matmuls run on tiles too (:mod:`int8mt.schedules.amx_batch_matmul`, ``tdpbssd``: both operands signed).

These are LLVM's intrinsics; tile registers are named by immediates, so loops over them are unrolled.
"""
from __future__ import annotations

from dataclasses import replace

from tvm import tirx
from tvm.script.ir_builder import tirx as Tb

from .dot import AMX_TILE_BYTES
from .x86_vnni import VNNI_DOT

AMX_DOT = replace(VNNI_DOT, family="amx", amx_tiles=True)

TILE_REGISTERS = 8  # tmm0-tmm7
TILE_ROWS = 16  # rows of every tile the kernel configures (bytes per row: AMX_TILE_BYTES)
CONFIG_BYTES = 64  # the ``ldtilecfg`` operand: palette, then bytes per row and rows of each tile


def tile_call(name: str, *args: tirx.PrimExpr) -> tirx.PrimExpr:
    """``llvm.x86.<name>(args)`` (void): tile ids are ``uint8`` immediates, strides ``int64`` bytes."""
    return tirx.call_llvm_intrin("void", f"llvm.x86.{name}", *args)


def tile_id(tile: int) -> tirx.PrimExpr:
    return tirx.const(tile, "uint8")


def stride(nbytes: int) -> tirx.PrimExpr:
    return tirx.const(nbytes, "int64")


def configure_tiles() -> None:
    """Emit (into the current IR builder frame) ``ldtilecfg`` of palette 1 with every tile 16 rows of 64 bytes,
    from a configuration buffer allocated here (the configuration is per thread: emit it in each thread)."""
    config = Tb.alloc_buffer((CONFIG_BYTES,), "uint8", scope="local")
    with Tb.serial(0, CONFIG_BYTES) as b:
        Tb.buffer_store(config, Tb.uint8(0), [b])
    Tb.buffer_store(config, Tb.uint8(1), [0])  # palette 1
    for tile in range(TILE_REGISTERS):
        Tb.buffer_store(config, Tb.uint8(AMX_TILE_BYTES), [16 + 2 * tile])  # bytes per row
        Tb.buffer_store(config, Tb.uint8(TILE_ROWS), [48 + tile])
    Tb.evaluate(tile_call("ldtilecfg", Tb.address_of(config[0])))
