"""One timed run of one engine in one thread layout, in a process of its own (so that its peak memory is its
own and CTranslate2's backend can be chosen before it loads): ``python -m int8mt.interface.bench_engine``
reads a :class:`EngineRun` as JSON on stdin and writes an :class:`EngineResult` as JSON on stdout."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

SHARED_VOCABULARY, SOURCE_VOCABULARY, TARGET_VOCABULARY = (
    "shared_vocabulary.json", "source_vocabulary.json", "target_vocabulary.json")  # a CTranslate2 model's


@dataclass(frozen=True)
class EngineRun:
    engine: str                 # int8mt (a bundle), ctranslate2 or onnxruntime (a converted model)
    path: str
    replicas: int               # translators at once (CTranslate2's inter_threads: sharing the weights)
    threads: int                # threads each (CTranslate2's intra_threads)
    beam: int
    batch: int
    length_penalty: float
    fixed_tokens: int | None    # every output exactly this many tokens, or None: stop at end of sentence
    sources: list[list[int]]    # token ids, end of sentence included
    warmup: int                 # sentences translated once, untimed, before the timed run
    compute_type: str = "int8"  # CTranslate2's: int8 against a quantized bundle, float32 against an FP32 one
    device: str = "cpu"         # CTranslate2's device: cuda against a CUDA bundle (which runs on its own device)


@dataclass(frozen=True)
class EngineResult:
    seconds: float
    outputs: list[list[int]]    # token ids, end of sentence excluded
    peak_rss_mib: float         # the process's peak resident memory: runtime, weights and work
    gpu_memory_mib: float | None = None  # on a GPU: the memory this process holds there after the run
    runtime: str | None = None  # int8mt: the folder of the int8mt package that ran


def vocabularies(ct2_dir: Path) -> tuple[list[str], list[str]]:
    """The converted model's source and target tokens in id order (the same ids as the model directory's)."""
    def read(name: str) -> list[str]:
        return json.loads((Path(ct2_dir) / name).read_text(encoding="utf-8"))

    if (Path(ct2_dir) / SHARED_VOCABULARY).is_file():
        shared = read(SHARED_VOCABULARY)
        return shared, shared
    try:
        return read(SOURCE_VOCABULARY), read(TARGET_VOCABULARY)
    except OSError:
        raise ValueError(f"{ct2_dir} is not a CTranslate2 model directory (no vocabulary files)") from None


def _search_options(run: EngineRun):
    """The search of ``run`` as int8mt's runtime and ONNX Runtime's search take it; with ``fixed_tokens`` N, exactly
    N tokens (no end of sentence before N, none after)."""
    from int8mt.runtime.options import SearchOptions

    fixed = {} if run.fixed_tokens is None else {"max_length_a": 0.0, "max_length_b": run.fixed_tokens,
                                                 "min_length": run.fixed_tokens}
    return SearchOptions(beam_size=run.beam, length_penalty=run.length_penalty, **fixed)


def _int8mt(run: EngineRun):
    from int8mt.runtime.bundle import use_runtime_library

    use_runtime_library()
    from int8mt.runtime.translator import Translator

    translator = Translator(run.path, _search_options(run), run.batch, replicas=run.replicas, threads=run.threads)
    return translator.translate_ids


def _ctranslate2(run: EngineRun):
    import ctranslate2

    source_vocab, target_vocab = vocabularies(Path(run.path))
    target_ids = {token: i for i, token in enumerate(target_vocab)}
    translator = ctranslate2.Translator(run.path, device=run.device, compute_type=run.compute_type, inter_threads=run.replicas,
                                        intra_threads=run.threads)
    fixed = {} if run.fixed_tokens is None else {"min_decoding_length": run.fixed_tokens,
                                                 "max_decoding_length": run.fixed_tokens}

    def translate(sources: list[list[int]]) -> list[list[int]]:
        tokens = [[source_vocab[i] for i in ids] for ids in sources]
        results = translator.translate_batch(tokens, max_batch_size=run.batch, beam_size=run.beam,
                                             length_penalty=run.length_penalty, **fixed)
        return [[target_ids[t] for t in r.hypotheses[0]] for r in results]

    return translate


def _onnxruntime(run: EngineRun):
    from int8mt.interface.onnxruntime_translator import OnnxRuntimeTranslator

    translator = OnnxRuntimeTranslator(Path(run.path), replicas=run.replicas, threads=run.threads)
    options = _search_options(run)

    def translate(sources: list[list[int]]) -> list[list[int]]:
        return translator.translate(sources, run.batch, options)

    return translate


ENGINES = {"int8mt": _int8mt, "ctranslate2": _ctranslate2, "onnxruntime": _onnxruntime}


def run_engine(run: EngineRun) -> EngineResult:
    """Load the engine, translate the first ``warmup`` sources once, then time all of them."""
    translate = ENGINES[run.engine](run)
    translate(run.sources[: run.warmup])
    start = time.perf_counter()
    outputs = translate(run.sources)
    seconds = time.perf_counter() - start
    runtime = str(Path(sys.modules["int8mt"].__file__).parent) if run.engine == "int8mt" else None
    return EngineResult(seconds, outputs, peak_rss_mib(), gpu_memory_mib() if run.device == "cuda" else None, runtime)


def peak_rss_mib() -> float:
    """This process's peak resident memory (``VmHWM``; ``ru_maxrss`` would carry the parent's peak over the
    ``exec`` that started this process)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("/proc/self/status has no VmHWM")


def gpu_memory_mib() -> float | None:
    """The GPU memory this process holds (``nvidia-smi``'s per-process use: allocator pools included); None where
    ``nvidia-smi`` cannot say."""
    try:
        listing = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    for line in listing.splitlines():
        pid, _, used = line.partition(",")
        if pid.strip() == str(os.getpid()) and used.strip().isdigit():
            return float(used)
    return None


if __name__ == "__main__":
    from int8mt.errors import UserError

    job = EngineRun(**json.load(sys.stdin))
    try:
        result = run_engine(job)
    except UserError as err:  # (the parent reports it)
        sys.exit(str(err))
    json.dump(asdict(result), sys.stdout)
