"""Parallel text: reading aligned files and batching by length."""
from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from int8mt.errors import UserError

if TYPE_CHECKING:
    import numpy as np


def split_lines(text: str) -> list[str]:
    """One line per ``\n`` (a ``\r`` before it dropped): unlike ``str.splitlines``, form feeds, vertical tabs,
    U+2028 and the like stay inside their line, so output lines stay in step with input lines."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def read_lines(path: Path) -> list[str]:
    try:
        return split_lines(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text") from None


def read_aligned(source: Path, target: Path) -> tuple[list[str], list[str]]:
    """The lines of two line-aligned files; a different line count is an error naming both."""
    sources, targets = read_lines(source), read_lines(target)
    if len(sources) != len(targets):
        raise UserError(f"{source} has {len(sources)} lines but {target} has {len(targets)}; they must be aligned")
    return sources, targets


def read_parallel(data_dir: Path, split: str, src: str, tgt: str) -> tuple[list[str], list[str]]:
    return read_aligned(data_dir / f"{split}.{src}", data_dir / f"{split}.{tgt}")


def length_batches(lengths: list[int], max_tokens: int, shuffle: bool, seed: int = 0) -> list[list[int]]:
    """Group indices of similar length so that batch_size * longest <= max_tokens."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches, cur, longest = [], [], 0
    for i in order:
        longest_if_added = max(longest, lengths[i])
        if cur and longest_if_added * (len(cur) + 1) > max_tokens:
            batches.append(cur)
            cur, longest_if_added = [], lengths[i]
        cur.append(i)
        longest = longest_if_added
    if cur:
        batches.append(cur)
    if shuffle:
        random.Random(seed).shuffle(batches)
    return batches


def pad_batch(seqs: list[list[int]], pad_id: int) -> np.ndarray:
    """``seqs`` as one int64 array [len(seqs), longest], padded with ``pad_id``."""
    import numpy as np  # (here: the runtime's one-sentence path imports no NumPy, see int8mt.runtime.tensors)

    out = np.full((len(seqs), max(len(s) for s in seqs)), pad_id, dtype=np.int64)
    for row, s in zip(out, seqs):
        row[: len(s)] = s
    return out


def iterate_batches(ids: list[list[int]], batch_size: int) -> Iterator[list[int]]:
    """Indices in batches of at most ``batch_size`` sentences of similar length (for inference)."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]
