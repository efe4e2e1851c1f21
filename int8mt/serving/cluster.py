"""Connecting to Ray and placing bundle workers on it: the parts ``serve`` and batch translation share."""
from __future__ import annotations

import hashlib
import math
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from int8mt.errors import UserError
from int8mt.runtime.bundle import MANIFEST_FILE, check_bundle, is_cuda, max_rows, read_manifest, tokenizer_kind
from int8mt.runtime.options import SearchOptions
from int8mt.runtime.translator import check_decoding
from int8mt.tokenizer import check_target_lang, load_tokenizer

LOCAL = "local"  # --ray / --address value meaning: start a Ray instance inside this command
CONNECT_TIMEOUT_S = 5.0
GPU_SHARES = 10_000  # Ray's fractional resources are multiples of 1 / GPU_SHARES


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UserError("Ray is not installed; install the serving extra: pip install 'int8mt[serve]'") from None
    return ray


def connect(address: str | None) -> Any:
    """Ray, connected to the cluster at ``address``, or to a local instance this process starts (``None`` or
    ``local``) on the CPUs this process may use, without Ray's dashboard."""
    ray = import_ray()
    if address not in (None, LOCAL, "auto"):
        _check_reachable(address)
    if ray.is_initialized():
        return ray
    try:
        if address in (None, LOCAL):
            ray.init(num_cpus=len(os.sched_getaffinity(0)), include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    except ConnectionError as err:
        raise UserError(f"cannot connect to a Ray cluster at {address}: {err}") from None
    return ray


def _check_reachable(address: str) -> None:
    """Refuse a malformed address, or one where nothing listens, at once (Ray itself retries for minutes)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"Ray address {address!r} is not HOST:PORT, ray://HOST:PORT or auto")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        raise UserError(f"no Ray cluster answers at {address} ({err.strerror or err}); start one with "
                        "`ray start --head`, or check the address") from None


@dataclass(frozen=True)
class WorkerLayout:
    """How many bundle workers (Serve replicas, Ray Data actors) run, each with how many threads and, for a CUDA
    bundle, what share of a GPU."""

    workers: int
    threads: int
    gpus: float = 0.0

    @classmethod
    def fit(cls, ray: Any, manifest: dict, workers: int | None, threads: int | None) -> "WorkerLayout":
        """The layout asked for, completed from the cluster's free resources: for a CPU bundle one-thread workers
        on each free CPU by default; for a CUDA bundle (``manifest``) one worker per free GPU by default, more
        sharing each GPU evenly. A layout that needs more than is free is an error (Ray would wait for it
        forever), and so is a CUDA bundle on a cluster without a free GPU."""
        threads = 1 if threads is None else threads
        if threads < 1:
            raise UserError(f"threads per worker must be at least 1, got {threads}")
        if workers is not None and workers < 1:
            raise UserError(f"workers must be at least 1, got {workers}")
        available = ray.available_resources()
        gpus = 0.0
        if is_cuda(manifest):
            free_gpus = math.floor(available.get("GPU", 0) + 1 / GPU_SHARES)  # whole GPUs
            if free_gpus < 1:
                total = ray.cluster_resources().get("GPU", 0)
                raise UserError(f"the bundle is compiled for {manifest['target']['preset']} and runs on an NVIDIA "
                                f"GPU, but the Ray cluster has no free GPU ({total:g} in all); add a node with one "
                                "(`ray start --num-gpus N`), or compile the model for a CPU preset "
                                "(`int8mt targets`)")
            workers = free_gpus if workers is None else workers
            per_gpu = -(-workers // free_gpus)
            gpus = (GPU_SHARES // per_gpu) / GPU_SHARES
        free = int(available.get("CPU", 0))
        workers = max(1, free // threads) if workers is None else workers
        if workers * threads > free:
            total = int(ray.cluster_resources().get("CPU", 0))
            raise UserError(f"{workers} workers x {threads} threads need {workers * threads} CPUs, but the Ray "
                            f"cluster has {free} of its {total} CPUs free; ask for fewer")
        return cls(workers, threads, gpus)


def checked_bundle(bundle_dir: Path, options: SearchOptions, batch_size: int,
                   target_lang: str | None = None) -> tuple[Path, dict]:
    """``bundle_dir`` made absolute and its manifest, after the checks the runtime does before loading it (manifest, checksums,
    library headers, CPU features) and those of the decoding settings, so that a bad bundle or setting is
    reported here rather than by every worker. A multilingual model needs ``target_lang`` here (sentences
    that start with their own ``>>xx<<`` token keep it), so that no batch of the workers fails for want of one."""
    bundle_dir = Path(bundle_dir).resolve()
    manifest = read_manifest(bundle_dir)
    check_bundle(bundle_dir, manifest)
    check_decoding(options, batch_size, max_rows(manifest))
    tokenizer = load_tokenizer(bundle_dir, tokenizer_kind(manifest))
    check_target_lang(tokenizer, target_lang)
    if tokenizer.target_languages and target_lang is None:
        names = ", ".join(token[2:-2] for token in tokenizer.target_languages)
        raise UserError(f"{bundle_dir.name} is a multilingual model: pass --target-lang with one of {names} "
                        "(sentences starting with their own >>xx<< token keep it)")
    return bundle_dir, manifest


def pack_bundle(bundle_dir: Path) -> dict[str, bytes]:
    """The bundle's files by name, to put in Ray's object store: workers on any node unpack them."""
    return {path.name: path.read_bytes() for path in sorted(Path(bundle_dir).iterdir()) if path.is_file()}


def unpack_bundle(files: dict[str, bytes]) -> Path:
    """A folder holding ``files``: one per bundle and node, named by the manifest's digest, shared by the
    workers on the node and kept for later runs (written beside it, then renamed into place)."""
    digest = hashlib.sha256(files[MANIFEST_FILE]).hexdigest()[:20]
    root = Path(tempfile.gettempdir()) / "int8mt-bundles"
    final = root / digest
    if not final.is_dir():
        staging = root / f".{digest}.partial-{os.getpid()}"
        staging.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (staging / name).write_bytes(data)
        try:
            staging.rename(final)
        except OSError:  # another worker on this node finished first
            shutil.rmtree(staging, ignore_errors=True)
    return final


def worker_options(layout: WorkerLayout) -> dict[str, Any]:
    """Ray actor options for a bundle worker: its threads as CPUs (TVM's thread pool sized to them) and its share
    of a GPU (Ray then shows it only that GPU)."""
    options: dict[str, Any] = {"num_cpus": layout.threads,
                               "runtime_env": {"env_vars": {"TVM_NUM_THREADS": str(layout.threads)}}}
    if layout.gpus:
        options["num_gpus"] = layout.gpus
    return options


def worker_error(messages: list[str]) -> str:
    """The error a bundle worker raised, from Ray's messages about it (the traceback's last line; our errors
    without their type)."""
    lines = [line for message in messages for line in message.strip().splitlines()]
    if not lines:
        return "Ray gave no reason; see the workers' logs (`ray logs`)"
    kind, colon, text = lines[-1].partition(": ")
    if not colon:
        return lines[-1]
    return text if kind.startswith("int8mt.") else f"{kind.rpartition('.')[2]}: {text}"
