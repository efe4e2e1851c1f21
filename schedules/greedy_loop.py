"""The small kernels of the greedy decoding loop in the library (:class:`int8mt.compiler.passes.GreedyLoop`): one
sentence's next token, its record, the stop test and the next step's inputs.

:func:`next_token_kernel` is NumPy's ``argmax`` of a row of logits (the first of equal maxima; rows without NaN),
with the end of sentence passed over while the step is below the minimum length, as the host's greedy search does.
It keeps ``LANES`` running maxima and their first positions side by side (vectorized), then picks among them.
"""
from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

LANES = 16  # float32 lanes of the arg-max's running maxima (one AVX-512 register)
MAX_LENGTH, MIN_LENGTH = 0, 1  # the loop's ``limits`` input: [max_length, min_length]


def next_token_kernel(vocab: int, eos_id: int) -> tirx.PrimFunc:
    """``token[0, 0] = argmax(logits[0])``, ``logits[0, eos_id]`` counted as -inf while ``step[0] <
    limits[MIN_LENGTH]``."""
    lanes = LANES if vocab >= LANES else 1
    chunks = vocab // lanes
    banned = -float("inf")

    @T.prim_func(private=True)
    def next_token(logits: T.Buffer((T.int64(1), T.int64(vocab)), "float32"), step: T.Buffer((T.int64(1),), "int64"),
                   limits: T.Buffer((T.int64(2),), "int64"), token: T.Buffer((T.int64(1), T.int64(1)), "int64")):
        T.func_attr({"tirx.noalias": True})
        best = T.alloc_buffer((lanes,), "float32", scope="local")
        where = T.alloc_buffer((lanes,), "int32", scope="local")  # (int32: 16 lanes per register, as the maxima)
        pick = T.alloc_buffer((1,), "float32", scope="local")
        banned_at = T.Select(step[0] < limits[MIN_LENGTH], eos_id, -1)  # the column counted as -inf, or none
        for lane in T.vectorized(lanes):
            best[lane] = T.Select(lane == banned_at, T.float32(banned), logits[0, lane])
            where[lane] = lane
        for c in range(1, chunks):
            for lane in T.vectorized(lanes):  # (no ``let`` of the value: vectorized as one lane's)
                where[lane] = T.Select(T.Select(c * lanes + lane == banned_at, T.float32(banned),
                                                logits[0, c * lanes + lane]) > best[lane], c * lanes + lane, where[lane])
                best[lane] = T.max(T.Select(c * lanes + lane == banned_at, T.float32(banned),
                                            logits[0, c * lanes + lane]), best[lane])
        pick[0] = best[0]
        for lane in range(1, lanes):
            if best[lane] > pick[0] or (best[lane] == pick[0] and where[lane] < where[0]):
                pick[0] = best[lane]
                where[0] = where[lane]
        for j in range(chunks * lanes, vocab):  # the last columns, after every lane's
            if T.Select(j == banned_at, T.float32(banned), logits[0, j]) > pick[0]:
                pick[0] = T.Select(j == banned_at, T.float32(banned), logits[0, j])
                where[0] = j
        token[0, 0] = T.Cast("int64", where[0])

    return next_token


def record_token_kernel() -> tirx.PrimFunc:
    """``ids[step[0]] = token[0, 0]`` (in place; ``ids`` has room for the maximum length)."""

    @T.prim_func(private=True)
    def record_token(ids_handle: T.handle, token: T.Buffer((T.int64(1), T.int64(1)), "int64"),
                     step: T.Buffer((T.int64(1),), "int64")):
        T.func_attr({"tirx.noalias": True})
        room = T.int64()
        ids = T.match_buffer(ids_handle, (room,), "int64")
        if step[0] < room:
            ids[step[0]] = token[0, 0]

    return record_token


def stop_kernel(eos_id: int) -> tirx.PrimFunc:
    """``stop[()]`` (in place): the token ends the sentence or the step was the last of ``limits[MAX_LENGTH]``."""

    @T.prim_func(private=True)
    def stop_here(token: T.Buffer((T.int64(1), T.int64(1)), "int64"), step: T.Buffer((T.int64(1),), "int64"),
                  limits: T.Buffer((T.int64(2),), "int64"), stop: T.Buffer((), "bool")):
        T.func_attr({"tirx.noalias": True})
        stop[()] = token[0, 0] == eos_id or step[0] + 1 >= limits[MAX_LENGTH]

    return stop_here


def advance_kernel() -> tirx.PrimFunc:
    """The next step's position and history, in place: ``step[0] + 1``, and ``history[0, :width + 1]`` = cache
    rows 1 .. width for positions 0 .. width - 1, then 0 for the step's own (:mod:`int8mt.runtime.cache`; a fresh
    cache written by this loop alone). ``width``: the step's positions, its own included."""

    @T.prim_func(private=True)
    def advance(step: T.Buffer((T.int64(1),), "int64"), history_handle: T.handle, width: T.int64):
        T.func_attr({"tirx.noalias": True})
        room = T.int64()
        history = T.match_buffer(history_handle, (T.int64(1), room), "int64")
        step[0] = step[0] + 1
        if width < room:
            history[0, width - 1] = width
            history[0, width] = T.int64(0)

    return advance


def start_kernel(start_id: int) -> tirx.PrimFunc:
    """The loop's state before its first step: the decoder's start token, position 0, not stopped, and a history
    buffer with room for every step (``ids``' room, plus one) whose first position is the step's own."""

    @T.prim_func(private=True)
    def start(ids_handle: T.handle, token: T.Buffer((T.int64(1), T.int64(1)), "int64"),
              step: T.Buffer((T.int64(1),), "int64"), stop: T.Buffer((), "bool"), history_handle: T.handle):
        T.func_attr({"tirx.noalias": True})
        room = T.int64()
        ids = T.match_buffer(ids_handle, (room,), "int64")  # noqa: F841  (its room sizes the history)
        history = T.match_buffer(history_handle, (T.int64(1), room + 1), "int64")
        token[0, 0] = T.int64(start_id)
        step[0] = T.int64(0)
        stop[()] = False
        history[0, 0] = T.int64(0)

    return start
