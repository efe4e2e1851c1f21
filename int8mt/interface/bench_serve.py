"""Load benchmark of ``int8mt serve``: sentences/s and latency at N concurrent HTTP clients, against calling
the runtime directly in one process with batches of 32.

Every client sends requests of ``request_sentences`` sentences (1: the online case; more: paragraphs) over a
kept-alive connection, each as soon as its previous answer arrives. Clients run in this process on the
same machine as the server, so at high client counts they take CPU time the server would otherwise have:
the figures are a lower bound for a server whose clients are elsewhere. The in-process figure is measured
before and after the server runs and averaged.
"""
from __future__ import annotations

import http.client
import itertools
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from int8mt.runtime.options import SearchOptions
from int8mt.runtime.translator import Translator
from int8mt.serving.cluster import WorkerLayout
from int8mt.serving.server import ServerSettings, start

from .plotting import pyplot, save

IN_PROCESS_BATCH = 32


@dataclass
class LoadRow:
    clients: int
    request_sentences: int
    requests: int
    seconds: float
    sentences_per_second: float
    p50_ms: float
    p99_ms: float
    share_of_in_process: float  # sentences/s over the in-process batch-32 figure


def in_process_rate(bundle_dir: Path, sentences: list[str], options: SearchOptions) -> float:
    translator = Translator(bundle_dir, options, IN_PROCESS_BATCH)
    t0 = time.perf_counter()
    translator.translate(sentences)
    return len(sentences) / (time.perf_counter() - t0)


def _client_loop(host: str, port: int, sentences: list[str], size: int, beam: int, tickets: itertools.count,
                 total: int, latencies: list[float], lock: threading.Lock) -> None:
    connection = http.client.HTTPConnection(host, port, timeout=300)
    try:
        while (ticket := next(tickets)) < total:
            text = [sentences[(ticket * size + i) % len(sentences)] for i in range(size)]
            body = json.dumps({"text": text, "beam": beam})
            t0 = time.perf_counter()
            connection.request("POST", "/translate", body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            answer = response.read()
            if response.status != 200:
                raise RuntimeError(f"server answered {response.status}: {answer[:200]!r}")
            with lock:
                latencies.append(time.perf_counter() - t0)
    finally:
        connection.close()


def load_run(host: str, port: int, sentences: list[str], clients: int, total: int, beam: int,
             size: int = 1) -> tuple[float, list]:
    """``total`` requests of ``size`` sentences from ``clients`` concurrent clients; returns seconds and
    latencies."""
    latencies: list[float] = []
    lock, tickets = threading.Lock(), itertools.count()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(_client_loop, host, port, sentences, size, beam, tickets, total, latencies, lock)
                       for _ in range(clients)]:
            future.result()
    return time.perf_counter() - t0, latencies


def bench_serving(bundle_dir: Path, sentences: list[str], client_counts: tuple[int, ...],
                  request_sizes: tuple[int, ...], layout: WorkerLayout, settings: ServerSettings, port: int,
                  requests_per_client: int = 16, min_sentences: int = 128) -> dict:
    """The load table for one server layout: each request size at each client count, ``max(min_sentences,
    requests_per_client x clients x size)`` sentences after a warm-up of one request per client."""
    from ray import serve

    options = settings.options
    before = in_process_rate(bundle_dir, sentences, options)
    start(bundle_dir, layout, settings, "127.0.0.1", port)
    rows = []
    try:
        for size, clients in itertools.product(request_sizes, client_counts):
            load_run("127.0.0.1", port, sentences, clients, clients, options.beam_size, size)  # warm-up
            total = max(-(-min_sentences // size), requests_per_client * clients)
            seconds, latencies = load_run("127.0.0.1", port, sentences, clients, total, options.beam_size, size)
            rows.append(dict(clients=clients, request_sentences=size, requests=total, seconds=round(seconds, 2),
                             sentences_per_second=round(total * size / seconds, 1),
                             p50_ms=round(1000 * float(np.percentile(latencies, 50)), 1),
                             p99_ms=round(1000 * float(np.percentile(latencies, 99)), 1)))
    finally:
        serve.shutdown()
    after = in_process_rate(bundle_dir, sentences, options)
    rate = (before + after) / 2
    return {"bundle": str(bundle_dir), "beam": options.beam_size, "replicas": layout.workers,
            "threads": layout.threads, "max_batch": settings.max_batch, "batch_wait_ms": settings.batch_wait_ms,
            "in_process_batch": IN_PROCESS_BATCH,
            "in_process_sentences_per_second": {"before": round(before, 1), "after": round(after, 1)},
            "rows": [asdict(LoadRow(**row, share_of_in_process=round(row["sentences_per_second"] / rate, 2)))
                     for row in rows]}


def format_load_table(result: dict) -> str:
    rate = result["in_process_sentences_per_second"]
    lines = [f"int8mt serve, {result['replicas']} replicas x {result['threads']} threads, beam {result['beam']}, "
             f"batches of up to {result['max_batch']}; in process, batch {result['in_process_batch']}: "
             f"{rate['before']} / {rate['after']} sentences/s (before / after)", "",
             "| clients | sentences per request | requests | sentences/s | p50 ms | p99 ms | share of in-process |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['clients']} | {r['request_sentences']} | {r['requests']} | {r['sentences_per_second']} | "
                     f"{r['p50_ms']} | "
                     f"{r['p99_ms']} | {r['share_of_in_process']:.2f} |")
    return "\n".join(lines)


def plot_load(result: dict, path: Path) -> None:
    """Throughput against the in-process line, and p50/p99 latency, by number of clients."""
    plt = pyplot()
    rate = result["in_process_sentences_per_second"]
    sizes = sorted({r["request_sentences"] for r in result["rows"]})
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for size in sizes:
        rows = [r for r in result["rows"] if r["request_sentences"] == size]
        clients = [r["clients"] for r in rows]
        left.plot(clients, [r["sentences_per_second"] for r in rows], "o-", label=f"serve, {size} per request")
        for key, style in (("p50_ms", "o-"), ("p99_ms", "x--")):
            right.plot(clients, [r[key] for r in rows], style, label=f"{key[:3]}, {size} per request")
    left.axhline((rate["before"] + rate["after"]) / 2, color="gray", ls="--",
                 label=f"in process, batch {result['in_process_batch']}")
    left.set(xscale="log", xlabel="concurrent clients", ylabel="sentences/s", ylim=(0, None),
             title=f"throughput ({result['replicas']} x {result['threads']} threads, beam {result['beam']})")
    left.legend()
    right.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="latency (ms)", title="latency")
    right.legend()
    save(fig, path)
