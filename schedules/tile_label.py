"""How a dense kernel's tile is written in tables and reports (no TVM import: ``int8mt inspect`` uses it)."""
from __future__ import annotations


def tile_label(rows: int, cols: int, depth: int, block: tuple[int, int], row_split: int = 1,
               amx: dict | None = None, amx_small: dict | None = None) -> str:
    """``rows x output columns depth K`` of a tile whose ``cols`` and ``depth`` count the dot product's
    ``block`` = (lanes, reduce), e.g. ``4x64 depth 16`` for 4 x 4 VNNI blocks and a depth of 4; ``, rows/2``
    when the rows are cut in two parallel parts; then the AMX blocks' :func:`amx_block_label`, if any (the one up
    to 64 rows, ``amx_dense.SMALL_ROWS``, then the one above)."""
    lanes, reduce = block
    label = f"{rows}x{cols * lanes} depth {depth * reduce}" + (f", rows/{row_split}" if row_split > 1 else "")
    blocks = [f"{amx_block_label(**found)}{where}" for found, where in ((amx_small, " up to 64 rows"), (amx, " above"))
              if found is not None]
    return label if not blocks else f"{label}; {', '.join(blocks)}"


def amx_block_label(row_tiles: int, col_tiles: int, by_columns: bool) -> str:
    """``AMX 2x2 tiles`` (``, by columns`` where blocks run column-block major)."""
    return f"AMX {row_tiles}x{col_tiles} tiles" + (", by columns" if by_columns else "")
