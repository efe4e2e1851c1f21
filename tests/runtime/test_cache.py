"""The runtime's self-attention cache: room for each step's rows, their history, reordered on the host."""

import numpy as np

from int8mt.runtime.bundle import import_tvm_ffi
from int8mt.runtime.cache import SelfAttentionCache
from int8mt.runtime.tensors import TENSOR_ALIGNMENT

LAYERS, HEADS, HEAD_DIM = 2, 3, 4


def _cache(batch: int, positions: int, scales: bool = False) -> SelfAttentionCache:
    ffi = import_tvm_ffi()
    return SelfAttentionCache(ffi, ffi.device("cpu", 0), LAYERS, HEADS, HEAD_DIM, "int8", scales, batch, positions)


def _step_kv(count: int, first: int, width: int = HEAD_DIM, dtype: str = "int8") -> list[np.ndarray]:
    """A step's new keys and values ([count, heads, 1, width] per layer and kind; ``width`` 1 for their scales):
    distinct values per layer, kind and hypothesis."""
    rows = (first + np.arange(count)).reshape(count, 1, 1, 1)
    return [np.broadcast_to(50 * plane + rows, (count, HEADS, 1, width)).astype(dtype) for plane in range(2 * LAYERS)]


def _as_rows(steps: list[list[np.ndarray]], width: int = HEAD_DIM) -> np.ndarray:
    """The rows [layers, 2, N, heads, width] that ``steps`` write, in order."""
    return np.concatenate([np.stack(kv)[:, :, :, 0].reshape(LAYERS, 2, -1, HEADS, width) for kv in steps], axis=2)


def _step(cache: SelfAttentionCache, kv: list[np.ndarray]) -> None:
    """One decoder step's part in the cache: room for its rows, its keys and values (then their scales) written
    where the compiled step writes them (after the ``rows_used`` first rows of each plane), its rows recorded."""
    (used,) = cache.reserve_step()
    count = len(kv[0])
    for part, buffer in enumerate(cache.inputs):
        planes = kv[part * 2 * LAYERS:(part + 1) * 2 * LAYERS]
        np.from_dlpack(buffer)[:, :, used:used + count] = np.stack(planes)[:, :, :, 0].reshape(
            LAYERS, 2, count, HEADS, -1)
    cache.record_step()


def _written(cache: SelfAttentionCache, part: int = 0) -> np.ndarray:
    """The rows written so far (row 0, which holds no position, left out): the keys/values, or (``part`` 1) their
    scales."""
    return np.from_dlpack(cache.inputs[part])[:, :, 1:cache.used]


def test_steps_write_after_the_rows_used_and_history_names_each_hypothesis_row():
    cache = _cache(batch=3, positions=2)
    steps = [_step_kv(3, 0), _step_kv(3, 10)]
    for kv in steps:
        _step(cache, kv)
    assert cache.used == 7 and cache.history.tolist() == [[1, 4, 0], [2, 5, 0], [3, 6, 0]]
    np.testing.assert_array_equal(_written(cache), _as_rows(steps))


def test_reordering_hypotheses_moves_no_rows():
    cache = _cache(batch=3, positions=4)
    _step(cache, _step_kv(3, 0))
    cache.select(np.array([2, 2, 0]))  # beams: hypothesis 2 continued twice, hypothesis 1 dropped
    _step(cache, _step_kv(3, 10))
    cache.select(np.array([1]))  # a sentence finished: one hypothesis left
    assert cache.history.tolist() == [[3, 5, 0]] and cache.history.flags.c_contiguous
    assert cache.history.__array_interface__["data"][0] % TENSOR_ALIGNMENT == 0  # the step's input without a copy
    assert cache.used == 7


def test_outgrowing_the_buffer_keeps_the_rows():
    cache = _cache(batch=2, positions=1)
    before = cache.nbytes
    steps = [_step_kv(2, 10 * step) for step in range(5)]
    for kv in steps:
        _step(cache, kv)
    assert cache.nbytes > before and cache.history.shape == (2, 6)
    np.testing.assert_array_equal(_written(cache), _as_rows(steps))


def test_scales_are_written_and_kept_with_their_rows():
    """With run-time ranges a second buffer holds each row's scales: a step's new keys and values come first, then
    their scales in the same order."""
    cache = _cache(batch=2, positions=1, scales=True)
    steps = [(_step_kv(2, 10 * step), _step_kv(2, 10 * step + 1, width=1, dtype="float32")) for step in range(4)]
    for kv, scales in steps:
        _step(cache, kv + scales)
    assert len(cache.inputs) == 2 and cache.history.tolist() == [[1, 3, 5, 7, 0], [2, 4, 6, 8, 0]]
    np.testing.assert_array_equal(_written(cache), _as_rows([kv for kv, _ in steps]))
    np.testing.assert_array_equal(_written(cache, 1), _as_rows([scales for _, scales in steps], width=1))
