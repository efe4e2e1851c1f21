"""Integer multipliers for requantization: a real ratio ``m`` as ``M * 2**-shift`` with ``M`` in
[2**30, 2**31), applied to int32 values in int64 arithmetic with round-half-up (``(x*M + 2**(shift-1)) >>
shift``). :mod:`int8mt.quant.reference` applies the same formula in NumPy, so results match bit for bit."""
from __future__ import annotations

import numpy as np

MIN_SHIFT, MAX_SHIFT = 1, 62


def fixed_point(ratio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(multiplier, shift) int64 arrays of ``ratio``'s shape; ratios must be positive and below 2**29."""
    ratio = np.asarray(ratio, dtype=np.float64)
    if np.any(ratio <= 0) or np.any(ratio >= 2.0 ** 29):
        raise ValueError(f"requantization ratio out of range: {ratio.min()}..{ratio.max()}")
    shift = 30 - np.floor(np.log2(ratio)).astype(np.int64)
    shift = np.clip(shift, MIN_SHIFT, MAX_SHIFT)
    mult = np.round(ratio * np.exp2(shift.astype(np.float64))).astype(np.int64)
    overflow = mult >= 2 ** 31
    mult = np.where(overflow, mult // 2, mult)
    shift = np.where(overflow, shift - 1, shift)
    return mult, shift


def apply_fixed_point(x: np.ndarray, mult: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """``round_half_up(x * ratio)`` in int64, as the compiled graph computes it."""
    x = x.astype(np.int64) * mult
    return (x + (np.int64(1) << (shift - 1))) >> shift
