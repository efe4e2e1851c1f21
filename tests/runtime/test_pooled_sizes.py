"""When the runtime releases TVM's memory pools: never for step sizes seen since the last release, and for new
sizes only once enough of them hold enough bytes."""
from int8mt.runtime.bundle import (POOL_BUDGET_BYTES, RELEASE_POOLS_MIN_BYTES, RELEASE_POOLS_SIZES,
                                   PooledSizes)


def _admit_all(pooled: PooledSizes, sizes, nbytes: int) -> int:
    releases = []
    for rows, positions in sizes:
        pooled.admit(("bundle", rows, positions), nbytes, lambda: releases.append(1))
    return len(releases)


def test_one_sentence_at_a_time_never_releases_the_pools():
    pooled = PooledSizes()
    sentences = [range(1, 15), range(1, 9), range(1, 21)] * 50
    assert _admit_all(pooled, [(1, t) for steps in sentences for t in steps], nbytes=1536) == 0


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


def test_on_a_gpu_only_the_budget_releases_the_pools():
    pooled = PooledSizes(budget=64 << 20, sizes=None)
    assert _admit_all(pooled, [(128, t) for t in range(1, 33)], RELEASE_POOLS_MIN_BYTES) == 0  # 64 MB
    assert _admit_all(pooled, [(128, 33)], RELEASE_POOLS_MIN_BYTES) == 1
