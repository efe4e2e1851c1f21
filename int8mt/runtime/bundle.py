"""Load a compiled bundle with the TVM runtime only.

Before the ``.so`` is opened, the manifest is validated against its schema, the files' checksums compared,
the library's ELF headers checked (this machine's architecture, every segment inside the file) and the CPU
checked for the features the manifest says the code needs, so that a bundle built for another machine, or a
damaged one, fails with a message instead of SIGILL or SIGBUS.
"""
from __future__ import annotations

import copy
import ctypes
import importlib.util
import json
import math
import os
import struct
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, NamedTuple

from int8mt.errors import UserError
from int8mt.targets import amx_permission, host_arch, host_features, target_device
from int8mt.targets.presets import AMX_FEATURES
from int8mt.tokenizer import TOKENIZER_KINDS, MarianTokenizer, Tokenizer, load_tokenizer

from .cache import CacheRows, SelfAttentionCache, aligned_empty
from .tensors import (CPU_DEVICE_TYPE, TENSOR_ALIGNMENT, MappedFile, read_int64, tensor_functions, view_at,
                      write_int64)

if TYPE_CHECKING:
    import numpy as np

LIBRARY_FILE, MANIFEST_FILE, WEIGHTS_FILE = "model.so", "manifest.json", "weights.bin"
DEFAULT_MAX_ROWS = 1024  # rows (sentences x beams) per call: what compiling records, and the bound of older bundles
REPORT_FILE = "report.json"  # quantization report (`int8mt inspect`), informational
BUNDLE_FORMAT = 8  # the entry points (ENTRY_POINTS) and their signatures: the decoder step's cache layout, caches
#                   with per-position scales (manifest ``cache_scales``), the step writing its rows into the cache,
#                   the weights as parameters, checked once by CHECK_WEIGHTS, beam search's choice on the device
ENTRY_POINTS = ("encode", "decode_step", "reorder_cache", "top_candidates", "select_beams")
GREEDY_ENTRY_POINT = "greedy_decode"  # CPU bundles: one sentence's greedy search in one call (where the
#                                        manifest lists it; otherwise the host runs the steps)
CHECK_WEIGHTS = "check_weights"  # the library's check of all the weights' dtypes and shapes, which the entry
#                                   points leave out (compiler/passes/lift_weights.py)


class BundleError(UserError):
    """A bundle that is missing, damaged, or built for another machine."""


# The manifest's schema: key -> (type, type of the items for lists and mappings' values); None = optional key.
MANIFEST_SCHEMA: dict[str, tuple[type, type | None]] = {
    "format": (int, None),
    "target": (dict, None),
    "entry_points": (list, str),
    "model": (dict, None),
    "files": (dict, str),
    "top_candidates": (int, None),
    "weights": (dict, None),
}
MANIFEST_OPTIONAL: dict[str, tuple[type, type | None]] = {"max_rows": (int, None), "cache_dtype": (str, None),
                                                           "cache_scales": (bool, None), "tokenizer": (str, None),
                                                           "cuda": (dict, None)}
CUDA_SCHEMA: dict[str, tuple[type, type | None]] = {"arch": (str, None), "compute_capability": (list, int),
                                                    "source_sha256": (str, None)}
WEIGHTS_SCHEMA: dict[str, tuple[type, type | None]] = {"tensors": (list, dict), "entry_points": (dict, list)}
WEIGHT_SCHEMA: dict[str, tuple[type, type | None]] = {"dtype": (str, None), "shape": (list, int), "offset": (int, None)}
TARGET_SCHEMA: dict[str, tuple[type, type | None]] = {"preset": (str, None), "required_features": (list, str)}
TARGET_OPTIONAL: dict[str, tuple[type, type | None]] = {"arch": (str, None)}
MODEL_KEYS = ("decoder_layers", "heads", "d_model", "ffn_dim", "vocab_size", "max_positions", "pad_id", "eos_id",
              "decoder_start_id")
MODEL_OPTIONAL_KEYS = ("target_vocab_size",)  # integers where present (and not null)
ELF_MACHINES = {"x86_64": 62, "aarch64": 183}  # e_machine of this machine's architecture
ELF_HEADERS_READ = 1 << 16  # bytes read from the start of the library: the ELF and program headers


def _check_fields(where: str, data: dict, schema: dict, required: bool = True) -> None:
    for key, (kind, item) in schema.items():
        if key not in data:
            if required:
                raise BundleError(f"{where} has no {key!r}; rebuild the bundle")
            continue
        value = data[key]
        if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
            raise BundleError(f"{where}: {key!r} must be a {kind.__name__}, not {type(value).__name__}; "
                              "rebuild the bundle")
        items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        if item is not None and not all(isinstance(v, item) for v in items):
            raise BundleError(f"{where}: {key!r} must hold {item.__name__} values; rebuild the bundle")


def validate_manifest(manifest: object, where: str) -> dict:
    """``manifest`` checked against :data:`MANIFEST_SCHEMA` (types included), else a :class:`BundleError`."""
    if not isinstance(manifest, dict):
        raise BundleError(f"{where} is corrupt (not a JSON object); rebuild the bundle")
    if isinstance(manifest.get("format"), int) and manifest["format"] != BUNDLE_FORMAT:
        raise BundleError(f"bundle format {manifest['format']} is not supported (this runtime reads "
                          f"{BUNDLE_FORMAT}); rebuild it with this version of int8mt")
    _check_fields(where, manifest, MANIFEST_SCHEMA)
    _check_fields(where, manifest, MANIFEST_OPTIONAL, required=False)
    _check_fields(f"{where} (target)", manifest["target"], TARGET_SCHEMA)
    _check_fields(f"{where} (target)", manifest["target"], TARGET_OPTIONAL, required=False)
    if is_cuda(manifest):
        _check_fields(where, manifest, {"cuda": (dict, None)})
        _check_fields(f"{where} (cuda)", manifest["cuda"], CUDA_SCHEMA)
    _check_fields(f"{where} (weights)", manifest["weights"], WEIGHTS_SCHEMA)
    for tensor in manifest["weights"]["tensors"]:
        _check_fields(f"{where} (weights)", tensor, WEIGHT_SCHEMA)
    bad = [k for k in MODEL_KEYS if not isinstance(manifest["model"].get(k), int)]
    bad += [k for k in MODEL_OPTIONAL_KEYS if not isinstance(manifest["model"].get(k), (int, type(None)))]
    if bad:
        raise BundleError(f"{where} (model): {', '.join(bad)} must be integers; rebuild the bundle")
    return manifest


def check_elf(library: Path) -> None:
    """``library`` is an ELF shared library for this machine's architecture whose segments all lie inside the
    file (a truncated library would be mapped past its end and crash the process with SIGBUS on first use)."""
    with open(library, "rb") as f:
        data = f.read(ELF_HEADERS_READ)
    size = library.stat().st_size
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise BundleError(f"{library} is not a 64-bit little-endian ELF shared library; rebuild the bundle")
    machine = struct.unpack_from("<H", data, 18)[0]
    host = host_arch()
    if ELF_MACHINES.get(host) not in (None, machine):
        arch = {v: k for k, v in ELF_MACHINES.items()}.get(machine, f"machine {machine}")
        raise BundleError(f"{library} is code for {arch}, this machine is {host}; compile the bundle for a preset "
                          "of this machine (`int8mt targets`)")
    phoff, = struct.unpack_from("<Q", data, 32)
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    if phnum and (phentsize < 56 or phoff + phentsize * phnum > len(data)):  # 56: an ELF64 program header
        raise BundleError(f"{library} is damaged (its program headers lie outside the file); rebuild the bundle")
    for entry in range(phoff, phoff + phentsize * phnum, phentsize):
        offset, = struct.unpack_from("<Q", data, entry + 8)  # p_offset
        filesz, = struct.unpack_from("<Q", data, entry + 32)  # p_filesz
        if offset + filesz > size:
            raise BundleError(f"{library} is truncated ({size} bytes; a segment ends at byte {offset + filesz}); "
                              "rebuild the bundle")


def use_runtime_library() -> None:
    """In a process that only runs bundles (and the processes it starts), have ``import tvm`` load TVM's runtime
    library rather than the whole compiler (about 110 MB less resident memory, a second less to start); CPU
    bundles do not import ``tvm`` at all (:func:`import_tvm_ffi`), CUDA bundles do. A no-op where TVM is
    already imported or ``TVM_USE_RUNTIME_LIB`` is set."""
    if "tvm" not in sys.modules:
        os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")


def import_tvm_ffi() -> Any:
    """TVM's FFI with TVM's runtime libraries loaded, for CPU bundles: without TVM's Python package, which holds
    about 40 MB more (``import tvm`` is left to CUDA bundles and the compiler). Like :func:`import_tvm_runtime`,
    it sizes TVM's thread pool to the CPUs this process may use and keeps the FFI from importing torch, and also
    OpenSSL, ml_dtypes and NumPy (``UNUSED_BY_CPU_RUNTIME``)."""
    _import_without("tvm_ffi", UNUSED_BY_CPU_RUNTIME)
    import tvm_ffi

    for library, defines in (("libtvm_runtime.so", RELEASE_POOLS), ("libtvm_runtime_extra.so", TOP_K_KERNEL)):
        if tvm_ffi.get_global_func(defines, allow_missing=True) is None:  # not loaded yet
            ctypes.CDLL(str(_tvm_library_dir() / library), ctypes.RTLD_GLOBAL)
    return tvm_ffi


def _import_without(module: str, blocked: tuple[str, ...] = ("torch",)) -> None:
    """Import ``module`` (TVM or its FFI) unless its package or torch is imported, with imports of the ``blocked``
    modules failing meanwhile (start-up time and memory the runtime does not need); first size TVM's thread pool
    to this process's CPUs unless ``TVM_NUM_THREADS`` is set, its workers' spinning to ``POOL_SPIN_COUNT``
    unless ``TVM_THREAD_POOL_SPIN_COUNT`` is, and, where NumPy is not imported yet, NumPy's OpenBLAS to no threads
    of its own unless ``OPENBLAS_NUM_THREADS`` is set (see :data:`BLAS_THREADS`)."""
    os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))
    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", str(POOL_SPIN_COUNT))
    if "numpy" not in sys.modules:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", str(BLAS_THREADS))
    if module.split(".")[0] not in sys.modules and "torch" not in sys.modules:
        _import_blocking(module, blocked)


def _import_blocking(module: str, blocked: tuple[str, ...]) -> ModuleType:
    """``import module`` with ``import`` of each of ``blocked`` not yet imported raising ImportError meanwhile
    (the libraries that fall back without them then do so for the life of the process)."""
    unset = [name for name in blocked if name not in sys.modules]
    for name in unset:
        sys.modules[name] = None  # type: ignore[assignment]  # makes `import name` raise ImportError
    try:
        return importlib.import_module(module)
    finally:
        for name in unset:
            del sys.modules[name]


def _tvm_library_dir() -> Path:
    """Where the ``apache-tvm`` wheel keeps its shared libraries (found without importing ``tvm``)."""
    spec = importlib.util.find_spec("tvm")
    if spec is None or spec.origin is None:
        raise BundleError("TVM is not installed: pip install int8mt (it brings apache-tvm)")
    return Path(spec.origin).parent / "lib"


def import_tvm_runtime() -> Any:
    """Import TVM without letting its FFI layer pull in torch (it tries to, for DLPack interop).

    TVM's thread pool would start with one worker per *physical* core it detects (one here, on two
    vCPUs, which halves the speed); unless ``TVM_NUM_THREADS`` is set, use every CPU this process may run on.
    """
    _import_without("tvm.runtime")
    import tvm.runtime
    import tvm.runtime.vm  # a runtime-only TVM does not import it with tvm.runtime

    return tvm


POOL_SPIN_COUNT = 10000  # yields of an idle worker of a TVM thread pool before it sleeps (TVM's default: 300000).
# Each thread that runs kernels has a pool, whose workers start by spinning; a one-thread replica's worker is never
# given work, and its 300000 yields took the CPUs from the replicas for the first second or more (two one-thread
# replicas at batch 32, greedy: 1790-1830 sentences/s, against 3250-3530 with 10000; beam 4 and batch 1 likewise).
# Between the kernels of a two-thread translator, 10000 yields are plenty (as fast as 300000; 0 halved its speed).
BLAS_THREADS = 1  # NumPy's OpenBLAS: the runtime multiplies no matrices in NumPy, yet OpenBLAS starts a thread per
# CPU when NumPy loads (which a search does on its first batch), each spinning about 0.1 s: on two vCPUs 0.05 s of a
# 0.9 s `int8mt translate` of 300 sentences (0.89-0.91 against 0.93-0.95 s, three runs each) and 3.5 MiB
UNUSED_BY_CPU_RUNTIME = ("torch", "_hashlib", "ml_dtypes", "numpy")  # modules TVM's FFI imports if it can: torch
# (DLPack interop), OpenSSL's hashes (3.8 MiB resident), ml_dtypes (NumPy types for bfloat16 and float8; 2 MiB) and
# NumPy (11 MiB; for its dtype objects as arguments: ours pass dtypes as strings, and arrays through DLPack either
# way). A process that loads a CPU bundle and translates one sentence at a time never imports NumPy
# (:mod:`int8mt.runtime.tensors`); the searches that need it import it later.
TOP_K_KERNEL = "tvm.contrib.sort.topk"  # top candidates of bundles built before our top-k kernel (runtime_extra)
RELEASE_POOLS = "vm.builtin.memory_manager.clear"  # in TVM's libtvm_runtime
MADV_DONTNEED = 4  # Linux madvise advice
POOLED_ALLOCATOR = 2  # the Relax VM's allocator kinds: 1 naive, 2 pooled
RELEASE_POOLS_SIZES = 8  # CPU: new call sizes between releases of the memory pools at most ...
RELEASE_POOLS_MIN_BYTES = 2 << 20  # ... once their logits and cross-attention keys and values take this many bytes
POOL_BUDGET_BYTES = 4 << 20  # and at most this many bytes of them left in the pools (16 MB: beam 4, two replicas,
# 6-17 MiB more at its peak, no faster)
LOGIT_BYTES = 4  # float32
SCALE_BYTES = 4  # a cached key's or value's float32 scale
RELEASE_AFTER_ENCODER_BYTES = 2 << 20  # CPU: the pools are released after an encoder call whose FFN activations
# took this many bytes: their pages would stay resident through the decoder's peak (opus-mt shape, beam 4 at
# batch 32: 295 -> 271 MiB peak); smaller calls, one sentence at a time, keep them (releasing the pools at every
# sentence held two replicas at 360-400 sentences/s against 430-510)
ACTIVATION_BYTES = 4  # int32 or float32
GPU_RELEASE_POOLS_SIZES = 64  # a GPU's (releasing means cudaFree, which waits for the device, and cudaMalloc
GPU_POOL_BUDGET_BYTES = 64 << 20  # again)
SHARE_ALL_CPUS = -3  # TVM's ThreadGroup::kSpecifyThreadShareAllCore: a pool's threads may run on any listed CPU


def set_thread_count(threads: int) -> None:
    """Run the compiled kernels that the calling thread launches on ``threads`` threads (TVM keeps one thread
    pool per calling thread), free to run on any CPU this process may use."""
    cpus = [str(cpu) for cpu in sorted(os.sched_getaffinity(0))]
    import_tvm_ffi().get_global_func("runtime.config_threadpool")(SHARE_ALL_CPUS, threads, cpus)


def drop_unmodified_pages(library: Path) -> int:
    """Return to the kernel the resident pages of ``library``'s read-only mappings that were never written (the
    weights' serialized copy: once loaded into tensors, nothing reads it; a page read again comes back from the
    file). Mappings with written pages (relocations) are left alone. Returns the bytes released."""
    try:
        smaps = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return 0
    target, released, region = str(Path(library).resolve()), 0, None
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    for line in smaps:
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:  # a mapping's header line
            start, end = (int(x, 16) for x in fields[0].split("-"))
            region = (start, end) if fields[1] == "r--p" and fields[-1] == target else None
        elif region and fields[:1] == ["Anonymous:"] and fields[1] == "0":
            if libc.madvise(region[0], region[1] - region[0], MADV_DONTNEED) == 0:
                released += region[1] - region[0]
            region = None
    return released


def _aligned(array: np.ndarray) -> np.ndarray:
    """``array``, C-contiguous, writable and with its data at a multiple of ``TENSOR_ALIGNMENT`` bytes (copied if
    need be)."""
    if not array.flags.c_contiguous:
        array = array.copy()
    if array.__array_interface__["data"][0] % TENSOR_ALIGNMENT == 0 and array.flags.writeable:
        return array
    aligned = aligned_empty(array.shape, array.dtype)
    aligned[...] = array
    return aligned


def sha256(path: Path) -> str:
    """The SHA-256 of the file at ``path``, by Python's own SHA-256 unless ``hashlib`` is imported already (OpenSSL's,
    which ``hashlib`` loads, holds 3.8 MiB resident; Python's hashes 350 MB/s against its 1.9 GB/s: 20 ms longer
    to load the reference bundle)."""
    digest = _import_blocking("hashlib", ("_hashlib",)).sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(bundle_dir: Path) -> dict:
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        state = "is a file, not a bundle directory" if bundle_dir.exists() else "does not exist"
        raise BundleError(f"bundle {bundle_dir} {state}; build one with `int8mt compile`")
    for name in (MANIFEST_FILE, LIBRARY_FILE):
        if not (bundle_dir / name).is_file():
            raise BundleError(f"bundle {bundle_dir} is incomplete: {name} is missing; rebuild it with `int8mt compile`")
    where = str(bundle_dir / MANIFEST_FILE)
    try:
        manifest = validate_manifest(json.loads((bundle_dir / MANIFEST_FILE).read_text(encoding="utf-8")), where)
        if tokenizer_kind(manifest) not in TOKENIZER_KINDS:
            raise BundleError(f"{where}: tokenizer {manifest['tokenizer']!r} is not one this runtime knows "
                              f"({', '.join(TOKENIZER_KINDS)}); rebuild the bundle with this version of int8mt")
        missing = [name for name in ENTRY_POINTS if name not in manifest["entry_points"]]
        if missing:
            raise BundleError(f"bundle {bundle_dir} lacks the entry points {missing} that this runtime needs; "
                              "rebuild it with `int8mt compile`")
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(f"{where} is corrupt ({err}); rebuild the bundle") from None
    return manifest


def check_runs_here(bundle_dir: Path) -> dict:
    """The bundle's manifest, after the checks that loading it on this machine makes before it loads the library
    (:func:`check_bundle`; for a CUDA bundle, a GPU of its compute capability): for commands that run it in other
    processes, so that they refuse at once."""
    manifest = read_manifest(bundle_dir)
    check_bundle(bundle_dir, manifest)
    if is_cuda(manifest):
        from .cuda import cuda_device

        cuda_device(import_tvm_runtime(), manifest)
    return manifest


def is_cuda(manifest: dict) -> bool:
    """The bundle's model runs on an NVIDIA GPU."""
    target = manifest["target"].get("tvm")
    return isinstance(target, dict) and target_device(target) == "cuda"


def tokenizer_kind(manifest: dict) -> str:
    """How the bundle tokenizes: ``sentencepiece`` (our ``spm.model``) or ``marian`` (the OPUS-MT files)."""
    return manifest.get("tokenizer", "sentencepiece")


def max_rows(manifest: dict) -> int:
    """Rows (sentences x beams) one call of the bundle's entry points takes."""
    return manifest.get("max_rows", DEFAULT_MAX_ROWS)


def check_bundle(bundle_dir: Path, manifest: dict) -> None:
    """The architecture the manifest names, checksums of the shipped files, the library's ELF headers, then the
    CPU features the manifest lists."""
    bundle_dir = Path(bundle_dir)
    preset = manifest["target"]["preset"]
    arch = manifest["target"].get("arch", "x86_64")  # bundles from before ARM presets were all x86-64
    if arch != host_arch():
        raise BundleError(f"bundle {bundle_dir} was compiled for {arch} (target {preset!r}); this machine is "
                          f"{host_arch()}: copy it to an {arch} machine, or compile it for a preset of this one "
                          "(`int8mt targets`)")
    for name, expected in manifest["files"].items():
        path = bundle_dir / name
        if Path(name).name != name:
            raise BundleError(f"{bundle_dir / MANIFEST_FILE} lists {name!r}, which is not a file of the bundle; "
                              "rebuild the bundle")
        if not path.is_file():
            raise BundleError(f"bundle {bundle_dir} is incomplete: {name} is missing; rebuild it with "
                              "`int8mt compile`")
        if sha256(path) != expected:
            raise BundleError(f"{path} does not match the checksum in the manifest (corrupt or replaced); "
                              "rebuild the bundle")
    if LIBRARY_FILE not in manifest["files"]:
        raise BundleError(f"{bundle_dir / MANIFEST_FILE} has no checksum of {LIBRARY_FILE}; rebuild the bundle")
    check_elf(bundle_dir / LIBRARY_FILE)
    missing = [f for f in manifest["target"]["required_features"] if f not in host_features()]
    if missing:
        raise BundleError(f"bundle was built for target {preset!r}, which needs CPU features this CPU lacks "
                          f"({', '.join(missing)}); compile it for this machine (`int8mt targets` lists the "
                          "presets it runs)")
    if set(AMX_FEATURES) <= set(manifest["target"]["required_features"]):
        refusal = amx_permission()
        if refusal is not None:
            raise BundleError(f"bundle was built for target {preset!r}, whose kernels use AMX tiles, but {refusal}; "
                              "compile it for x86-vnni (same outputs, without AMX)")


def _parts(out: Any) -> tuple[Any, ...]:
    """A cache entry point's result as a tuple: the keys/values alone, or with their scales."""
    return tuple(out) if isinstance(out, Sequence) else (out,)


def _with_weights(entry_point: Callable[..., Any], weights: tuple[Any, ...]) -> Callable[..., Any]:
    """``entry_point`` called with ``weights`` after its own arguments."""
    if not weights:
        return entry_point
    return lambda *args: entry_point(*args, *weights)


class PooledSizes:
    """The call sizes (rows, source length) whose buffers TVM's memory pools may hold, and when to release the pools.

    TVM's pooled allocator (one per device and process, shared by every bundle and replica) keeps each freed
    buffer for reuse at exactly its size. An entry point's buffers take their size from its rows and source
    length only: positions are planned at their maximum (:class:`int8mt.compiler.frontend.ExportConfig`), rows
    and source length at each call's. Calls of sizes not seen before leave new buffers in the pools, which would
    grow without bound, so the pools are released before a new size once the sizes seen since the last release
    number ``sizes`` and their logits and cross-attention keys and values take ``RELEASE_POOLS_MIN_BYTES``, or
    take ``budget``. Releasing at every batch made every later call, of every replica, allocate again (two
    replicas at batch 1: 450 against 580 sentences/s). Releasing frees only buffers no call is using."""

    def __init__(self, budget: int = POOL_BUDGET_BYTES, sizes: int | None = RELEASE_POOLS_SIZES) -> None:
        self.budget, self.sizes = budget, sizes
        self._lock = threading.Lock()
        self._sizes: set[tuple] = set()
        self._bytes = 0
        self.releases = 0  # how often the pools were released (a size admitted since is still admitted)

    def admit(self, size: tuple, nbytes: int, release: Callable[[], None]) -> None:
        """A call of ``size`` (a hashable key of everything its buffers' sizes depend on) whose logits and
        cross-attention keys and values take ``nbytes`` is about to run."""
        with self._lock:
            if size in self._sizes:
                return
            if self._bytes >= self.budget or (self.sizes is not None and len(self._sizes) >= self.sizes
                                              and self._bytes >= RELEASE_POOLS_MIN_BYTES):
                self._release(release)
            self._sizes.add(size)
            self._bytes += nbytes

    def release(self, release: Callable[[], None]) -> None:
        """Release the pools now."""
        with self._lock:
            self._release(release)

    def _release(self, release: Callable[[], None]) -> None:
        release()
        self._sizes.clear()
        self._bytes = 0
        self.releases += 1


_POOLED = {"cpu": PooledSizes(), "gpu": PooledSizes(GPU_POOL_BUDGET_BYTES, GPU_RELEASE_POOLS_SIZES)}  # one per device


class BeamChoice(NamedTuple):
    """:meth:`Bundle.select_beams`' choice for ``n`` sentences of ``k`` hypotheses, each array ``[n, k]``: slot
    ``s`` of sentence ``i`` continues row ``origin[i, s]`` with ``tokens[i, s]`` at ``new_scores[i, s]`` (free
    slots: the pad token, their own row, -inf); the hypotheses of rows ``ended_rows[i, :]`` (-1: none) ended at
    ``ended_scores``, best first. The fields in order are the planes of ``select_beams``' float64 result
    (:mod:`int8mt.schedules.beam_select`); ``INDEX_FIELDS`` are int64 here."""
    tokens: np.ndarray
    origin: np.ndarray
    new_scores: np.ndarray
    ended_rows: np.ndarray
    ended_scores: np.ndarray


INDEX_FIELDS = frozenset({"tokens", "origin", "ended_rows"})  # BeamChoice's token ids and rows


def _beam_state(scores: np.ndarray, finished: np.ndarray) -> np.ndarray:
    """``select_beams``' state input: the hypotheses' ``scores`` [n, k] and each sentence's ``finished``
    hypotheses [n], as one float64 [n, k + 1] array."""
    state = aligned_empty((len(scores), scores.shape[1] + 1), "float64")
    state[:, :-1], state[:, -1] = scores, finished
    return state


class Bundle:
    """A loaded bundle: the model's entry points on the CPU, or on the GPU for CUDA bundles (then the key/value
    caches stay in GPU memory; token ids go up, logits or beam search's choices come back)."""

    def __init__(self, bundle_dir: Path | str) -> None:
        self.path = Path(bundle_dir)
        self.manifest = read_manifest(self.path)
        check_bundle(self.path, self.manifest)
        self._ffi = import_tvm_ffi()
        if is_cuda(self.manifest):  # TVM's Python package finds and checks the GPU and takes our kernels
            from .cuda import KERNELS_FILE, cuda_device, register_kernels

            self._tvm = import_tvm_runtime()
            self.device = cuda_device(self._tvm, self.manifest)
            register_kernels(self.manifest["cuda"]["source_sha256"], (self.path / KERNELS_FILE).read_bytes())
        else:
            self._tvm, self.device = None, self._ffi.device("cpu", 0)
        self._on_gpu = self.device.dlpack_device_type() != CPU_DEVICE_TYPE  # (an FFI call: asked once)
        try:
            self._library = self._ffi.load_module(self.path / LIBRARY_FILE)
        except Exception as err:  # noqa: BLE001  (TVM raises many kinds; all mean the .so is unusable)
            raise BundleError(f"cannot load {self.path / LIBRARY_FILE}: {str(err).splitlines()[0]}") from None
        self._release_pools = self._ffi.get_global_func(RELEASE_POOLS)
        self._create_view, self._copy, self._alloc = tensor_functions(self._ffi)
        self._item = self._ffi.get_global_func("ffi.ArrayGetItem")  # (one call: an Array's ``[i]`` makes three)
        self._item.release_gil = False  # (each call: a chance for another replica's thread to take the GIL)
        weights, self._weights = self._map_weights()
        self._scalars: dict[int, Any] = {}  # value -> an int64 tensor [1] holding it (shared by replicas)
        self._pooled = _POOLED["gpu" if self._on_gpu else "cpu"]
        self._admitted: tuple = ()  # the last call size admitted, and the pools' releases then
        self._open_vm()
        self._check_weights(weights)
        drop_unmodified_pages(self.path / LIBRARY_FILE)
        cfg = self.manifest["model"]
        self.layers, self.heads = cfg["decoder_layers"], cfg["heads"]
        self.head_dim = cfg["d_model"] // cfg["heads"]
        self.vocab_size = cfg.get("target_vocab_size") or cfg["vocab_size"]  # the logits' width
        self.source_vocab_size = cfg["vocab_size"]  # the source embeddings' rows: source ids are below it
        self.ffn_dim = cfg["ffn_dim"]
        self.max_positions = cfg["max_positions"]
        self.pad_id, self.eos_id, self.start_id = cfg["pad_id"], cfg["eos_id"], cfg["decoder_start_id"]
        self.cache_dtype = self.manifest.get("cache_dtype", "float32")  # int8 for quantized attention
        self.cache_scales = self.manifest.get("cache_scales", False)  # int8 with a scale per position (run-time)
        self._cross_token_bytes = self.layers * 2 * self.heads * (
            self.head_dim * self._ffi.dtype(self.cache_dtype).itemsize + SCALE_BYTES * self.cache_scales)
        self.max_rows = max_rows(self.manifest)

    def _open_vm(self) -> None:
        """A virtual machine of the library with pooled allocators on the device (and the CPU, for shapes)."""
        devices = [self.device] + ([self._ffi.device("cpu", 0)] if self._on_gpu else [])
        try:
            self._vm = self._library["vm_load_executable"]()
            self._vm["vm_initialization"](*(v for d in devices
                                            for v in (d.dlpack_device_type(), d.index, POOLED_ALLOCATOR)))
        except Exception as err:  # noqa: BLE001  (as for loading: any error means the library is not a bundle's)
            raise BundleError(f"{self.path / LIBRARY_FILE} is not a bundle's library "
                              f"({str(err).splitlines()[0]})") from None
        try:
            self._encode, self._step, self._reorder, self._top, self._select = (
                _with_weights(self._vm[name], self._weights[name]) for name in ENTRY_POINTS)
            self._greedy = _with_weights(self._vm[GREEDY_ENTRY_POINT], self._weights[GREEDY_ENTRY_POINT]) \
                if GREEDY_ENTRY_POINT in self._weights and not self._on_gpu else None
        except AttributeError as err:
            raise BundleError(f"{self.path / LIBRARY_FILE} does not match its manifest ({err})") from None
        self._staging: tuple[np.ndarray, Any] | None = None  # on a GPU: the inputs' host and device buffers

    def _map_weights(self) -> tuple[list[Any], dict[str, tuple[Any, ...]]]:
        """All the weights, and each entry point's (its trailing parameters): on the CPU views of ``weights.bin``
        mapped copy-on-write (:class:`int8mt.runtime.tensors.MappedFile`: pages read from the file as the kernels
        touch them, shared with every process that maps it), on a GPU copies in its memory."""
        record, path = self.manifest["weights"], self.path / WEIGHTS_FILE
        size = path.stat().st_size
        mapped = MappedFile(path) if size else None
        tensors = []
        for entry in record["tensors"]:
            try:
                dtype = self._ffi.dtype(entry["dtype"])
            except ValueError:
                raise BundleError(f"{self.path / MANIFEST_FILE} gives a weight the dtype {entry['dtype']!r}, which "
                                  "TVM does not know; rebuild the bundle") from None
            shape, offset = tuple(entry["shape"]), entry["offset"]
            end = offset + dtype.itemsize * math.prod(shape)
            if offset % TENSOR_ALIGNMENT or min(shape, default=0) < 0 or not 0 <= offset <= end <= size:
                raise BundleError(f"{self.path / MANIFEST_FILE} places a weight at bytes {offset}-{end} of {path} "
                                  f"({size} bytes, {TENSOR_ALIGNMENT}-byte aligned): rebuild the bundle")
            tensors.append(self._weight(mapped, shape, dtype, offset, end - offset))
        uses = {name: record["entry_points"].get(name, []) for name in ENTRY_POINTS}
        if GREEDY_ENTRY_POINT in self.manifest["entry_points"]:  # (the decoder step's weights, passed through)
            uses[GREEDY_ENTRY_POINT] = record["entry_points"].get(GREEDY_ENTRY_POINT, [])
            if uses[GREEDY_ENTRY_POINT] != uses["decode_step"]:
                raise BundleError(f"{self.path / MANIFEST_FILE} gives {GREEDY_ENTRY_POINT} other weights than "
                                  "decode_step; rebuild the bundle")
        if not all(isinstance(i, int) and 0 <= i < len(tensors) for indices in uses.values() for i in indices):
            raise BundleError(f"{self.path / MANIFEST_FILE} names weights it does not list; rebuild the bundle")
        return tensors, {name: tuple(tensors[i] for i in indices) for name, indices in uses.items()}

    def _weight(self, mapped: MappedFile | None, shape: tuple[int, ...], dtype: Any, offset: int, nbytes: int) -> Any:
        """The weight at ``offset`` of the weights file: on the CPU its mapped bytes, on a GPU a copy in its
        memory."""
        if nbytes == 0:
            return self._alloc(self._ffi.Shape(shape), dtype, self.device, "global")
        mapped_weight = mapped.tensor(self._ffi, shape, dtype, offset)
        if not self._on_gpu:
            return mapped_weight
        weight = self._alloc(self._ffi.Shape(shape), dtype, self.device, "global")
        self._copy(mapped_weight, weight)
        return weight

    def _check_weights(self, weights: list[Any]) -> None:
        """The library's check of the weights' dtypes and shapes (its entry points leave it out), once."""
        if not weights:
            return
        try:
            self._vm[CHECK_WEIGHTS](*weights)
        except Exception as err:  # noqa: BLE001  (TVM's check raises its own error kinds)
            raise BundleError(f"the weights of {self.path / MANIFEST_FILE} do not match {self.path / LIBRARY_FILE} "
                              f"({str(err).splitlines()[0]}); rebuild the bundle") from None

    def replica(self) -> "Bundle":
        """Another handle on the same loaded library and weights with a virtual machine of its own, so that two
        threads can run the model at once (one virtual machine runs one call at a time). Not for a GPU bundle with
        CUDA graphs: while one virtual machine captures a graph, CUDA fails the others' allocations and launches."""
        if self._on_gpu and self.manifest.get("cuda_graphs"):
            raise BundleError(f"{self.path} replays CUDA graphs, which one model per process captures safely: "
                              "translate with one worker (several processes may share the GPU), or compile the "
                              "bundle without --cuda-graphs")
        other = copy.copy(self)
        other._open_vm()
        return other

    def tokenizer(self) -> Tokenizer | MarianTokenizer:
        """The bundle's tokenizer (its files were checked against the manifest's checksums)."""
        return load_tokenizer(self.path, tokenizer_kind(self.manifest))

    def tensor(self, array: np.ndarray) -> Any:
        """``array`` as an input of the entry points: on the CPU the same memory (a DLPack view, 64-byte aligned
        as TVM's kernels assume; a copy only where NumPy's buffer is not), on a GPU (or empty) a copy in TVM's
        memory."""
        if self._on_gpu:
            return self._tvm.runtime.tensor(array, self.device)
        if array.size == 0:
            return self._alloc(self._ffi.Shape(array.shape), self._ffi.dtype(str(array.dtype)), self.device, "global")
        if array.flags.writeable:  # (DLPack exports no read-only array)
            tensor = self._ffi.from_dlpack(array)  # (checked here: in NumPy it cost a microsecond per input)
            if tensor.data_ptr() % TENSOR_ALIGNMENT == 0 and tensor.is_contiguous():
                return tensor
        return self._ffi.from_dlpack(_aligned(array), require_alignment=TENSOR_ALIGNMENT)

    def host(self, tensor: Any) -> np.ndarray:
        """An output of the entry points as NumPy: on the CPU a view of its memory (which it keeps alive),
        from a GPU a copy."""
        import numpy as np  # (here: :data:`UNUSED_BY_CPU_RUNTIME`)

        if self._on_gpu:
            return tensor.numpy()
        return np.from_dlpack(tensor)

    def encode(self, src: np.ndarray) -> tuple[Any, ...]:
        """src int64 [B, S] -> the cross-attention cache: keys/values (and their scales), device tensors."""
        return self._encoded(self.tensor(src))

    def _encoded(self, src: Any) -> tuple[Any, ...]:
        """:meth:`encode` of ``src``, a tensor."""
        rows, src_len = src.shape
        self._admit(rows, src_len)
        cross_kv = _parts(self._encode(src))
        if not self._on_gpu and rows * src_len * self.ffn_dim * ACTIVATION_BYTES >= RELEASE_AFTER_ENCODER_BYTES:
            self._pooled.release(self._release_pools)  # the encoder's buffers' pages, out of the decoder's peak
        return cross_kv

    def empty_cache(self, batch: int, positions: int) -> SelfAttentionCache:
        """The self-attention cache of ``batch`` hypotheses, with room for ``positions`` steps."""
        return SelfAttentionCache(self._ffi, self.device, self.layers, self.heads, self.head_dim, self.cache_dtype,
                                  self.cache_scales, batch, min(positions, self.max_positions))

    @property
    def on_gpu(self) -> bool:
        """Whether the entry points run on a GPU (their results are then copied to the host)."""
        return self._on_gpu

    @property
    def decodes_greedily(self) -> bool:
        """Whether the library has the greedy loop (:meth:`greedy_decode`; CPU bundles whose manifest lists it)."""
        return self._greedy is not None

    def greedy_decode(self, src: Sequence[int], max_length: int, min_length: int = 0) -> list[int]:
        """One sentence's greedy search (``src``: its token ids) in one call of the library
        (:class:`int8mt.compiler.passes.GreedyLoop`): its tokens without the end of sentence, at most
        ``max_length``, none ending it before ``min_length``; the same as the host's steps would give. Without
        NumPy (:mod:`int8mt.runtime.tensors`)."""
        src_t = self._int64((1, len(src)), src)
        cache = CacheRows(self._ffi, self.device, self.layers, self.heads, self.head_dim, self.cache_dtype,
                          self.cache_scales, 1 + min(max_length, self.max_positions))
        ids = self._alloc(self._ffi.Shape((max_length,)), self._ffi.dtype("int64"), self.device, "global")
        cross_kv = self._encoded(src_t)  # (which admits the loop's call size too: one row of this source length)
        count = self._greedy(*cache.inputs, *cross_kv, src_t, ids, self._int64((2,), (max_length, min_length)))
        tokens = read_int64(ids, read_int64(count, 1)[0])
        return tokens[:-1] if tokens and tokens[-1] == self.eos_id else tokens

    def _int64(self, shape: tuple[int, ...], values: Sequence[int]) -> Any:
        """A new int64 tensor of ``shape`` holding ``values`` (in order), on the device."""
        host = write_int64(self._alloc(self._ffi.Shape(shape), self._ffi.dtype("int64"), self._ffi.device("cpu", 0),
                                       "global"), values)
        if not self._on_gpu:
            return host
        tensor = self._alloc(self._ffi.Shape(shape), self._ffi.dtype("int64"), self.device, "global")
        self._copy(host, tensor)
        return tensor

    def decode_step(self, tokens: np.ndarray, step: int, cache: SelfAttentionCache, cross_kv: tuple[Any, ...],
                    src: Any) -> np.ndarray:
        """One step: appends the step's keys and values to ``cache``; returns logits as numpy [B, V]."""
        logits, _ = self._run_step(tokens, step, cache, cross_kv, src)
        return self.host(logits)

    def beam_step(self, tokens: np.ndarray, step: int, cache: SelfAttentionCache, cross_kv: tuple[Any, ...],
                  src: Any, scores: np.ndarray, finished: np.ndarray, eos_banned: bool) -> BeamChoice:
        """One step of beam search chosen on the device: appends the step's keys and values to ``cache``, takes
        each row's ``candidates`` largest logits and its log-sum-exp (``top_candidates``) and chooses each
        sentence's next hypotheses from them (:meth:`select_beams`' choice). The step's tokens, the history and
        the beam state go to a GPU in one copy, before the step's kernels (a copy from pageable memory waits for
        the GPU's work queued before it); only the choice comes back."""
        logits, (state,) = self._run_step(tokens, step, cache, cross_kv, src, _beam_state(scores, finished))
        return self._choose(_parts(self._top(logits)), state, eos_banned)

    def select_beams(self, candidates: tuple[Any, ...], scores: np.ndarray, finished: np.ndarray,
                     eos_banned: bool) -> BeamChoice:
        """Each sentence's next hypotheses (:mod:`int8mt.schedules.beam_select`, on the device) from its ``k`` rows'
        ``candidates`` (values, ids and log-sum-exp, device tensors as ``top_candidates`` returns them, rows sorted
        by sentence), the hypotheses' ``scores`` [n, k], each sentence's ``finished`` hypotheses [n] and whether an
        end of sentence is passed over. One array goes to the device and one comes back."""
        return self._choose(candidates, *self._staged(_beam_state(scores, finished)), eos_banned)

    def _choose(self, candidates: tuple[Any, ...], state: Any, eos_banned: bool) -> BeamChoice:
        """``select_beams`` on the device's ``candidates`` and beam ``state``, its result brought to the host."""
        chosen = self.host(self._select(*candidates, state, self._scalar(int(eos_banned))))
        return BeamChoice(*(plane.astype("int64") if name in INDEX_FIELDS else plane
                            for name, plane in zip(BeamChoice._fields, chosen)))

    def _run_step(self, tokens: np.ndarray, step: int, cache: SelfAttentionCache, cross_kv: tuple[Any, ...],
                  src: Any, *inputs: np.ndarray) -> tuple[Any, list[Any]]:
        """The compiled decoder step: writes its rows into ``cache`` and returns the logits (on the device) and
        ``inputs`` of the calls after it, staged with the step's own."""
        self._admit(len(tokens), int(src.shape[1]))
        tokens_t, history_t, *staged = self._staged(tokens, cache.history, *inputs)
        rows_used = cache.reserve_step()
        out = self._step(tokens_t, self._scalar(step), *cache.inputs, history_t, *cross_kv, src, rows_used)
        cache.record_step()
        return self._item(out, 0), staged

    def _staged(self, *arrays: np.ndarray) -> list[Any]:
        """``arrays`` as inputs of the entry points: on the CPU ``tensor(array)`` each; on a GPU views of one
        device buffer (kept, grown as needed) that they are packed into on the host and copied to at once: a copy
        costs about the same at these sizes whatever its bytes (25 µs on an H200; a fresh device allocation per
        input and step took 66)."""
        if not self._on_gpu:
            return [self.tensor(array) for array in arrays]
        import numpy as np  # (here: :data:`UNUSED_BY_CPU_RUNTIME`)

        offsets = [0]
        for array in arrays:  # each input's place in the buffer, TENSOR_ALIGNMENT-aligned
            offsets.append(offsets[-1] + -(-array.nbytes // TENSOR_ALIGNMENT) * TENSOR_ALIGNMENT)
        size = offsets[-1]
        if self._staging is None or self._staging[0].size < size:
            room = max(size, 2 * (self._staging[0].size if self._staging is not None else 0), TENSOR_ALIGNMENT)
            self._staging = (aligned_empty((room,), "uint8"),
                             self._alloc(self._ffi.Shape((room,)), self._ffi.dtype("uint8"), self.device, "global"))
        host, device = self._staging
        for array, offset in zip(arrays, offsets):
            host[offset:offset + array.nbytes] = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        if size:
            self._copy(self._ffi.from_dlpack(host[:size]),
                       self._create_view(device, self._ffi.Shape((size,)), self._ffi.dtype("uint8"), 0))
        return [view_at(self._ffi, device, array.shape, self._ffi.dtype(str(array.dtype)), offset)
                for array, offset in zip(arrays, offsets)]

    def _scalar(self, value: int) -> Any:
        """An int64 tensor [1] holding ``value`` (the decoder step's position, ``select_beams``' flag), made once per
        value and bundle (a conversion and, on a GPU, an allocation and a copy at every step otherwise)."""
        tensor = self._scalars.get(value)
        if tensor is None:
            tensor = self._scalars[value] = self._int64((1,), (value,))
        return tensor

    def _admit(self, rows: int, src_len: int) -> None:
        """A call of ``rows`` rows of ``src_len`` source tokens is about to run: calls of a size not seen before
        leave new buffers in TVM's memory pools (see :class:`PooledSizes`), the largest its logits and
        cross-attention keys and values."""
        if self._admitted == (rows, src_len, self._pooled.releases):  # a decoder's steps: admitted at the first
            return
        nbytes = rows * (self.vocab_size * LOGIT_BYTES + src_len * self._cross_token_bytes)
        self._pooled.admit((self.path, rows, src_len), nbytes, self._release_pools)
        self._admitted = (rows, src_len, self._pooled.releases)

    @property
    def candidates(self) -> int:
        """How many candidates per row ``top_candidates`` returns (:meth:`beam_step`'s beams take up to half)."""
        return self.manifest["top_candidates"]

    def reorder_cross(self, cross_kv: tuple[Any, ...], rows: np.ndarray) -> tuple[Any, ...]:
        """The cross-attention keys/values with their batch rows taken in the order ``rows`` (on the device):
        beam search repeats each sentence's for its hypotheses, both searches drop finished sentences'."""
        return _parts(self._reorder(*cross_kv, self.tensor(rows.astype("int64"))))
