"""Intel AMX (Advanced Matrix Extensions) for the int8 dense kernel: ``tdpbusd`` multiplies a 16 x 64 tile
of unsigned activation bytes by a 16 x 64 tile of signed weight bytes (16 columns x 4 bytes per row: exactly
the VNNI packing ``[N/16, K/4, 16, 4]``) into a 16 x 16 int32 tile, 16K multiply-adds per instruction.

The kernel (:mod:`int8mt.schedules.amx_dense`) computes 8 rows and more on tiles and fewer with the VNNI
dot product (one row of a 16-row tile would waste the rest), so the family shares VNNI's intrinsic, its
activation shift and its weight correction; K is padded to whole tiles (64 bytes). The attention's
batched matmuls (few rows per head) keep VNNI.

These are LLVM's intrinsics; tile registers are named by immediates, so loops over them are unrolled.
"""
from __future__ import annotations

from dataclasses import replace

from tvm import tirx

from .x86_vnni import VNNI_DOT

AMX_DOT = replace(VNNI_DOT, family="amx", amx_tiles=True, batch_family="vnni")

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
