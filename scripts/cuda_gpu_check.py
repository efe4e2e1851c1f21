"""The CUDA target's checks and measurements on a GPU, prepared where no GPU is.

``prepare DIR --target cuda-sm90`` (any machine with the compile extras and nvcc): compiles our int8 tensor-core
matmul kernels for the preset at the reference model's shapes and at 4096^3, each as a small library with its
fatbin, into ``DIR``; with ``--tiles``, also the 4096^3 and FFN-in kernels with every tile of ``TILES``.
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

# (name, rows, reduction, columns): the reference model's linear layers (d 256, FFN 1024, 8000 tokens) at an
# encoder batch (32 sentences x 20 tokens) and a beam-4 decoder step (32 x 4 rows); then 4096^3.
SHAPES = [("qkv", 640, 256, 256), ("ffn_in", 640, 256, 1024), ("ffn_out", 640, 1024, 256),
          ("step_ffn_in", 128, 256, 1024), ("step_logits", 128, 256, 8000), ("square", 4096, 4096, 4096)]
DYNAMIC_ROWS = [1, 7, 32, 100, 640]  # rows tried on the dynamic-row kernel (padding to the tile)
ATTENTION = (32, 4, 20, 64)  # batch, heads, tokens, head size of the batched attention-score kernel
# Tiles tried against the default (warps_m, warps_n, frags_m, frags_n, k_frags); those whose accumulator staging
# exceeds 48 KB of shared memory do not compile and are listed as such.
TILES = [(2, 2, 1, 4, 2), (2, 2, 2, 4, 2), (4, 2, 2, 4, 2), (2, 4, 4, 2, 4), (4, 2, 2, 4, 4), (2, 2, 4, 4, 2),
         (2, 2, 2, 2, 4), (4, 4, 2, 2, 2), (2, 2, 2, 2, 8), (2, 4, 2, 2, 4), (4, 2, 2, 2, 4), (2, 2, 2, 4, 4),
         (1, 4, 4, 1, 4)]
TILE_SHAPES = [("square", 4096, 4096, 4096), ("ffn_in", 640, 256, 1024)]


def prepare(out: Path, target: str, tiles: bool) -> None:
    import tvm
    from tvm import relax
    from tvm.s_tir import dlight
    from tvm.script import relax as R

    from int8mt.compiler.cuda import compile_fatbin, cuda_source
    from int8mt.compiler.pipeline import compile_module
    from int8mt.runtime.cuda import source_digest
    from int8mt.schedules.cuda_int8_matmul import CUDAInt8Matmul, MatmulTile
    from int8mt.targets import get_preset

    preset = get_preset(target)
    out.mkdir(parents=True, exist_ok=True)

    def build(name: str, func: relax.Function, tile: MatmulTile | None = None) -> None:
        mod = relax.transform.FuseTransposeMatmul()(tvm.IRModule({"main": func}))
        if tile is not None:  # scheduled here with this tile; the pipeline leaves scheduled kernels as they are
            mod = relax.transform.LegalizeOps()(mod)
            with tvm.target.Target(preset.target):
                mod = dlight.ApplyDefaultSchedule(CUDAInt8Matmul(tile))(mod)
        executable = compile_module(mod, preset)
        source = cuda_source(executable)
        (out / f"{name}.fatbin").write_bytes(compile_fatbin(source, preset.target["arch"]))
        executable.export_library(str(out / f"{name}.so"))
        meta[name] = {"source_sha256": source_digest(source)}

    def dense(k: int, m: int) -> relax.Function:
        x = relax.Var("x", R.Tensor((tvm.tirx.Var("n", "int64"), k), "int8"))
        w = relax.Var("w", R.Tensor((m, k), "int8"))
        bb = relax.BlockBuilder()
        with bb.function("main", [x, w]):
            with bb.dataflow():
                y = bb.emit_output(R.matmul(x, R.permute_dims(w), out_dtype="int32"))
            bb.emit_func_output(y)
        return bb.get()["main"]

    meta: dict = {"target": target, "shapes": SHAPES, "tiles": []}
    for name, n, k, m in SHAPES:
        build(f"dense_{name}", dense(k, m))
    for tile_spec in TILES if tiles else []:
        tile = MatmulTile(*tile_spec)
        for shape, n, k, m in TILE_SHAPES:
            name = f"tile_{shape}_{'x'.join(map(str, tile_spec))}"
            entry = {"kernel": name, "tile": tile_spec, "block_tile": tile.shape, "rows": n, "k": k, "n": m}
            try:
                build(name, dense(k, m), tile)
            except RuntimeError as err:  # ptxas: more shared memory than a block may use
                entry["error"] = str(err).splitlines()[-1]
            meta["tiles"].append(entry)
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
    build("attention", bb.get()["main"])
    (out / "kernels.json").write_text(json.dumps(meta, indent=1))


def _exact_product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` of int8 operands, exactly (float64 holds every sum of these sizes), as int32."""
    return (a.astype(np.float64) @ b.astype(np.float64)).astype(np.int32)


def _int8(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.integers(-128, 128, shape, dtype=np.int8)


def _load(tvm, folder: Path, name: str, meta: dict):
    from int8mt.runtime.cuda import register_kernels

    register_kernels(meta[name]["source_sha256"], (folder / f"{name}.fatbin").read_bytes())
    return tvm.runtime.vm.VirtualMachine(tvm.runtime.load_module(str(folder / f"{name}.so")), tvm.cuda(0))


def _torch_ms(fn, repeat: int = 50) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeat


def run_kernels(folder: Path, results: dict) -> None:
    import torch

    from int8mt.runtime.bundle import import_tvm_runtime
    from int8mt.runtime.cuda import visible_gpu

    tvm = import_tvm_runtime()
    meta = json.loads((folder / "kernels.json").read_text())
    if visible_gpu(tvm) is None:
        raise RuntimeError("no CUDA GPU visible to TVM")
    dev = tvm.cuda(0)
    rng = np.random.default_rng(0)
    results["gpu"] = {"name": dev.device_name, "compute_capability": dev.compute_version}
    rows = []
    for name, n, k, m in meta["shapes"]:
        vm = _load(tvm, folder, f"dense_{name}", meta)
        x, w = _int8(rng, (n, k)), _int8(rng, (m, k))
        row = {"kernel": name, "rows": n, "k": k, "n": m}
        exact = []
        for r in ([n] if n == 4096 else DYNAMIC_ROWS + [n]):
            got = vm["main"](tvm.runtime.tensor(x[:r], dev), tvm.runtime.tensor(w, dev)).numpy()
            exact.append(bool(np.array_equal(got, _exact_product(x[:r], w.T))))
        row["exact"] = all(exact)
        xt, wt = tvm.runtime.tensor(x, dev), tvm.runtime.tensor(w, dev)
        timer = vm.time_evaluator("main", dev, number=20, repeat=3)
        row["int8mt_ms"] = min(timer(xt, wt).results) * 1e3
        tx, tw = torch.from_numpy(x).cuda(), torch.from_numpy(w).cuda()
        row["cublaslt_int8_ms"] = _torch_ms(lambda: torch._int_mm(tx, tw.t())) if n >= 17 else None
        hx, hw = tx.half(), tw.half()
        row["cublas_fp16_ms"] = _torch_ms(lambda: hx @ hw.t())
        row["int8mt_tops"] = 2 * n * k * m / row["int8mt_ms"] / 1e9
        rows.append(row)
        print(json.dumps(row), flush=True)
    vm = _load(tvm, folder, "attention", meta)
    b, h, t, d = ATTENTION
    q, kk, scale = _int8(rng, (b, h, t, d)), _int8(rng, (b, h, t, d)), np.array(0.01, np.float32)
    got = vm["main"](*(tvm.runtime.tensor(a, dev) for a in (q, kk, scale))).numpy()
    want = _exact_product(q, kk.transpose(0, 1, 3, 2)).astype(np.float32) * scale
    rows.append({"kernel": "attention_scores", "exact": bool(np.array_equal(got, want))})
    print(json.dumps(rows[-1]), flush=True)
    results["kernels"] = rows
    tiles = []
    for entry in meta.get("tiles", []):
        row = dict(entry)
        if "error" not in row:
            vm = _load(tvm, folder, row["kernel"], meta)
            x, w = _int8(rng, (row["rows"], row["k"])), _int8(rng, (row["n"], row["k"]))
            xt, wt = tvm.runtime.tensor(x, dev), tvm.runtime.tensor(w, dev)
            row["exact"] = bool(np.array_equal(vm["main"](xt, wt).numpy()[:64], _exact_product(x[:64], w.T)))
            row["ms"] = min(vm.time_evaluator("main", dev, number=20, repeat=3)(xt, wt).results) * 1e3
            row["tops"] = 2 * row["rows"] * row["k"] * row["n"] / row["ms"] / 1e9
        tiles.append(row)
        print(json.dumps(row), flush=True)
    results["tiles"] = tiles


def run_translation(bundle: Path, sources: list[str], model_dir: Path | None, out: Path, results: dict) -> None:
    from int8mt.runtime.search import SearchOptions
    from int8mt.runtime.translator import Translator

    runs = []
    for beam in (1, 4):
        translator = Translator(bundle, SearchOptions(beam_size=beam), batch_size=32)
        translator.translate(sources[:64])  # warm-up: every kernel loaded, memory pools grown
        start = time.perf_counter()
        hyps = translator.translate(sources)
        seconds = time.perf_counter() - start
        (out / f"int8mt-beam{beam}.txt").write_text("\n".join(hyps) + "\n")
        runs.append({"engine": "int8mt INT8 (GPU)", "beam": beam, "batch": 32, "seconds": seconds,
                     "sentences_per_s": len(sources) / seconds})
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("dir", type=Path)
    p.add_argument("--target", default="cuda-sm90")
    p.add_argument("--tiles", action="store_true", help="also every tile of TILES (the tile search)")
    r = sub.add_parser("run")
    r.add_argument("dir", type=Path)
    r.add_argument("--bundle", type=Path)
    r.add_argument("--sources", type=Path)
    r.add_argument("--model", type=Path, help="model directory: also translate with PyTorch FP16")
    r.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.dir, args.target, args.tiles)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    steps = [lambda: run_kernels(args.dir, results)]
    if args.bundle is not None:
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
