"""int8mt serve: serve a bundle over HTTP with Ray Serve (replicas, batching across requests)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import config_path, port_number
from ._decode_args import add_decode_arguments, decode_settings


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a bundle over HTTP with Ray Serve: POST /translate, GET /health")
    p.add_argument("bundle", type=Path, help="bundle directory from `int8mt compile`")
    p.add_argument("--replicas", type=int, default=None,
                   help="replicas, each loading the bundle once (default: the cluster's CPUs / --threads; for a CUDA "
                        "bundle one per free GPU, more sharing the GPUs evenly)")
    p.add_argument("--threads", type=int, default=None, help="threads per replica (default: 1)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="how long a batch waits for more sentences (default: 5)")
    p.add_argument("--max-request-sentences", type=int, default=1024,
                   help="texts one request may hold; more are answered 413 (default: 1024)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=port_number, default=8000, help="HTTP port (default: 8000)")
    p.add_argument("--address", default=None,
                   help="Ray cluster to deploy on, e.g. ray://HEAD:10001 or auto (default: start a local one)")
    add_decode_arguments(p, "--max-batch", "sentences from concurrent requests gathered into one call")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..serving.cluster import WorkerLayout, checked_bundle, connect, import_ray

    cfg = load_config(config_path(args))
    import_ray()  # a clear error before the server module imports Ray
    from ..serving.server import ServerSettings, start

    options, max_batch = decode_settings(args, cfg.decode)
    settings = ServerSettings(options=options, max_batch=max_batch, batch_wait_ms=args.batch_wait_ms,
                              max_request_sentences=args.max_request_sentences, target_lang=args.target_lang)
    bundle, manifest = checked_bundle(args.bundle, settings.options, settings.max_batch, settings.target_lang)
    ray = connect(args.address)
    layout = WorkerLayout.fit(ray, manifest, args.replicas, args.threads)
    start(bundle, layout, settings, args.host, args.port)
    print(f"int8mt serve: {bundle.name} on http://{args.host}:{args.port}/translate ({layout.workers} replicas x "
          f"{layout.threads} threads{f', {layout.gpus:g} GPU' if layout.gpus else ''}, batches of up to "
          f"{settings.max_batch}); Ctrl-C stops",
          file=sys.stderr, flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        from ray import serve

        serve.shutdown()
