"""MetaSchedule builder and runner that work in this process, measuring here or on a board through an RPC
tracker.

MetaSchedule's ``LocalBuilder`` builds in worker processes, and each worker imports
``tvm.s_tir.tensor_intrin`` (~40 s here) inside the 30 s build timeout, so every candidate failed. Our
candidates need none of those intrinsics, build in ~0.3 s and this machine has two cores, so building in
the tuning process loses nothing. Measured here, built modules stay in memory (no export to ``.so`` and
reload); measured remotely, each is linked into a ``.so`` (with the cross compiler where the board is of
another architecture), uploaded and loaded there. The runner checks every candidate against NumPy (a sample
of rows, every column) before timing it, so a wrong kernel is a failed trial, never a fast record.
"""
from __future__ import annotations

import itertools
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tvm
import tvm.rpc
from tvm.ir.utils import derived_object
from tvm.s_tir.meta_schedule.builder import BuilderInput, BuilderResult, PyBuilder
from tvm.s_tir.meta_schedule.runner import PyRunner, PyRunnerFuture, RunnerInput, RunnerResult

from .int8_dense import ROW_PAD, pack_weight
from .intrin import Int8Dot

_built: dict[str, tvm.runtime.Module] = {}  # artifact key -> module, from build to run (measured here)
_keys = itertools.count()
FLOAT_CHECK_RANGE = (-4, 4)  # float32 kernels are checked on integers in [-4, 4): products <= 16, exact sums


@derived_object
class InProcessBuilder(PyBuilder):
    """Build each candidate with ``tvm.compile`` in this process; errors become failed results. With
    ``export_dir`` each is linked into a ``.so`` there (by ``fcompile``, e.g. a cross compiler) for a remote
    runner; else the module stays in memory."""

    def __init__(self, export_dir: Path | None = None, fcompile: Callable | None = None) -> None:
        super().__init__()
        self.export_dir, self.fcompile = export_dir, fcompile

    def build(self, build_inputs: list[BuilderInput]) -> list[BuilderResult]:
        results = []
        for inp in build_inputs:
            try:
                executable, index = tvm.compile(inp.mod, target=inp.target), next(_keys)
                if self.export_dir is None:
                    key = f"in-process:{index}"
                    _built[key] = executable.mod
                else:
                    key = str(self.export_dir / f"candidate{index}.so")
                    executable.export_library(key, fcompile=self.fcompile)
            except Exception as err:  # noqa: BLE001 - a candidate that does not build is a failed trial
                results.append(BuilderResult(None, f"{type(err).__name__}: {err}"))
                continue
            results.append(BuilderResult(key, None))
        return results


@derived_object
class _Done(PyRunnerFuture):
    def __init__(self, result: RunnerResult) -> None:
        super().__init__()
        self._result = result

    def done(self) -> bool:
        return True

    def result(self) -> RunnerResult:
        return self._result


@derived_object
class CheckedRunner(PyRunner):
    """Check each dense candidate (int8, or float32 for FP32 layers) against NumPy, then time it with
    ``time_evaluator`` on all threads of this machine, or of the server of an RPC ``session`` (:meth:`.rpc.RPCTracker.connect`), to which modules are
    sent linked by ``fcompile`` (the board's cross compiler; None: this machine's compiler)."""

    def __init__(self, dot: Int8Dot, number: int = 3, repeat: int = 5, min_repeat_ms: int = 30,
                 session: tvm.rpc.RPCSession | None = None, fcompile: Callable | None = None) -> None:
        super().__init__()
        self.dot, self.number, self.repeat, self.min_repeat_ms = dot, number, repeat, min_repeat_ms
        self.session, self.fcompile = session, fcompile
        self.device = self.session.cpu() if self.session is not None else tvm.cpu()
        self._cases: dict[tuple, tuple[list[tvm.runtime.Tensor], np.ndarray, np.ndarray]] = {}

    def run(self, runner_inputs: list[RunnerInput]) -> list[_Done]:
        return [_Done(self._run_one(inp)) for inp in runner_inputs]

    def load(self, executable: tvm.runtime.Executable) -> tvm.runtime.Module:
        """``executable`` ready to run on the runner's device: here its module; on the remote server, linked,
        uploaded and loaded there."""
        if self.session is None:
            return executable.mod
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / f"kernel{next(_keys)}.so"
            executable.export_library(str(path), fcompile=self.fcompile)
            return self._remote_module(str(path))

    def _remote_module(self, path: str) -> tvm.runtime.Module:
        self.session.upload(path)
        return self.session.load_module(Path(path).name)

    def timer(self, module: tvm.runtime.Module) -> Callable:
        return module.time_evaluator("main", self.device, number=self.number, repeat=self.repeat,
                                     min_repeat_ms=self.min_repeat_ms)

    def _run_one(self, inp: RunnerInput) -> RunnerResult:
        try:
            if self.session is None:
                module = _built.pop(inp.artifact_path, None)
                if module is None:
                    return RunnerResult(None, f"no built module for {inp.artifact_path}")
            else:
                module = self._remote_module(inp.artifact_path)
                Path(inp.artifact_path).unlink(missing_ok=True)
            args = self.checked_args(module, tuple(tuple(int(d) for d in info.shape) for info in inp.args_info))
            if args is None:
                return RunnerResult(None, "wrong result: the kernel disagrees with NumPy")
            timer = self.timer(module)
            # the best repeat: interference from other work on the machine only ever slows a run down, and
            # MetaSchedule ranks candidates by the mean of what it gets
            return RunnerResult([min(float(t) for t in timer(*args).results)], None)
        except Exception as err:  # noqa: BLE001 - a candidate that crashes is a failed trial
            return RunnerResult(None, f"{type(err).__name__}: {err}")

    def checked_args(self, module: tvm.runtime.Module, shapes: tuple[tuple[int, ...], ...]
                     ) -> list[tvm.runtime.Tensor] | None:
        """Inputs of ``shapes`` for the dense kernel ``module`` once its result on them equals NumPy's (exactly),
        else None."""
        args, rows, expected = self._case(shapes)
        module["main"](*args)
        return args if np.array_equal(args[-1].numpy()[rows], expected) else None

    def _case(self, shapes: tuple[tuple[int, ...], ...]) -> tuple[list[tvm.runtime.Tensor], np.ndarray, np.ndarray]:
        """Random inputs for the kernel's argument shapes (made once per shape), rows to check (the first and
        last ROW_PAD and a random sample) and their exact result: int8 operands, or for a float32 kernel small
        integers (``FLOAT_CHECK_RANGE``), whose float32 sums are exact in any order."""
        if shapes not in self._cases:
            (m, k), _, _, (_, n) = shapes
            rng = np.random.default_rng(0)
            low, high = (-128, 128) if self.dot.tensorized else FLOAT_CHECK_RANGE
            a, w = (rng.integers(low, high, shape).astype(self.dot.weight) for shape in ((m, k), (n, k)))
            packed, correction = pack_weight(w, self.dot)
            rows = np.unique(np.concatenate([np.arange(min(m, ROW_PAD)), np.arange(max(0, m - ROW_PAD), m),
                                             rng.integers(0, m, 8)]))
            # exact: |sum| < 2^53 (int8), <= 2^24 (float32 of FLOAT_CHECK_RANGE: K up to 2^20)
            expected = (a[rows].astype(np.float64) @ w.T.astype(np.float64)).astype(self.dot.accumulator)
            args = [tvm.runtime.tensor(x, device=self.device)
                    for x in (a, packed, correction, np.zeros((m, n), self.dot.accumulator))]
            self._cases[shapes] = (args, rows, expected)
        args, rows, expected = self._cases[shapes]
        args[-1].copyfrom(np.zeros(args[-1].shape, self.dot.accumulator))
        return args, rows, expected
