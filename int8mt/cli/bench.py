"""int8mt bench: translation speed and BLEU of a bundle against PyTorch on the same sentences;
``int8mt bench BUNDLE --against ctranslate2|onnxruntime``: against another engine on the same weights;
``int8mt bench BUNDLE --serve``: load benchmark of ``int8mt serve``;
``int8mt bench kernels``: GOPS of the int8 kernels against PyTorch and this CPU's peak."""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from . import UserError, add_config_argument, config_path, database_path, port_number


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="sentences/s and BLEU: compiled bundle vs PyTorch (FP32, dynamic INT8), batch 1 "
                                     "and 32; --against: vs CTranslate2 or ONNX Runtime; `bench kernels`: int8 "
                                     "kernel GOPS")
    add_config_argument(p)
    p.add_argument("bundle", type=Path,
                   help="bundle directory from `int8mt compile`, or `kernels` for the int8 kernel benchmark")
    p.add_argument("--model", type=Path, default=None,
                   help="the model the bundle was compiled from, ours or a Hugging Face Marian one: PyTorch runs it, "
                        "--against converts it (default: paths.model)")
    p.add_argument("--against", choices=("ctranslate2", "onnxruntime"), default=None,
                   help="another engine on the same weights (--model) at the bundle's precision (INT8, or FP32 for an "
                        "FP32 bundle), both engines in their best thread layouts, sentences/s and peak memory: "
                        "ctranslate2 (converted with its converter; on the GPU for a CUDA bundle) or onnxruntime "
                        "(exported with PyTorch's ONNX exporter, INT8 by its dynamic quantization; CPU bundles)")
    p.add_argument("--fixed-tokens", type=int, default=None, metavar="N",
                   help="--against: every sentence decodes exactly N tokens in both engines (same work whatever "
                        "the weights; default: translate to the end of sentence and compare BLEU)")
    p.add_argument("--no-pytorch", action="store_true", help="benchmark the bundle only (no PyTorch rows)")
    p.add_argument("--sentences", type=int, default=1000, help="first N test sentences (default: 1000)")
    p.add_argument("--batch-sizes", default="1,32",
                   help="comma-separated batch sizes (bench kernels: sentences of 20 tokens; default: 1,32)")
    p.add_argument("--json", type=Path, default=None, help="write the rows as JSON here")
    p.add_argument("--serve", action="store_true",
                   help="load benchmark: `int8mt serve` on a local Ray at --clients concurrent clients, against "
                        "the runtime in this process with batches of 32")
    p.add_argument("--clients", default="1,4,16,64", help="--serve: comma-separated client counts (default: 1,4,16,64)")
    p.add_argument("--request-sentences", default="1,8",
                   help="--serve: comma-separated sentences per request (default: 1,8)")
    p.add_argument("--replicas", type=int, default=None,
                   help="--serve: replicas (default: CPUs / --threads; for a CUDA bundle one per GPU)")
    p.add_argument("--threads", type=int, default=None, help="--serve: threads per replica (default: 1)")
    p.add_argument("--beam", type=int, default=None,
                   help="beam size of the beam-search row and of --serve (default: decode.beam_size)")
    p.add_argument("--port", type=port_number, default=8000, help="--serve: HTTP port on 127.0.0.1 (default: 8000)")
    p.add_argument("--plot", type=Path, default=None, help="--serve, --against: write a PNG plot here")
    p.add_argument("--target", default=None, help="bench kernels: target preset (default: compile.target)")
    p.add_argument("--rpc", metavar="HOST:PORT:KEY", default=None,
                   help="bench kernels: measure on a board (e.g. aarch64 for the arm-* presets) through a TVM RPC "
                        "tracker at HOST:PORT, on a server registered with KEY")
    p.add_argument("--db", type=Path, default=None,
                   help="bench kernels: tuning database (default: tune.database; 'shipped' = the package's)")
    p.set_defaults(run=run)


# the benchmarks (modes) each flag without a default value serves; given to another, it is refused, not ignored
MODES = {"kernels": "`bench kernels`", "serve": "--serve", "against": "--against",
         "pytorch": "`bench BUNDLE` (PyTorch)"}
FLAG_MODES = {"against": ("against",), "fixed_tokens": ("against",), "no_pytorch": ("pytorch",),
              "model": ("pytorch", "against"), "beam": ("pytorch", "serve", "against"), "serve": ("serve",),
              "plot": ("serve", "against"), "replicas": ("serve",), "threads": ("serve",), "target": ("kernels",),
              "rpc": ("kernels",), "db": ("kernels",)}


def benchmark_mode(args: argparse.Namespace) -> str:
    """The benchmark asked for: a key of :data:`MODES`."""
    return ("kernels" if str(args.bundle) == "kernels" else "serve" if args.serve else
            "against" if args.against else "pytorch")


def check_flags(args: argparse.Namespace, mode: str) -> None:
    """A UserError naming the flags given that benchmark ``mode`` does not use, and what they are for."""
    wrong = [name for name, modes in FLAG_MODES.items()
             if getattr(args, name) not in (None, False) and mode not in modes]
    if not wrong:
        return
    flags = [f"--{name.replace('_', '-')}" for name in wrong]
    uses = [f"{flag} is for {' and '.join(MODES[m] for m in FLAG_MODES[name])}" for flag, name in zip(flags, wrong)
            if name not in MODES]  # (--against and --serve name their own benchmark)
    raise UserError(f"{', '.join(flags)} {'does' if len(flags) == 1 else 'do'} not apply to {MODES[mode]}"
                    + (f": {'; '.join(uses)}" if uses else ""))


def run(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..data import read_parallel
    from ..interface.bench import bench_translation, format_table, rows_as_dicts
    from ..runtime.bundle import use_runtime_library

    mode = benchmark_mode(args)
    check_flags(args, mode)
    cfg = load_config(config_path(args))
    if mode == "kernels":
        return _kernels(args, cfg)
    use_runtime_library()
    batch_sizes = _counts(args.batch_sizes, "--batch-sizes")
    if args.sentences < 1:
        raise UserError("--sentences must be at least 1")
    beam = cfg.decode.search_options(beam_size=args.beam).beam_size  # (checked before anything runs)
    sources, refs = read_parallel(cfg.paths.data, "test_2016_flickr", cfg.train.src_lang, cfg.train.tgt_lang)
    sources, refs = sources[: args.sentences], refs[: args.sentences]
    if mode == "serve":
        return _serve(args, cfg, sources)
    if mode == "against":
        return _against(args, cfg, sources, refs, batch_sizes, beam)
    model = None if args.no_pytorch else (args.model or cfg.paths.model)
    rows = bench_translation(args.bundle, model, sources, refs, batch_sizes, beam)
    print(format_table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows_as_dicts(rows), indent=2) + "\n")
    return 0


def _against(args: argparse.Namespace, cfg, sources: list[str], refs: list[str],
             batch_sizes: tuple[int, ...], beam: int) -> int:
    import tempfile

    from ..interface.bench_against import (bundle_source_ids, check_same_model, compare_engines, compute_type,
                                           format_comparison, plot_comparison, scenarios)
    from ..runtime.bundle import check_runs_here, is_cuda, read_manifest

    if args.fixed_tokens is not None and args.fixed_tokens < 1:
        raise UserError("--fixed-tokens must be at least 1")
    model_dir = args.model or cfg.paths.model
    check_same_model(args.bundle, model_dir)
    gpu = is_cuda(read_manifest(args.bundle))
    if gpu and args.against == "onnxruntime":
        raise UserError(f"{args.bundle} is a CUDA bundle; the ONNX Runtime comparison runs on the CPU (onnxruntime's "
                        "CPU package): compare a CPU bundle, or this one with --against ctranslate2")
    manifest = check_runs_here(args.bundle)
    positions = manifest["model"]["max_positions"]
    if args.fixed_tokens is not None and args.fixed_tokens > positions:
        raise UserError(f"--fixed-tokens {args.fixed_tokens} is more than the model's {positions} positions (its "
                        f"longest output): use at most {positions}")
    ids, decode = bundle_source_ids(args.bundle, sources)
    precision = compute_type(manifest)
    with tempfile.TemporaryDirectory(prefix=f"int8mt-{args.against}-") as tmp:
        peer_dir = _convert(args.against, model_dir, Path(tmp) / args.against, precision)
        result = compare_engines(args.against, args.bundle, peer_dir, ids, scenarios(batch_sizes, beam),
                                 args.fixed_tokens, cfg.decode.length_penalty, decode,
                                 None if args.fixed_tokens else refs, precision=precision, gpu=gpu)
    result["model"] = str(model_dir)
    return _report(args, result, format_comparison(result), plot_comparison)


def _convert(peer: str, model_dir: Path, out: Path, precision: str) -> Path:
    """``model_dir`` as ``peer`` runs it, in ``out``."""
    if peer == "ctranslate2":
        from ..interface.ctranslate2_model import convert_to_ctranslate2

        print(f"converting {model_dir} with CTranslate2's converter ({precision})", file=sys.stderr)
        return convert_to_ctranslate2(model_dir, out, precision)
    from ..interface.onnxruntime_model import export_to_onnxruntime

    print(f"exporting {model_dir} to ONNX ({precision})", file=sys.stderr)
    return export_to_onnxruntime(model_dir, out, precision)


def _counts(text: str, flag: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(c) for c in text.split(","))
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1:
        raise UserError(f"{flag} must be comma-separated positive integers, got {text!r}")
    return counts


def _serve(args: argparse.Namespace, cfg, sources: list[str]) -> int:
    from ..serving.cluster import WorkerLayout, checked_bundle, connect, import_ray

    import_ray()
    from ..interface.bench_serve import bench_serving, format_load_table, plot_load
    from ..serving.server import ServerSettings

    clients = _counts(args.clients, "--clients")
    sizes = _counts(args.request_sentences, "--request-sentences")
    settings = ServerSettings(options=cfg.decode.search_options(beam_size=args.beam),
                              max_batch=cfg.decode.batch_size)
    bundle, manifest = checked_bundle(args.bundle, settings.options, settings.max_batch)
    layout = WorkerLayout.fit(connect(None), manifest, args.replicas, args.threads)
    result = bench_serving(bundle, sources, clients, sizes, layout, settings, args.port)
    return _report(args, result, format_load_table(result), plot_load)


def _report(args: argparse.Namespace, result: dict, table: str, plot: Callable[[dict, Path], None]) -> int:
    """Print the table; write the result to --json and its plot to --plot where asked."""
    print(table)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if args.plot:
        plot(result, args.plot)
    return 0


def _kernels(args: argparse.Namespace, cfg) -> int:
    from ..interface.bench_kernels import bench_kernels, format_kernel_table
    from ..schedules.rpc import RPCTracker
    from ..targets import get_preset

    preset = get_preset(args.target or cfg.compile.target)
    result = bench_kernels(preset, database_path(args.db, cfg.tune.database),
                           sentences=_counts(args.batch_sizes, "--batch-sizes"),
                           rpc=RPCTracker.parse(args.rpc) if args.rpc else None)
    print(format_kernel_table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0
