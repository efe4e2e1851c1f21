"""``int8mt bench BUNDLE --against ctranslate2|onnxruntime``: int8mt against another engine (the peer) on the same
weights at the bundle's precision (INT8 against a quantized bundle, FP32 against an FP32 one), each engine in its
best thread layout, one run, the engines interleaved.

Both engines get the same token ids (the bundle's tokenizer) and return token ids. Every (scenario, engine,
layout) runs in a fresh process (:mod:`.bench_engine`), so its peak resident memory is its own. Layouts: one
translator on all CPUs, and one single-threaded translator per CPU (CTranslate2's ``inter_threads``, sharing the
weights; int8mt's replicas, sharing them too; ONNX Runtime's sessions, each with its own); CTranslate2 on Intel CPUs
both with its MKL backend and without (``CT2_USE_MKL=0``). Against a CUDA bundle both engines run on the GPU
(CTranslate2 only), one translator each, CTranslate2 with each of its INT8 compute types (``int8_float16``,
``int8_float32``), and the GPU memory each process holds after its run is reported beside its peak resident memory.
With ``fixed_tokens`` N every sentence decodes exactly N tokens in both engines (the end of sentence held back
until then), so both do the same work whatever the weights; otherwise they translate until the end of sentence
and the outputs are compared (identical share, BLEU).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from itertools import zip_longest
from pathlib import Path

from tqdm import tqdm

from int8mt.errors import UserError
from int8mt.metrics import corpus_bleu
from int8mt.targets import host_cpu_name

from .bench_engine import EngineRun
from .plotting import pyplot, save

PEERS = {"ctranslate2": "CTranslate2", "onnxruntime": "ONNX Runtime"}  # --against: each engine's name in tables
PRECISIONS = {"fp32": "float32"}  # the peer's precision per bundle quantization scheme (int8 otherwise)
GPU_COMPUTE_TYPES = {"int8": ("int8_float16", "int8_float32"), "float32": ("float32",)}  # tried on a GPU


def compute_type(manifest: dict) -> str:
    """The peer's precision for a bundle of ``manifest`` (CTranslate2's compute type and converter quantization,
    ONNX Runtime's export): its quantization scheme's precision."""
    return PRECISIONS.get(manifest.get("quantization", {}).get("scheme", "int8"), "int8")


def precision_label(result: dict) -> str:
    return "FP32" if result.get("compute_type") == "float32" else "INT8"


MODEL_KEYS = ("vocab_size", "d_model", "encoder_layers", "decoder_layers", "heads", "ffn_dim")


@dataclass(frozen=True)
class Scenario:
    beam: int
    batch: int

    @property
    def name(self) -> str:
        return f"{'greedy' if self.beam == 1 else f'beam {self.beam}'}, batch {self.batch}"


@dataclass(frozen=True)
class Layout:
    replicas: int
    threads: int
    mkl: bool | None = None  # CTranslate2 on Intel CPUs only: with its MKL backend or without (CT2_USE_MKL)
    gpu_compute_type: str | None = None  # CTranslate2 on a GPU only: its compute type there

    @property
    def name(self) -> str:
        if self.gpu_compute_type is not None:
            return f"GPU, {self.gpu_compute_type}"
        backend = "" if self.mkl is None else (", MKL" if self.mkl else ", CT2_USE_MKL=0")
        return f"{self.replicas} x {self.threads} threads{backend}"


def layouts(engine: str, cpus: int, intel: bool, gpu_compute_types: tuple[str, ...] = ()) -> list[Layout]:
    """The layouts an engine is tried in. On the CPU (no ``gpu_compute_types``): one translator on all CPUs and
    one per CPU, CTranslate2 with MKL only on Intel CPUs (elsewhere it does not pick MKL, which ran at a few
    sentences/s on an AMD EPYC). On a GPU: one translator, CTranslate2 with each of ``gpu_compute_types``."""
    if gpu_compute_types:
        return [Layout(1, 1)] if engine == "int8mt" else [Layout(1, 1, gpu_compute_type=c) for c in gpu_compute_types]
    shapes = sorted({(1, cpus), (cpus, 1)})
    if engine != "ctranslate2":
        return [Layout(r, t) for r, t in shapes]
    return [Layout(r, t, mkl) for r, t in shapes for mkl in ((True, False) if intel else (False,))]


def is_intel_cpu() -> bool:
    return "GenuineIntel" in Path("/proc/cpuinfo").read_text()


def check_same_model(bundle_dir: Path, model_dir: Path) -> None:
    """The bundle was compiled from a model of ``model_dir``'s shape (a cheap guard against comparing two
    different models)."""
    from int8mt.model.checkpoint import model_config
    from int8mt.runtime.bundle import read_manifest

    cfg = model_config(model_dir)
    built = read_manifest(bundle_dir)["model"]
    differ = [k for k in MODEL_KEYS if built.get(k) != getattr(cfg, k)]
    if differ:
        raise UserError(f"bundle {bundle_dir} was not compiled from {model_dir}: their {', '.join(differ)} differ; "
                        f"compile the bundle from that model (`int8mt compile {model_dir}`)")


def scenarios(batch_sizes: tuple[int, ...], beam: int) -> list[Scenario]:
    """Greedy search at each batch size, then beam search (if ``beam`` > 1) at the largest."""
    return [Scenario(1, b) for b in batch_sizes] + ([Scenario(beam, max(batch_sizes))] if beam > 1 else [])


def bundle_source_ids(bundle_dir: Path, sentences: list[str]) -> tuple[list[list[int]], Callable[[list[int]], str]]:
    """``sentences`` as the bundle's tokenizer encodes them (cut to its positions), and its decoder."""
    from int8mt.runtime.bundle import read_manifest, tokenizer_kind
    from int8mt.runtime.translator import fit_to_positions
    from int8mt.tokenizer import check_target_lang, load_tokenizer

    manifest = read_manifest(bundle_dir)
    tokenizer = load_tokenizer(bundle_dir, tokenizer_kind(manifest))
    check_target_lang(tokenizer, None)
    limit = manifest["model"]["max_positions"]
    return [fit_to_positions(tokenizer.encode(s), limit, tokenizer.eos_id) for s in sentences], tokenizer.decode


# bench_engine run with the int8mt package of the folder given first: that folder first on sys.path, and any import
# hook that would find int8mt before sys.path is searched (an editable install's) left out
_ENGINE_FROM_FOLDER = (
    "import importlib.machinery, runpy, sys; sys.path.insert(0, sys.argv.pop(1)); "
    "sys.meta_path[:] = [f for f in sys.meta_path if f is importlib.machinery.PathFinder "
    "or getattr(f, 'find_spec', None) is None or f.find_spec('int8mt', None) is None]; "
    "runpy.run_module('int8mt.interface.bench_engine', run_name='__main__')")


def _run(engine: str, path: Path, layout: Layout, scenario: Scenario, job: dict, runtime: str | None = None) -> dict:
    """One run in a process of its own; ``runtime``: a folder whose ``int8mt`` package it uses instead of this one."""
    env = dict(os.environ)
    if layout.mkl is not None:
        env["CT2_USE_MKL"] = "1" if layout.mkl else "0"
    if layout.gpu_compute_type is not None:
        job = {**job, "compute_type": layout.gpu_compute_type}
    run = EngineRun(engine=engine, path=str(path), replicas=layout.replicas, threads=layout.threads,
                    beam=scenario.beam, batch=scenario.batch, **job)
    command = ["-m", "int8mt.interface.bench_engine"] if runtime is None else ["-c", _ENGINE_FROM_FOLDER, runtime]
    done = subprocess.run([sys.executable, *command], input=json.dumps(asdict(run)), capture_output=True, text=True,
                          env=env)
    if done.returncode:
        hint = ("\nCTranslate2 4.x on a GPU loads CUDA 12's cuBLAS: pip install nvidia-cublas-cu12 (or put its "
                "libcublas.so.12 on LD_LIBRARY_PATH)" if "libcublas" in done.stderr else "")
        raise UserError(f"{engine} ({layout.name}, {scenario.name}) failed:\n{done.stderr.strip()[-2000:]}{hint}")
    return json.loads(done.stdout)


def _gpu_name() -> str:
    try:
        names = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return "a CUDA GPU"
    name, driver = (part.strip() for part in names[0].split(","))
    return f"{name} (driver {driver})"


def compare_engines(peer: str, bundle_dir: Path, peer_dir: Path, sources: list[list[int]], scenarios: list[Scenario],
                    fixed_tokens: int | None, length_penalty: float, decode: Callable[[list[int]], str],
                    references: list[str] | None, cpus: int | None = None, precision: str = "int8",
                    gpu: bool = False) -> dict:
    """Run every scenario with every layout of int8mt and ``peer`` (one of :data:`PEERS`, its converted model in
    ``peer_dir``; the engines alternating) and keep each engine's best layout per scenario. ``decode`` turns output
    ids into text (for BLEU and the identical share). ``gpu``: the bundle is a CUDA one; both engines run on the
    GPU."""
    from importlib.metadata import version

    cpus = 1 if gpu else cpus or len(os.sched_getaffinity(0))
    job = {"length_penalty": length_penalty, "fixed_tokens": fixed_tokens, "sources": sources,
           "warmup": min(len(sources), max(s.batch for s in scenarios) * cpus), "compute_type": precision,
           "device": "cuda" if gpu else "cpu"}
    engines = (peer, "int8mt")
    paths = {"int8mt": bundle_dir, peer: peer_dir}
    intel = is_intel_cpu()
    gpu_types = GPU_COMPUTE_TYPES[precision] if gpu else ()
    plan = [(s, e, layout) for s in scenarios
            for pair in zip_longest(*(layouts(e, cpus, intel, gpu_types) for e in engines))
            for e, layout in zip(engines, pair) if layout is not None]
    runs = []
    for scenario, engine, layout in tqdm(plan, desc="bench", unit="run", file=sys.stderr):
        out = _run(engine, paths[engine], layout, scenario, job)
        runs.append({"scenario": scenario.name, "engine": engine, "layout": layout.name, "seconds": out["seconds"],
                     "sentences_per_second": len(sources) / out["seconds"], "peak_rss_mib": out["peak_rss_mib"],
                     "gpu_memory_mib": out["gpu_memory_mib"], "outputs": out["outputs"]})
    rows = [_scenario_row(engines, s.name, [r for r in runs if r["scenario"] == s.name], fixed_tokens, decode,
                          references) for s in scenarios]
    for r in runs:
        del r["outputs"]
    machine = _gpu_name() if gpu else f"{cpus} CPUs of {host_cpu_name()}"
    return {"machine": machine, "peer": peer, "peer_version": version(peer), "compute_type": precision,
            "bundle": str(bundle_dir), "sentences": len(sources), "fixed_tokens": fixed_tokens,
            "length_penalty": length_penalty, "rows": rows, "runs": runs}


def _scenario_row(engines: tuple[str, str], name: str, runs: list[dict], fixed_tokens: int | None,
                  decode: Callable[[list[int]], str], references: list[str] | None) -> dict:
    """One table row: each engine's fastest layout; the fixed-work protocol checked on every run's outputs."""
    best = {e: max((r for r in runs if r["engine"] == e), key=lambda r: r["sentences_per_second"]) for e in engines}
    texts = {e: [decode(ids) for ids in best[e]["outputs"]] for e in engines}
    speed = {e: best[e]["sentences_per_second"] for e in engines}
    row = {"scenario": name, "ratio": speed["int8mt"] / speed[engines[0]],
           "identical": sum(a == b for a, b in zip(*texts.values())) / len(texts["int8mt"])}
    for e in engines:
        row[e] = {k: best[e][k] for k in ("layout", "sentences_per_second", "peak_rss_mib", "gpu_memory_mib")}
        if fixed_tokens is not None:
            wrong = sum(len(ids) != fixed_tokens for r in runs if r["engine"] == e for ids in r["outputs"])
            if wrong:
                raise UserError(f"{e} decoded other than {fixed_tokens} tokens in {wrong} outputs ({name}): the "
                                "fixed-work protocol does not hold, so the times are not comparable")
        if references is not None:
            row[e]["bleu"] = corpus_bleu(texts[e], references)
    return row


def format_comparison(result: dict) -> str:
    work = (f"every sentence exactly {result['fixed_tokens']} tokens" if result["fixed_tokens"]
            else "translation to the end of sentence")
    precision = precision_label(result)
    peer, name = result["peer"], PEERS[result["peer"]]
    gpu = any(row["int8mt"].get("gpu_memory_mib") is not None for row in result["rows"])
    lines = [f"{result['machine']}; {name} {result['peer_version']} {precision} against {result['bundle']}; "
             f"{result['sentences']} sentences, {work}",
             f"| scenario | {name} {precision} sent/s | int8mt {precision} sent/s | ratio | peak RSS MiB {name} / "
             f"int8mt |{f' GPU MiB after the run {name} / int8mt |' if gpu else ''} identical | BLEU {name} / int8mt | "
             f"best layouts {name} / int8mt |",
             f"|---|---:|---:|---:|---|{'---|' if gpu else ''}---:|---|---|"]
    for row in result["rows"]:
        theirs, ours = row[peer], row["int8mt"]
        bleu = f"{theirs['bleu']:.2f} / {ours['bleu']:.2f}" if "bleu" in ours else "-"
        device = f" {_mib(theirs.get('gpu_memory_mib'))} / {_mib(ours.get('gpu_memory_mib'))} |" if gpu else ""
        lines.append(f"| {row['scenario']} | {theirs['sentences_per_second']:.1f} | {ours['sentences_per_second']:.1f} "
                     f"| {row['ratio']:.2f}x | {theirs['peak_rss_mib']:.0f} / {ours['peak_rss_mib']:.0f} |{device} "
                     f"{100 * row['identical']:.0f} % | {bleu} | {theirs['layout']} / {ours['layout']} |")
    return "\n".join(lines)


def _mib(value: float | None) -> str:
    return "?" if value is None else f"{value:.0f}"


def plot_comparison(result: dict, path: Path) -> None:
    """Sentences/s and peak resident memory per scenario, the two engines side by side."""
    plt = pyplot()
    precision = precision_label(result)
    names = [row["scenario"] for row in result["rows"]]
    fig, panels = plt.subplots(1, 2, figsize=(11, 4))
    for panel, key, label in zip(panels, ("sentences_per_second", "peak_rss_mib"), ("sentences/s", "peak RSS (MiB)")):
        for offset, engine in ((-0.2, result["peer"]), (0.2, "int8mt")):
            values = [row[engine][key] for row in result["rows"]]
            bars = panel.bar([i + offset for i in range(len(names))], values, width=0.4,
                             label=f"{PEERS.get(engine, engine)} {precision}")
            panel.bar_label(bars, fmt="%.0f", fontsize=8)
        panel.set(xticks=range(len(names)), xticklabels=names, ylabel=label)
        panel.legend()
    work = f"{result['fixed_tokens']} tokens per sentence" if result["fixed_tokens"] else "real translation"
    fig.suptitle(f"{result['machine']}: {work}, best layout per engine", fontsize=10)
    save(fig, path)
