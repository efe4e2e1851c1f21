"""When the runtime releases TVM's memory pools: never for step sizes seen since the last release, and for new
sizes only once enough of them hold enough bytes (on a GPU more of them, each counted at least as its pages)."""
from int8mt.runtime.bundle import (GPU_POOL_BUDGET_BYTES, GPU_RELEASE_POOLS_SIZES, GPU_STEP_BYTES, POOL_BUDGET_BYTES,
                                   RELEASE_POOLS_MIN_BYTES, RELEASE_POOLS_SIZES, PooledSizes)


def _admit_all(pooled: PooledSizes, sizes, nbytes: int) -> int:
    releases = []
    for size in sizes:
        pooled.admit(("bundle", *size), nbytes, lambda: releases.append(1))
    return len(releases)


def test_sizes_seen_since_the_last_release_never_release_the_pools():
    pooled = PooledSizes()
    batches = [range(1, 15), range(1, 9), range(1, 21)] * 50
    assert _admit_all(pooled, [(32, t) for steps in batches for t in steps], nbytes=4096) == 0


def test_new_sizes_release_once_enough_of_them_hold_enough_bytes():
    pooled = PooledSizes()
    big = RELEASE_POOLS_MIN_BYTES // RELEASE_POOLS_SIZES + 1
    assert _admit_all(pooled, [(32, t) for t in range(1, RELEASE_POOLS_SIZES + 1)], big) == 0
    assert _admit_all(pooled, [(32, RELEASE_POOLS_SIZES + 1)], big) == 1  # before the first size past the limit
    assert _admit_all(pooled, [(32, RELEASE_POOLS_SIZES + 1)], big) == 0  # now a size seen since the release
    small = RELEASE_POOLS_MIN_BYTES // (4 * RELEASE_POOLS_SIZES)
    assert _admit_all(PooledSizes(), [(1, t) for t in range(1, 4 * RELEASE_POOLS_SIZES)], small) == 0


def test_the_budget_alone_releases_sizes_too_large_to_keep():
    pooled = PooledSizes()
    assert _admit_all(pooled, [(128, 1), (128, 2)], POOL_BUDGET_BYTES) == 1


def test_on_a_gpu_small_steps_release_after_more_new_sizes_each_counted_at_least_its_pages():
    pooled = PooledSizes(GPU_POOL_BUDGET_BYTES, GPU_RELEASE_POOLS_SIZES, GPU_STEP_BYTES)
    sizes = [(1, t, s) for t in range(1, 33) for s in range(1, 17)][: GPU_RELEASE_POOLS_SIZES + 1]
    assert _admit_all(pooled, sizes[:-1], nbytes=1536) == 0
    assert _admit_all(pooled, sizes[-1:], nbytes=1536) == 1
