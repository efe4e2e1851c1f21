"""Load a compiled bundle with the TVM runtime only.

Before the ``.so`` is opened, the manifest is validated, the library's checksum compared and the CPU
checked for the features the target preset needs, so that a bundle built for another machine fails
with a message instead of SIGILL.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from int8mt.targets import get_preset, missing_features

LIBRARY_FILE, MANIFEST_FILE, TOKENIZER_FILE = "model.so", "manifest.json", "spm.model"
DEFAULT_MAX_ROWS = 1024  # the row bound of bundles whose manifest does not record one
REPORT_FILE = "report.json"  # quantization report (`int8mt inspect`), informational
BUNDLE_FORMAT = 1
ENTRY_POINTS = ("encode", "decode_step", "reorder_cache", "top_candidates")


class BundleError(ValueError):
    """A bundle that is missing, damaged, or built for another machine."""


def _import_tvm_runtime() -> Any:
    """Import TVM without letting its FFI layer pull in torch (it tries to, for DLPack interop).

    TVM's thread pool would start with one worker per *physical* core it detects (one here, on two
    vCPUs, which halves the speed); unless ``TVM_NUM_THREADS`` is set, use every CPU this process may run on.
    """
    os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))
    if "tvm" not in sys.modules and "torch" not in sys.modules:
        sys.modules["torch"] = None  # type: ignore[assignment]  # makes `import torch` raise ImportError
        try:
            import tvm.runtime  # noqa: F401
        finally:
            del sys.modules["torch"]
    import tvm.runtime

    return tvm


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(bundle_dir: Path) -> dict:
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise BundleError(f"bundle {bundle_dir} does not exist; build one with `int8mt compile`")
    for name in (MANIFEST_FILE, LIBRARY_FILE, TOKENIZER_FILE):
        if not (bundle_dir / name).is_file():
            raise BundleError(f"bundle {bundle_dir} is incomplete: {name} is missing; rebuild it with `int8mt compile`")
    try:
        manifest = json.loads((bundle_dir / MANIFEST_FILE).read_text())
        if manifest["format"] != BUNDLE_FORMAT:
            raise BundleError(f"bundle format {manifest['format']} is not supported (expected {BUNDLE_FORMAT}); "
                              "rebuild it with this version of int8mt")
        missing = [name for name in ENTRY_POINTS if name not in manifest["entry_points"]]
        if missing:
            raise BundleError(f"bundle {bundle_dir} lacks the entry points {missing} that this runtime needs; "
                              "rebuild it with `int8mt compile`")
        for key in ("target", "model", "files", "top_candidates"):
            manifest[key]  # noqa: B018  (presence check)
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise BundleError(f"{bundle_dir / MANIFEST_FILE} is corrupt ({err!r}); rebuild the bundle") from None
    return manifest


def check_bundle(bundle_dir: Path, manifest: dict) -> None:
    """Checksums of the shipped files, then the CPU features of the bundle's target."""
    for name, expected in manifest["files"].items():
        if sha256(Path(bundle_dir) / name) != expected:
            raise BundleError(f"{Path(bundle_dir) / name} does not match the checksum in the manifest "
                              "(corrupt or replaced); rebuild the bundle")
    preset_name = manifest["target"].get("preset", "?")
    try:
        preset = get_preset(preset_name)
    except ValueError:
        raise BundleError(f"bundle was built for unknown target {preset_name!r}") from None
    missing = missing_features(preset)
    if missing:
        raise BundleError(f"bundle was built for target {preset.name!r} ({preset.description}) but this CPU lacks "
                          f"{', '.join(missing)}; compile it for this machine, e.g. `int8mt compile --target x86-avx2`")


class Bundle:
    """A loaded bundle: the model's two entry points on the CPU."""

    def __init__(self, bundle_dir: Path | str) -> None:
        self.path = Path(bundle_dir)
        self.manifest = read_manifest(self.path)
        check_bundle(self.path, self.manifest)
        tvm = _import_tvm_runtime()
        self._tvm = tvm
        self.device = tvm.cpu()
        try:
            library = tvm.runtime.load_module(str(self.path / LIBRARY_FILE))
        except Exception as err:  # noqa: BLE001  (TVM raises many kinds; all mean the .so is unusable)
            raise BundleError(f"cannot load {self.path / LIBRARY_FILE}: {str(err).splitlines()[0]}") from None
        self._vm = tvm.runtime.vm.VirtualMachine(library, self.device)
        try:
            self._encode, self._step, self._reorder, self._top = (self._vm[name] for name in ENTRY_POINTS)
        except AttributeError as err:
            raise BundleError(f"{self.path / LIBRARY_FILE} does not match its manifest ({err})") from None
        cfg = self.manifest["model"]
        self.layers, self.heads = cfg["decoder_layers"], cfg["heads"]
        self.head_dim = cfg["d_model"] // cfg["heads"]
        self.max_positions = cfg["max_positions"]
        self.pad_id, self.eos_id, self.start_id = cfg["pad_id"], cfg["eos_id"], cfg["decoder_start_id"]
        self.cache_dtype = self.manifest.get("cache_dtype", "float32")  # int8 for static quantization
        self.max_rows = self.manifest.get("max_rows", DEFAULT_MAX_ROWS)  # rows (sentences x beams) per call

    @property
    def tokenizer_file(self) -> Path:
        return self.path / TOKENIZER_FILE

    def tensor(self, array: np.ndarray) -> Any:
        return self._tvm.runtime.tensor(array, self.device)

    def encode(self, src: np.ndarray) -> Any:
        """src int64 [B, S] -> cross-attention keys/values (a device tensor)."""
        return self._encode(self.tensor(src))

    def empty_cache(self, batch: int) -> Any:
        return self.tensor(np.zeros((self.layers, 2, batch, self.heads, 0, self.head_dim), self.cache_dtype))

    def decode_step(self, tokens: np.ndarray, step: int, cache: Any, cross_kv: Any, src: Any) -> tuple[np.ndarray, Any]:
        """One step: returns logits as numpy [B, V] and the grown cache (device tensor)."""
        logits, grown = self._run_step(tokens, step, cache, cross_kv, src)
        return logits.numpy(), grown

    def decode_step_candidates(self, tokens: np.ndarray, step: int, cache: Any, cross_kv: Any,
                               src: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, Any]:
        """One step that returns, instead of the logits, each row's ``candidates`` largest logits and their
        token ids (both [B, candidates], descending) and the row's log-sum-exp ([B]), computed on the
        device: log-probabilities are ``values - log_sum_exp``. Then the grown cache."""
        logits, grown = self._run_step(tokens, step, cache, cross_kv, src)
        values, ids, log_sum_exp = self._top(logits)
        return values.numpy(), ids.numpy(), log_sum_exp.numpy(), grown

    def _run_step(self, tokens: np.ndarray, step: int, cache: Any, cross_kv: Any, src: Any) -> tuple[Any, Any]:
        """The compiled decoder step: (logits, grown cache), both on the device."""
        out = self._step(self.tensor(tokens), self.tensor(np.array([step], np.int64)), cache, cross_kv, src)
        return out[0], out[1]

    @property
    def candidates(self) -> int:
        """How many candidates per row :meth:`decode_step_candidates` returns."""
        return self.manifest["top_candidates"]

    def reorder_cache(self, cache: Any, rows: np.ndarray) -> Any:
        """The cache (or the cross-attention keys/values, of the same layout) with its batch rows taken in the
        order ``rows``: beam search reorders hypotheses, greedy search drops finished sentences."""
        return self._reorder(cache, self.tensor(rows.astype(np.int64)))
