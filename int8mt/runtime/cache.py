"""A batch's self-attention cache on the bundle's device: cache rows that the decoder steps append to in place.

The layout is the model's (:mod:`int8mt.model.transformer`): ``rows[layers, 2, N, heads, head_dim]``, row ``n``
being one decoded position of a hypothesis (row 0 holds none), and ``history[batch, T + 1]`` naming the row of
each of a hypothesis's positions (the step's own last, as 0). The rows live in one buffer allocated for the
batch's longest output, which the decoder step reads whole (rows no position names are never read); the step
writes its new rows into each layer's keys and values after the rows already there (its ``rows_used`` input),
so no step copies the cache it has. Each layer's keys (and values) are contiguous: a
step's gather of them stays within one region of memory (with every layer's keys and values of a position side
by side, each gathered position was another page and the gathers ran 2-4x slower). Reordering hypotheses (beams)
or dropping finished ones reorders ``history``'s rows on the host; the device's rows never move. With run-time
ranges a second buffer of the same layout holds each row's float32 scales (``[..., heads, 1]``), written and read
with the rows.
"""
from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any

from .tensors import TENSOR_ALIGNMENT, tensor_functions

if TYPE_CHECKING:
    import numpy as np


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype | str) -> np.ndarray:
    """An uninitialized C-contiguous array whose data starts at a multiple of ``TENSOR_ALIGNMENT`` bytes (an input
    of the entry points that needs no copy to become one)."""
    import numpy as np  # (here: loading a bundle imports no NumPy, see :mod:`int8mt.runtime.tensors`)

    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    buffer = np.empty(nbytes + TENSOR_ALIGNMENT, np.uint8)
    start = -buffer.__array_interface__["data"][0] % TENSOR_ALIGNMENT  # (ctypes.data costs microseconds)
    return buffer[start:start + nbytes].view(dtype).reshape(shape)


CACHED_SHAPES = 256  # ``used`` values below this get their shape made once (small batches, where a µs counts)


@functools.lru_cache(maxsize=CACHED_SHAPES)
def _cached_shape(ffi: Any, used: int) -> Any:
    return ffi.Shape((used,))


def _rows_used(ffi: Any, used: int) -> Any:
    """The decoder step's ``rows_used`` argument (a shape): made once per value below ``CACHED_SHAPES`` (making one
    costs a microsecond, a tenth of a batch-1 step's host work); larger values are made each time (keeping
    thousands of them raised the peak memory of greedy batch 32 by 7 MiB)."""
    return _cached_shape(ffi, used) if used < CACHED_SHAPES else ffi.Shape((used,))


HISTORY_ALIGNMENT = TENSOR_ALIGNMENT // 8  # int64 elements


@functools.lru_cache(maxsize=CACHED_SHAPES)
def _row_parts(ffi: Any, heads: int, head_dim: int, dtype: str, scales: bool) -> list[tuple[tuple, Any, int]]:
    """Each cache buffer's row shape, TVM dtype and row bytes: the keys/values, then (``scales``) their scales."""
    return [(row, ffi.dtype(kind), math.prod(row) * ffi.dtype(kind).itemsize)
            for row, kind in [((heads, head_dim), dtype)] + [((heads, 1), "float32")] * scales]


class CacheRows:
    """The cache rows of one batch on the device: a buffer of keys and values, and one of their scales with
    run-time ranges."""

    def __init__(self, ffi: Any, device: Any, layers: int, heads: int, head_dim: int, dtype: str, scales: bool,
                 rows: int) -> None:
        """Room for ``rows`` rows (row 0 included); ``scales``: rows of ``dtype`` int8 carry a float32 scale per
        head."""
        self._ffi, self._device = ffi, device
        self._create_view, self._copy, self._alloc = tensor_functions(ffi)
        self._layers, self._planes = layers, 2 * layers  # (layer, key or value) planes of rows
        self._parts = _row_parts(ffi, heads, head_dim, dtype, scales)
        self._buffers: list[Any] = []
        self._allocate(rows)
        self.used = 1  # rows written: row 0 holds no position (the decoder step reads it and discards it)

    def _allocate(self, rows: int) -> None:
        self._capacity = rows
        self._buffers = [self._alloc(self._ffi.Shape((self._layers, 2, rows, *row)), dtype, self._device, "global")
                         for row, dtype, _ in self._parts]

    def _grow(self, rows: int) -> None:
        """Buffers of ``rows`` rows per plane, holding the rows written so far."""
        old, old_capacity = self._buffers, self._capacity
        self._allocate(rows)
        for part, buffer in enumerate(self._buffers):
            for plane in range(self._planes):
                self._copy(self._rows(old[part], part, plane, 0, self.used, old_capacity),
                           self._rows(buffer, part, plane, 0, self.used, self._capacity))

    def _rows(self, tensor: Any, part: int, plane: int, start: int, count: int, capacity: int) -> Any:
        """Rows ``start .. start + count`` of ``plane`` in ``tensor`` (a buffer of part ``part``, planes of
        ``capacity`` rows): a view."""
        row, dtype, row_bytes = self._parts[part]
        return self._create_view(tensor, self._ffi.Shape((count, *row)), dtype, (plane * capacity + start) * row_bytes)

    @property
    def inputs(self) -> tuple[Any, ...]:
        """The decoder step's cache inputs: the whole buffers (rows, and their scales)."""
        return tuple(self._buffers)

    @property
    def nbytes(self) -> int:
        """Bytes of the device buffers."""
        return sum(self._planes * self._capacity * row_bytes for _, _, row_bytes in self._parts)


class SelfAttentionCache(CacheRows):
    """The cache rows of one batch (:class:`CacheRows`) and each hypothesis's history (NumPy)."""

    def __init__(self, ffi: Any, device: Any, layers: int, heads: int, head_dim: int, dtype: str, scales: bool,
                 batch: int, positions: int) -> None:
        """Room for ``positions`` steps of ``batch`` hypotheses; more is allocated (and the rows moved) only if
        the steps outgrow it."""
        super().__init__(ffi, device, layers, heads, head_dim, dtype, scales, 1 + batch * positions)
        # the history alternates between two aligned buffers (one allocation), each with room for ``positions`` steps
        room = -(-batch * (positions + 1) // HISTORY_ALIGNMENT) * HISTORY_ALIGNMENT
        memory = aligned_empty((2 * room,), "int64")
        self._history_memory = [memory[:room], memory[room:]]
        self.history = self._new_history(batch, 1)
        self.history[:] = 0

    def reserve_step(self) -> Any:
        """Before a step: room for its rows (one per hypothesis, in the order of ``history``'s rows), the buffers
        grown if need be; returns the step's ``rows_used`` input (it writes its rows after the rows written so
        far)."""
        count = len(self.history)  # the step's hypotheses
        if self.used + count > self._capacity:
            self._grow(max(2 * self._capacity, self.used + count))
        return _rows_used(self._ffi, self.used)

    def record_step(self) -> None:
        """After a step: each hypothesis's new row in its history (one hypothesis's grows in place, within the room
        made for ``positions`` steps: a batch-1 step's host work runs with the caches the step's weights went
        through, where each NumPy call costs microseconds)."""
        count, positions = self.history.shape
        memory = self._history_memory[-1]  # (the one ``history`` starts)
        if count == 1 and memory.size > positions:
            memory[positions - 1] = self.used
            memory[positions] = 0
            self.history = memory[:positions + 1].reshape(1, positions + 1)
            self.used += 1
            return
        import numpy as np  # (as in :func:`aligned_empty`)

        history = self._new_history(count, positions + 1)
        history[:, :positions - 1] = self.history[:, :-1]
        history[:, positions - 1] = np.arange(self.used, self.used + count)
        history[:, positions] = 0
        self.history = history
        self.used += count

    def select(self, hypotheses: np.ndarray) -> None:
        """Keep the hypotheses ``hypotheses`` (indices of ``history``'s rows, repeats allowed), in that order."""
        history = self._new_history(len(hypotheses), self.history.shape[1])
        self.history.take(hypotheses, axis=0, out=history)
        self.history = history

    def _new_history(self, rows: int, columns: int) -> np.ndarray:
        """An aligned [rows, columns] array for the next history (the step's input without a copy), in the buffer the
        current one is not in: a fresh aligned array per step cost microseconds at batch 1."""
        memory = self._history_memory.pop(0)
        if memory.size < rows * columns:
            memory = aligned_empty((max(rows * columns, 2 * memory.size),), "int64")
        self._history_memory.append(memory)
        return memory[:rows * columns].reshape(rows, columns)

