"""The runtime's self-attention cache: rows appended in place, history reordered on the host."""
import numpy as np
import pytest

from int8mt.runtime.bundle import import_tvm_ffi
from int8mt.runtime.cache import SelfAttentionCache

LAYERS, HEADS, HEAD_DIM = 2, 3, 4


@pytest.fixture(params=[True, False], ids=["numpy", "tvm-copies"])
def on_host(request) -> bool:
    """Rows written by NumPy (the CPU) or by TVM's copies into views (how a GPU's are; run on the CPU here)."""
    return request.param


def _cache(batch: int, positions: int, on_host: bool) -> tuple[SelfAttentionCache, object]:
    ffi = import_tvm_ffi()
    cache = SelfAttentionCache(ffi, ffi.device("cpu", 0), LAYERS, HEADS, HEAD_DIM, "int8", batch, positions, on_host)
    return cache, ffi


def _step_kv(count: int, first: int) -> list[np.ndarray]:
    """A step's new keys and values ([count, heads, 1, head_dim] per layer and kind): distinct values per layer,
    kind and hypothesis."""
    rows = (first + np.arange(count)).reshape(count, 1, 1, 1)
    return [np.broadcast_to(50 * plane + rows, (count, HEADS, 1, HEAD_DIM)).astype(np.int8)
            for plane in range(2 * LAYERS)]


def _as_rows(steps: list[list[np.ndarray]]) -> np.ndarray:
    """The rows [layers, 2, N, heads, head_dim] that ``steps`` write, in order."""
    return np.concatenate([np.stack(kv)[:, :, :, 0].reshape(LAYERS, 2, -1, HEADS, HEAD_DIM) for kv in steps], axis=2)


def _append(cache: SelfAttentionCache, ffi, kv: list[np.ndarray]) -> None:
    cache.append([ffi.from_dlpack(np.ascontiguousarray(a)) for a in kv])


def _written(cache: SelfAttentionCache) -> np.ndarray:
    """The rows written so far (row 0, which holds no position, left out)."""
    return np.from_dlpack(cache.rows)[:, :, 1:cache.used]


def test_steps_append_rows_and_history_names_each_hypothesis_row(on_host):
    cache, ffi = _cache(batch=3, positions=2, on_host=on_host)
    steps = [_step_kv(3, 0), _step_kv(3, 10)]
    for kv in steps:
        _append(cache, ffi, kv)
    assert cache.used == 7 and cache.history.tolist() == [[1, 4, 0], [2, 5, 0], [3, 6, 0]]
    np.testing.assert_array_equal(_written(cache), _as_rows(steps))


def test_reordering_hypotheses_moves_no_rows(on_host):
    cache, ffi = _cache(batch=3, positions=4, on_host=on_host)
    _append(cache, ffi, _step_kv(3, 0))
    cache.select(np.array([2, 2, 0]))  # beams: hypothesis 2 continued twice, hypothesis 1 dropped
    _append(cache, ffi, _step_kv(3, 10))
    cache.select(np.array([1]))  # a sentence finished: one hypothesis left
    assert cache.history.tolist() == [[3, 5, 0]] and cache.history.flags.c_contiguous
    assert cache.used == 7


def test_outgrowing_the_buffer_keeps_the_rows(on_host):
    cache, ffi = _cache(batch=2, positions=1, on_host=on_host)
    before = cache.nbytes
    steps = [_step_kv(2, 10 * step) for step in range(5)]
    for kv in steps:
        _append(cache, ffi, kv)
    assert cache.nbytes > before and cache.history.shape == (2, 6)
    np.testing.assert_array_equal(_written(cache), _as_rows(steps))
