"""When the runtime releases TVM's memory pools: never for call sizes (rows, source length) seen since the last
release, and for new sizes only once enough of them hold enough bytes (on a GPU more of them)."""
import numpy as np

from int8mt.runtime.bundle import (_POOLED, GPU_RELEASE_POOLS_SIZES, POOL_BUDGET_BYTES, RELEASE_POOLS_MIN_BYTES,
                                   RELEASE_POOLS_SIZES, Bundle, PooledSizes)


def _admit_all(pooled: PooledSizes, sizes, nbytes: int) -> int:
    releases = []
    for size in sizes:
        pooled.admit(("bundle", *size), nbytes, lambda: releases.append(1))
    return len(releases)


def test_sizes_seen_since_the_last_release_never_release_the_pools():
    pooled = PooledSizes()
    batches = [(32, 14), (32, 8), (31, 14), (32, 20)] * 50
    assert _admit_all(pooled, batches, nbytes=1 << 20) == 0


def test_new_sizes_release_once_enough_of_them_hold_enough_bytes():
    pooled = PooledSizes()
    big = RELEASE_POOLS_MIN_BYTES // RELEASE_POOLS_SIZES + 1
    assert _admit_all(pooled, [(32, s) for s in range(1, RELEASE_POOLS_SIZES + 1)], big) == 0
    assert _admit_all(pooled, [(32, RELEASE_POOLS_SIZES + 1)], big) == 1  # before the first size past the limit
    assert _admit_all(pooled, [(32, RELEASE_POOLS_SIZES + 1)], big) == 0  # now a size seen since the release
    small = RELEASE_POOLS_MIN_BYTES // (4 * RELEASE_POOLS_SIZES)
    assert _admit_all(PooledSizes(), [(1, s) for s in range(1, 4 * RELEASE_POOLS_SIZES)], small) == 0


def test_the_budget_alone_releases_sizes_too_large_to_keep():
    pooled = PooledSizes()
    assert _admit_all(pooled, [(128, 1), (128, 2)], POOL_BUDGET_BYTES) == 1


def test_on_a_gpu_the_pools_release_after_more_new_sizes():
    pooled = _POOLED["gpu"]
    assert pooled.sizes == GPU_RELEASE_POOLS_SIZES > RELEASE_POOLS_SIZES
    fresh = PooledSizes(pooled.budget, pooled.sizes)
    big = RELEASE_POOLS_MIN_BYTES // RELEASE_POOLS_SIZES + 1
    sizes = [(r, s) for r in range(1, 33) for s in range(1, 17)][: GPU_RELEASE_POOLS_SIZES + 1]
    assert _admit_all(fresh, sizes[:-1], big) == 0
    assert _admit_all(fresh, sizes[-1:], big) == 1


def test_a_bundle_keys_its_calls_by_rows_and_source_length(tiny_bundle, monkeypatch):
    """Steps of one batch differ only in position, which the bundle plans at its maximum: they are one size, and
    so is the batch's encoder call, admitted once (the bundle asks again only for another size, or after the pools
    were released); a batch of other rows is another."""
    from int8mt.runtime.options import SearchOptions
    from int8mt.runtime.translator import Translator

    admitted = []
    monkeypatch.setattr(PooledSizes, "admit", lambda self, size, nbytes, release: admitted.append((size, nbytes)))
    translator = Translator(tiny_bundle, SearchOptions(beam_size=1, max_length_a=0.0, max_length_b=6,
                                                       min_length=6), batch_size=2)
    translator.translate_ids([[5, 6, 7, 3], [8, 9, 10, 3], [11, 12, 13, 3]])
    bundle: Bundle = translator.bundle
    per_token = bundle.layers * 2 * bundle.heads * bundle.head_dim * np.dtype(bundle.cache_dtype).itemsize
    per_row = 4 * bundle.vocab_size + 4 * per_token  # float32 logits, keys and values of 4 source tokens
    assert {size[1:]: nbytes for size, nbytes in admitted} == {(2, 4): 2 * per_row, (1, 4): per_row}
    assert len(admitted) == 2  # each batch once: its encoder call (its six steps are the same size)
    released = bundle._pooled.releases
    bundle._pooled.release(lambda: None)  # (another replica's release): the next call of that size asks again
    assert bundle._pooled.releases == released + 1
    bundle._admit(1, 4)
    assert len(admitted) == 3


def test_a_cpu_bundle_releases_the_pools_after_an_encoder_call_with_large_activations(tiny_bundle, monkeypatch):
    """Its buffers' pages would stay resident through the decoder's peak; small calls keep the pools."""
    from int8mt.runtime import bundle as bundle_module

    bundle = Bundle(tiny_bundle)
    released = []
    monkeypatch.setattr(PooledSizes, "release", lambda self, release: released.append(1))
    threshold = 4 * 6 * bundle.ffn_dim * bundle_module.ACTIVATION_BYTES  # 4 rows of 6 tokens
    monkeypatch.setattr(bundle_module, "RELEASE_AFTER_ENCODER_BYTES", threshold)
    bundle.encode(np.full((3, 6), 5, np.int64))
    assert released == []
    bundle.encode(np.full((4, 6), 5, np.int64))
    assert released == [1]


def test_after_a_release_every_size_is_new_again():
    pooled = PooledSizes()
    assert _admit_all(pooled, [(32, 14), (32, 8)], nbytes=1) == 0
    pooled.release(lambda: None)
    assert pooled.budget == POOL_BUDGET_BYTES and not _admit_all(pooled, [(32, 14)], nbytes=POOL_BUDGET_BYTES)
    assert _admit_all(pooled, [(32, 8)], nbytes=1) == 1  # new again, past the budget the size before filled
