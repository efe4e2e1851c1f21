"""The CUDA target's checks and measurements on a GPU, prepared where no GPU is.

``prepare DIR --target cuda-sm90`` (any machine with the compile extras and nvcc): compiles our int8 tensor-core
matmul kernels for the preset at the reference model's shapes and at 4096^3, each as a small library with its
fatbin, into ``DIR``; with ``--tiles``, also every shape with every tile a search tries (``cuda_tiles.CANDIDATES``,
and at few rows ``FEW_ROWS_CANDIDATES``).
``tiles RESULTS --out FOLDER``: the tile table of a ``--tiles`` run (:mod:`int8mt.schedules.cuda_tiles`).
``prepare-ctranslate2 DIR --bundle B`` (here, with ``int8mt[bench]``): the model ``B`` was compiled from, converted
with CTranslate2's converter, and the test sentences, into ``DIR``; ``ctranslate2 DIR --bundle B --out R`` (the GPU
machine, ``ctranslate2`` and TVM's runtime): ``int8mt bench B --against ctranslate2`` on the GPU from them, the
table printed, the result (BLEU included) in ``R/against-ctranslate2.json``.
``run DIR [--bundle B --sources F]`` (the GPU machine, TVM's
runtime only): checks every kernel against NumPy (exact int32), times it against cuBLASLt INT8
(``torch._int_mm``) and cuBLAS FP16 on the same shapes, and with ``--bundle`` translates ``--sources`` with the
bundle (greedy and beam 4, batch 32) and with the PyTorch model in FP16 on the GPU; results go to ``--out`` as
JSON plus the translations, so that BLEU is scored where sacrebleu is installed.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

# (name, rows, reduction, columns): the reference model's linear layers (d 256, FFN 1024, 8000 tokens) at an
# encoder batch (32 sentences x 20 tokens) and a beam-4 decoder step (32 x 4 rows); then 4096^3.
SHAPES = [("qkv", 640, 256, 256), ("ffn_in", 640, 256, 1024), ("ffn_out", 640, 1024, 256),
          ("step_ffn_in", 128, 256, 1024), ("step_logits", 128, 256, 8000), ("square", 4096, 4096, 4096)]
DYNAMIC_ROWS = [1, 7, 32, 100, 640]  # rows tried on the dynamic-row kernel (padding to the tile)
ATTENTION = (32, 4, 20, 64)  # batch, heads, tokens, head size of the batched attention-score kernel


def prepare(out: Path, target: str, tiles: bool, first_tile: int = 0) -> None:
    import tvm
    from tvm import relax
    from tvm.script import relax as R

    from int8mt.schedules.cuda_tiles import FEW_TILE_ROWS, build_candidates, build_kernel, dense_module
    from int8mt.targets import get_preset

    preset = get_preset(target)
    out.mkdir(parents=True, exist_ok=True)
    meta: dict = {"target": target, "shapes": SHAPES}
    for name, n, k, m in SHAPES:
        meta[f"dense_{name}"] = build_kernel(dense_module(k, m), preset, out, f"dense_{name}")
    b, h, t, d = ATTENTION
    rows, queries, keys = (tvm.tirx.Var(v, "int64") for v in ("b", "s", "t"))
    q = relax.Var("q", R.Tensor((rows, h, queries, d), "int8"))
    kv = relax.Var("k", R.Tensor((rows, h, keys, d), "int8"))
    scale = relax.Var("scale", R.Tensor((), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [q, kv, scale]):
        with bb.dataflow():
            scores = R.matmul(q, R.permute_dims(kv, [0, 1, 3, 2]), out_dtype="int32")
            y = bb.emit_output(R.multiply(R.astype(scores, "float32"), scale))  # a fused dequantization epilogue
        bb.emit_func_output(y)
    meta["attention"] = build_kernel(relax.transform.FuseTransposeMatmul()(bb.get()), preset, out, "attention")
    probs = relax.Var("p", R.Tensor((rows, h, queries, keys), "int8"))
    values = relax.Var("v", R.Tensor((rows, h, keys, d), "int8"))
    bb = relax.BlockBuilder()
    with bb.function("main", [probs, values]):
        with bb.dataflow():  # the attention context: K is the number of keys, padded with zeros
            y = bb.emit_output(R.matmul(probs, values, out_dtype="int32"))
        bb.emit_func_output(y)
    meta["attention_context"] = build_kernel(bb.get(), preset, out, "attention_context")
    (out / "kernels.json").write_text(json.dumps(meta, indent=1))
    if tiles:
        few = sorted({(rows, k, m) for name, _, k, m in SHAPES if name != "square" for rows in FEW_TILE_ROWS})
        build_candidates(preset, [(n, k, m) for _, n, k, m in SHAPES] + few, out, first_tile)


def run_kernels(folder: Path, results: dict) -> None:
    from int8mt.interface.bench_cuda_kernels import time_dense
    from int8mt.runtime.bundle import import_tvm_runtime
    from int8mt.runtime.cuda import visible_gpu
    from int8mt.schedules.cuda_tiles import (CANDIDATES_FILE, exact_product, load_kernel, measure_candidates,
                                             random_int8)

    tvm = import_tvm_runtime()
    meta = json.loads((folder / "kernels.json").read_text())
    if visible_gpu(tvm) is None:
        raise RuntimeError("no CUDA GPU visible to TVM")
    dev = tvm.cuda(0)
    rng = np.random.default_rng(0)
    results["gpu"] = {"name": dev.device_name, "compute_capability": dev.compute_version}
    rows = []
    for name, n, k, m in meta["shapes"]:
        vm = load_kernel(tvm, folder, f"dense_{name}", meta[f"dense_{name}"])
        x, w = random_int8(rng, (n, k)), random_int8(rng, (m, k))
        row = {"kernel": name, "rows": n, "k": k, "n": m, **time_dense(tvm, vm, x, w)}
        row["exact"] = row["exact"] and all(  # rows padded to the tile
            np.array_equal(vm["main"](tvm.runtime.tensor(x[:r], dev), tvm.runtime.tensor(w, dev)).numpy(),
                           exact_product(x[:r], w.T)) for r in DYNAMIC_ROWS if r < n)
        rows.append(row)
        print(json.dumps(row), flush=True)
    vm = load_kernel(tvm, folder, "attention", meta["attention"])
    b, h, t, d = ATTENTION
    q, kk, scale = random_int8(rng, (b, h, t, d)), random_int8(rng, (b, h, t, d)), np.array(0.01, np.float32)
    got = vm["main"](*(tvm.runtime.tensor(a, dev) for a in (q, kk, scale))).numpy()
    want = exact_product(q, kk.transpose(0, 1, 3, 2)).astype(np.float32) * scale
    rows.append({"kernel": "attention_scores", "exact": bool(np.array_equal(got, want))})
    print(json.dumps(rows[-1]), flush=True)
    vm = load_kernel(tvm, folder, "attention_context", meta["attention_context"])
    exact = []
    for keys in (7, t, 133):
        p, v = random_int8(rng, (b, h, t, keys)), random_int8(rng, (b, h, keys, d))
        got = vm["main"](tvm.runtime.tensor(p, dev), tvm.runtime.tensor(v, dev)).numpy()
        exact.append(bool(np.array_equal(got, exact_product(p, v))))
    rows.append({"kernel": "attention_context", "exact": all(exact)})
    print(json.dumps(rows[-1]), flush=True)
    results["kernels"] = rows
    if (folder / CANDIDATES_FILE).is_file():
        _, results["tiles"] = measure_candidates(folder, lambda row: print(json.dumps(row), flush=True))



def run_translation(bundles: list[Path], sources: list[str], model_dir: Path | None, out: Path,
                    results: dict) -> None:
    from int8mt.runtime.options import SearchOptions
    from int8mt.runtime.translator import Translator

    runs = []
    translators = {(bundle, beam): Translator(bundle, SearchOptions(beam_size=beam), batch_size=32)
                   for bundle in bundles for beam in (1, 4)}
    for translator in translators.values():
        translator.translate(sources[:64])  # warm-up: every kernel loaded, memory pools grown
    for round_ in range(2):  # the bundles interleaved, twice
        for (bundle, beam), translator in translators.items():
            start = time.perf_counter()
            hyps = translator.translate(sources)
            seconds = time.perf_counter() - start
            if round_ == 0:
                (out / f"{bundle.name}-beam{beam}.txt").write_text("\n".join(hyps) + "\n")
            runs.append({"engine": "int8mt INT8 (GPU)", "bundle": bundle.name, "beam": beam, "batch": 32,
                         "round": round_, "seconds": seconds, "sentences_per_s": len(sources) / seconds})
            print(json.dumps(runs[-1]), flush=True)
    if model_dir is not None:
        import torch

        from int8mt.data import iterate_batches, pad_batch
        from int8mt.model.checkpoint import load_model_dir
        from int8mt.model.generate import greedy_decode
        from int8mt.tokenizer import load_tokenizer

        torch.set_default_device("cuda")
        model = load_model_dir(model_dir).cuda().eval()
        tok = load_tokenizer(model_dir)

        @torch.autocast("cuda", dtype=torch.float16)
        def translate(texts: list[str]) -> list[str]:
            ids = tok.encode_batch(texts, model.cfg.max_positions)
            hyps = [""] * len(ids)
            for idx in iterate_batches(ids, 32):
                src = torch.from_numpy(pad_batch([ids[i] for i in idx], model.cfg.pad_id)).cuda()
                limit = min(int(1.5 * src.shape[1]) + 10, model.cfg.max_positions)
                for i, hyp in zip(idx, greedy_decode(model, src, limit)):
                    hyps[i] = tok.decode(hyp)
            return hyps

        translate(sources[:64])
        torch.cuda.synchronize()
        start = time.perf_counter()
        hyps = translate(sources)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        (out / "torch-fp16-beam1.txt").write_text("\n".join(hyps) + "\n")
        runs.append({"engine": "PyTorch FP16 (GPU)", "beam": 1, "batch": 32, "seconds": seconds,
                     "sentences_per_s": len(sources) / seconds})
        print(json.dumps(runs[-1]), flush=True)
    results["translation"] = runs


def prepare_ctranslate2(folder: Path, bundle: Path, model: Path | None) -> None:
    from int8mt.config import load_config
    from int8mt.data import read_parallel
    from int8mt.interface.bench_against import check_same_model, compute_type
    from int8mt.interface.ctranslate2_model import convert_to_ctranslate2
    from int8mt.runtime.bundle import read_manifest

    cfg = load_config(ROOT / "tvm_config.yaml")
    model = model or cfg.paths.model
    check_same_model(bundle, model)
    precision = compute_type(read_manifest(bundle))
    convert_to_ctranslate2(model, folder / "ct2", precision)
    sources, refs = read_parallel(cfg.paths.data, "test_2016_flickr", cfg.train.src_lang, cfg.train.tgt_lang)
    (folder / "sources.txt").write_text("\n".join(sources) + "\n")
    (folder / "references.txt").write_text("\n".join(refs) + "\n")
    (folder / "compute_type").write_text(precision)


def against_ctranslate2(folder: Path, bundle: Path, out: Path) -> None:
    from int8mt.config import load_config
    from int8mt.interface.bench_against import bundle_source_ids, compare_engines, format_comparison, scenarios

    cfg = load_config(ROOT / "tvm_config.yaml")
    ids, decode = bundle_source_ids(bundle, (folder / "sources.txt").read_text().splitlines())
    refs = (folder / "references.txt").read_text().splitlines()
    result = compare_engines("ctranslate2", bundle, folder / "ct2", ids, scenarios((1, 32), cfg.decode.beam_size),
                             None, cfg.decode.length_penalty, decode, refs,
                             precision=(folder / "compute_type").read_text(), gpu=True)
    print(format_comparison(result), flush=True)
    (out / "against-ctranslate2.json").write_text(json.dumps(result, indent=1) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("dir", type=Path)
    p.add_argument("--target", default="cuda-sm90")
    p.add_argument("--tiles", action="store_true", help="also every tile a search tries, at every shape")
    p.add_argument("--first-tile", type=int, default=0, help="with --tiles: start at this candidate")
    r = sub.add_parser("run")
    r.add_argument("dir", type=Path, nargs="?", help="prepared kernels to check (none: translation only)")
    r.add_argument("--bundle", type=Path, action="append", help="a CUDA bundle to translate with (repeatable)")
    r.add_argument("--sources", type=Path)
    r.add_argument("--model", type=Path, help="model directory: also translate with PyTorch FP16")
    r.add_argument("--out", type=Path, required=True)
    c = sub.add_parser("prepare-ctranslate2", help="here: the bundle's model in CTranslate2, and the test sentences")
    c.add_argument("dir", type=Path)
    c.add_argument("--bundle", type=Path, required=True)
    c.add_argument("--model", type=Path, help="the model the bundle was compiled from (default: paths.model)")
    g = sub.add_parser("ctranslate2", help="GPU machine: the bundle against CTranslate2 on the GPU")
    g.add_argument("dir", type=Path, help="a folder from prepare-ctranslate2")
    g.add_argument("--bundle", type=Path, required=True)
    g.add_argument("--out", type=Path, required=True)
    t = sub.add_parser("tiles", help="write the tile table of a run's tile search")
    t.add_argument("results", type=Path, help="results.json of `run DIR` on a DIR prepared with --tiles")
    t.add_argument("--out", type=Path, required=True, help="database folder, e.g. schedules/tuned/cuda-sm90")
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.dir, args.target, args.tiles, args.first_tile)
        return 0
    if args.command == "prepare-ctranslate2":
        prepare_ctranslate2(args.dir, args.bundle, args.model)
        return 0
    if args.command == "ctranslate2":
        args.out.mkdir(parents=True, exist_ok=True)
        against_ctranslate2(args.dir, args.bundle, args.out)
        return 0
    if args.command == "tiles":
        from int8mt.schedules.cuda_tiles import write_tiles

        results = json.loads(args.results.read_text())
        print(f"wrote {write_tiles(args.out, results['tiles'], results['gpu']['name'])}")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    steps = [lambda: run_kernels(args.dir, results)] if args.dir else []
    if args.bundle:
        sources = args.sources.read_text().splitlines()
        steps.append(lambda: run_translation(args.bundle, sources, args.model, args.out, results))
    failed = 0
    for step in steps:  # one failing step does not cost the others' results
        try:
            step()
        except Exception as err:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            results.setdefault("errors", []).append(repr(err))
            failed += 1
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
