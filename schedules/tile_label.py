"""How a dense kernel's tile is written in tables and reports (no TVM import: ``int8mt inspect`` uses it)."""
from __future__ import annotations


def tile_label(rows: int, cols: int, depth: int, block: tuple[int, int], row_split: int = 1) -> str:
    """``rows x output columns depth K`` of a tile whose ``cols`` and ``depth`` count the dot product's
    ``block`` = (lanes, reduce), e.g. ``4x64 depth 16`` for 4 x 4 VNNI blocks and a depth of 4; ``, rows/2``
    when the rows are cut in two parallel parts."""
    lanes, reduce = block
    return f"{rows}x{cols * lanes} depth {depth * reduce}" + (f", rows/{row_split}" if row_split > 1 else "")
