"""The AMX part of the int8 dense kernel (:func:`~int8mt.schedules.int8_dense.int8_dense` for a dot product with
``amx_tiles``): ``C[m, n] = A[m, k] . W[n, k]`` for ``MIN_ROWS`` rows and more on AMX tiles.

The activations are staged shifted to uint8 (as for VNNI) in the tile layout ``[tiles, K/64, 16, 64]``, so that
each 16 x 64 activation tile is 1 KB of contiguous bytes like the weights' tiles (loading them with a row stride
of K ran ~25 % slower). The output is cut into blocks of :class:`AmxBlock` ``row_tiles`` x ``col_tiles`` 16 x 16
tiles (2 x 2: four accumulators, two activation and two weight tiles, all eight tile registers); up to
``ONE_TILE_ROWS`` rows a block is one row tile. Blocks run in parallel, row-block major (a thread's consecutive
blocks share their activations) or column-block major (their weights). Each thread configures the tiles once (a
``pragma_parallel_launch_point`` region: the configuration is per thread) and releases them at the end. A block
zeroes its accumulators, walks K one tile at a time, stores the int32 tiles to a buffer of its own and applies the
epilogue (or the correction alone) to the rows below m, 16 columns at a time.

The block is the AMX kernel's tuning knob: :data:`BLOCKS` is its design space, searched per linear layer by
``int8mt tune`` (:mod:`.amx_blocks`) at two row counts, one for up to ``SMALL_ROWS`` rows and one above;
:func:`default_block` applies where nothing was searched.

Written as loops in one opaque block: the schedule of the VNNI branches does not touch it, and the tile
registers, which instructions name by immediates, come out of unrolled loops.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

from tvm import tirx
from tvm.script.ir_builder import tirx as Tb

from .intrin.dot import AMX_TILE_BYTES, Int8Dot
from .intrin.x86_amx import TILE_REGISTERS, TILE_ROWS, configure_tiles, stride, tile_call, tile_id
from .tile_label import amx_block_label

ONE_TILE_ROWS = TILE_ROWS  # up to this many rows a block is one row tile: 25-40 % faster at 8-16 rows
# kernels with fewer rows run the VNNI dot product: from 8 rows tiles took less time than the VNNI kernel at the
# reference model's shapes on one thread and on two; from one row they were faster alone, slower in the model
MIN_ROWS = 8
# Blocks above ONE_TILE_ROWS: up to SMALL_ROWS rows (a greedy decoder step of 32 sentences, an encoder call of one or
# two) the block searched at SMALL_BLOCK_ROWS rows, above it the one searched at the entry point's many rows (a
# beam-4 step of 32 sentences, an encoder call of 32): 1 x 2 tiles that won at 32 rows on two threads lost at 128
SMALL_ROWS = 64
SMALL_BLOCK_ROWS = 32
BEAM_STEP_ROWS = 128  # where a decoder step's block above SMALL_ROWS is searched (an encoder's: at its 640 rows)


@dataclass(frozen=True)
class AmxBlock:
    """The output block one thread computes at a time, ``row_tiles`` x ``col_tiles`` tiles of 16 x 16 int32, and
    the order of the blocks: row-block major (consecutive blocks share activation tiles) or ``by_columns``."""

    row_tiles: int = 2
    col_tiles: int = 2
    by_columns: bool = False

    def __post_init__(self) -> None:
        if min(self.row_tiles, self.col_tiles) < 1 or self.registers > TILE_REGISTERS:
            raise ValueError(f"an AMX block of {self.row_tiles} x {self.col_tiles} tiles needs {self.registers} "
                             f"tile registers (accumulators, activations, weights); there are {TILE_REGISTERS}")

    @property
    def registers(self) -> int:
        return self.row_tiles * self.col_tiles + self.row_tiles + self.col_tiles

    @property
    def label(self) -> str:
        return amx_block_label(**self.to_dict())

    def fits(self, np_: int) -> bool:
        """Whether its column tiles divide ``np_`` (padded) columns."""
        return np_ // TILE_ROWS % self.col_tiles == 0

    def to_dict(self) -> dict:
        return {"row_tiles": self.row_tiles, "col_tiles": self.col_tiles, "by_columns": self.by_columns}


# The design space: every block that fits the eight tile registers (1 x 3 and 3 x 1 use seven), in both orders.
BLOCKS = tuple(AmxBlock(r, c, by_columns) for r, c in ((2, 2), (1, 2), (2, 1), (1, 1), (1, 3), (3, 1))
               for by_columns in (False, True))


def default_block(np_: int) -> AmxBlock:
    """The block of a kernel nothing was searched for: 2 x 2 tiles (2 x 1 where the column tiles are odd)."""
    return AmxBlock(2, 2 if np_ // TILE_ROWS % 2 == 0 else 1)


def block_rows(bucket: int) -> tuple[int, int]:
    """The row counts at which the blocks of a kernel tuned for ``bucket`` rows are searched: its block up to
    ``SMALL_ROWS`` rows, and above."""
    return SMALL_BLOCK_ROWS, bucket if bucket > SMALL_ROWS else BEAM_STEP_ROWS


def one_tile_block(np_: int) -> AmxBlock:
    """The block of ``ONE_TILE_ROWS`` rows or fewer: one row tile of the default block's column tiles."""
    return AmxBlock(1, default_block(np_).col_tiles)


def static_rows_block(small: AmxBlock | None, large: AmxBlock | None, np_: int, rows: int) -> AmxBlock:
    """The block that computes a static count of ``rows`` rows (at least ``MIN_ROWS``) for a kernel whose blocks
    up to ``SMALL_ROWS`` rows and above are ``small`` and ``large`` (None: the default)."""
    if rows <= ONE_TILE_ROWS:
        return one_tile_block(np_)
    return (large if rows > SMALL_ROWS else small) or default_block(np_)


def amx_product_and_store(A: tirx.Buffer, w: tirx.Buffer, correction: tirx.Buffer, C: tirx.Buffer,
                          M: tirx.PrimExpr, n: int, k: int, np_: int, kp: int, dot: Int8Dot, store,
                          block: AmxBlock, name: str = "amx") -> None:
    """Emit (into the current IR builder frame) the block ``name`` computing C in blocks of ``block``'s tiles:
    staging, tiles, epilogue. ``store(total, i, j)`` stores the int32 sum (correction added) of row ``i``, column
    ``j``."""
    if not block.fits(np_):
        raise ValueError(f"{block.label}: {block.col_tiles} column tiles do not divide {np_} columns")
    row_tiles = block.row_tiles
    a_tiles, b_tiles = row_tiles, block.col_tiles  # registers: accumulators 0.., then activation, then weight tiles
    block_rows, block_cols = row_tiles * TILE_ROWS, b_tiles * TILE_ROWS
    i64 = Tb.int64
    row_blocks = (M + block_rows - 1) // block_rows
    col_blocks = np_ // block_cols
    k_tiles = kp // AMX_TILE_BYTES
    with Tb.sblock(name):
        Tb.reads(A[0:M, 0:k], w[0:np_ // dot.lanes, 0:kp // dot.reduce, 0:dot.lanes, 0:dot.reduce],
                 correction[0:np_])
        Tb.writes(C[tuple(slice(0, d) for d in C.shape)])
        staged = Tb.alloc_buffer((row_blocks * row_tiles, i64(k_tiles), i64(TILE_ROWS), i64(AMX_TILE_BYTES)), "uint8")
        with Tb.parallel(i64(0), row_blocks * row_tiles) as t:
            with Tb.serial(i64(0), i64(k_tiles)) as kt:
                with Tb.serial(i64(0), i64(TILE_ROWS)) as r:
                    with Tb.vectorized(i64(0), i64(AMX_TILE_BYTES)) as b:
                        row, col = t * TILE_ROWS + r, kt * AMX_TILE_BYTES + b
                        present = Tb.And(row < M, col < k) if k % AMX_TILE_BYTES else row < M
                        # (both sides may be computed for a vector: the load is clamped into A)
                        loaded = Tb.reinterpret("uint8", A[Tb.min(row, M - 1), Tb.min(col, k - 1)])
                        value = Tb.if_then_else(present, Tb.bitwise_xor(loaded, Tb.uint8(dot.shift)),
                                                Tb.uint8(dot.shift))
                        Tb.buffer_store(staged, value, [t, kt, r, b])
        # one block in all (static rows): no parallel loop, which TVM would drop and then find none in the launch point
        single = isinstance(M, tirx.IntImm) and -(-M.value // block_rows) * col_blocks == 1
        with Tb.attr(0, "pragma_parallel_launch_point", 1) if not single else nullcontext():
            configure_tiles()  # (the storage planner may give the threads one buffer for it: they write the same bytes)
            with (Tb.serial if single else Tb.parallel)(i64(0), row_blocks * col_blocks) as item:
                # (allocated in the parallel loop, each thread's own: TVM's storage planner hoists allocations
                # out of a launch point's region to the function, where the threads would share them)
                sums = Tb.alloc_buffer((block_rows, block_cols), "int32", scope="local")
                rb, cb = ((item % row_blocks, item // row_blocks) if block.by_columns
                          else (item // col_blocks, item % col_blocks))
                for acc in range(a_tiles * b_tiles):
                    Tb.evaluate(tile_call("tilezero", tile_id(acc)))
                with Tb.serial(i64(0), i64(k_tiles)) as kt:
                    for r in range(a_tiles):
                        Tb.evaluate(tile_call("tileloadd64", tile_id(a_tiles * b_tiles + r),
                                              Tb.address_of(staged[rb * row_tiles + r, kt, 0, 0]),
                                              stride(AMX_TILE_BYTES)))
                    for c in range(b_tiles):
                        Tb.evaluate(tile_call("tileloadd64", tile_id(a_tiles * b_tiles + a_tiles + c),
                                              Tb.address_of(w[cb * b_tiles + c, kt * (AMX_TILE_BYTES // dot.reduce),
                                                              0, 0]),
                                              stride(AMX_TILE_BYTES)))
                    for r in range(a_tiles):
                        for c in range(b_tiles):
                            Tb.evaluate(tile_call("tdpbusd", tile_id(r * b_tiles + c), tile_id(a_tiles * b_tiles + r),
                                                  tile_id(a_tiles * b_tiles + a_tiles + c)))
                for r in range(a_tiles):
                    for c in range(b_tiles):
                        Tb.evaluate(tile_call("tilestored64", tile_id(r * b_tiles + c),
                                              Tb.address_of(sums[r * TILE_ROWS, c * TILE_ROWS]),
                                              stride(block_cols * 4)))
                with Tb.serial(i64(0), i64(block_rows)) as r:
                    row = rb * block_rows + r
                    with Tb.If(row < M):
                        with Tb.Then():
                            for c in range(b_tiles):
                                _store_columns(sums, correction, row, r, cb * block_cols + c * TILE_ROWS,
                                               c * TILE_ROWS, n, store)
            Tb.evaluate(tile_call("tilerelease"))


def _store_columns(sums: tirx.Buffer, correction: tirx.Buffer, row, r, first: tirx.PrimExpr, offset: int, n: int,
                   store) -> None:
    """Store 16 columns from ``first`` of ``row`` (``sums`` row ``r`` from column ``offset``): one vector, or
    column by column below ``n`` where the tile reaches into the padding."""
    i64 = Tb.int64

    def emit(j, lane):
        store(sums[r, offset + lane] + correction[j], row, j)

    if n % TILE_ROWS == 0:
        with Tb.vectorized(i64(0), i64(TILE_ROWS)) as lane:
            emit(first + lane, lane)
        return
    with Tb.If(first + TILE_ROWS <= n):
        with Tb.Then():
            with Tb.vectorized(i64(0), i64(TILE_ROWS)) as lane:
                emit(first + lane, lane)
        with Tb.Else():
            with Tb.serial(i64(0), i64(TILE_ROWS)) as lane:
                with Tb.If(first + lane < n):
                    with Tb.Then():
                        emit(first + lane, lane)
