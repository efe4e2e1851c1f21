"""Batch translation on Ray Data: the input's lines in blocks, translated by bundle workers across the cluster,
written back in input order as the blocks finish.

The lines are read here (one per ``\\n``, as the single-process ``translate`` reads them) and handed to Ray as
blocks; every worker loads the bundle once. Output goes to one file per input file; what was written when a
job stops is the first lines of the input, and the job says how many.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from tqdm import tqdm

from int8mt.errors import UserError
from int8mt.runtime.bundle import use_runtime_library
from int8mt.runtime.options import SearchOptions
from int8mt.runtime.translator import Translator

from .cluster import WorkerLayout, pack_bundle, unpack_bundle, worker_error, worker_options

MAX_BLOCK_LINES = 1024  # lines per Ray Data block, the unit a worker translates (batched by length) and returns
MIN_BLOCK_LINES = 128
BLOCKS_PER_WORKER = 4   # at least, where the input allows: a worker that gets a long block does not hold up the end


def block_lines(total: int, workers: int) -> int:
    return max(MIN_BLOCK_LINES, min(MAX_BLOCK_LINES, -(-total // (BLOCKS_PER_WORKER * workers))))


class BlockTranslator:
    """A Ray Data worker: loads the bundle once, then translates the ``text`` column of each block."""

    def __init__(self, bundle_files: Any, options: SearchOptions, batch_size: int, target_lang: str | None) -> None:
        import ray

        use_runtime_library()
        self.translator = Translator(unpack_bundle(ray.get(bundle_files)), options, batch_size, target_lang)

    def __call__(self, block: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        translations = self.translator.translate([str(text) for text in block["text"]])
        return {"file": block["file"], "translation": np.array(translations, dtype=object)}


@dataclass
class Progress:
    """How far a job got: lines written, of how many."""

    written: int = 0
    total: int = 0


def translate_files(ray: Any, bundle_dir: Path, inputs: list[tuple[list[str], Path]], layout: WorkerLayout,
                    options: SearchOptions, batch_size: int, progress: Progress,
                    target_lang: str | None = None) -> None:
    """Translate each ``(lines, output file)`` of ``inputs`` on the connected Ray cluster, ``layout.workers``
    workers of ``layout.threads`` threads, and write each output file in input order. ``progress`` counts
    the lines written so far (the caller reports it if the job stops)."""
    import pyarrow as pa

    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    progress.total = sum(len(lines) for lines, _ in inputs)
    size = block_lines(progress.total, layout.workers)
    blocks = [pa.table({"file": np.full(len(lines[s:s + size]), f), "text": lines[s:s + size]})
              for f, (lines, _) in enumerate(inputs) for s in range(0, len(lines), size)]
    outputs: list[TextIO] = []
    ray_data_errors = logging.getLogger("ray.data.exceptions")  # (its report of a failed job: we report it below)
    ray_data_errors.addFilter(_below_error)
    try:
        for _, path in inputs:
            path.parent.mkdir(parents=True, exist_ok=True)
            outputs.append(open(path, "w", encoding="utf-8"))
        if blocks:
            resources = worker_options(layout)
            if layout.gpus:  # a GPU worker asks for its GPU only: Ray Data calls CPUs and GPUs together experimental
                del resources["num_cpus"]
            dataset = ray.data.from_arrow(blocks).map_batches(
                BlockTranslator, batch_size=size if layout.gpus else None,  # (Ray asks GPU workers for one)
                batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=layout.workers),
                fn_constructor_args=(ray.put(pack_bundle(bundle_dir)), options, batch_size, target_lang),
                **resources)
            with tqdm(total=progress.total, desc="translating", unit="line", file=sys.stderr) as bar:
                for block in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                    for f, translation in zip(block["file"], block["translation"]):
                        outputs[f].write(f"{translation}\n")
                    progress.written += len(block["file"])
                    bar.update(len(block["file"]))
    except ray.exceptions.RayError as err:
        raise UserError(f"batch translation failed on the Ray cluster: {worker_error([str(err)])}") from None
    finally:
        ray_data_errors.removeFilter(_below_error)
        for out in outputs:
            out.close()


def _below_error(record: logging.LogRecord) -> bool:
    """Lets Ray Data's warnings through, not its errors: a worker that cannot load the bundle is reported by
    Ray Data as a failure of its own internal code, with a stack trace and a request to report it to Ray."""
    return record.levelno < logging.ERROR
