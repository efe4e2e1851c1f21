"""GreedyLoop: ``greedy_decode`` runs a decoder step after another in the virtual machine and gives the tokens the
host's greedy search gives (a stand-in step whose best token depends on its position, its history and the rows it
was told are used, so a wrong input shows as a wrong token); the new entry point takes the step's weights."""
import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from int8mt.compiler.passes import GreedyLoop, LiftWeights
from int8mt.compiler.passes.lift_weights import WEIGHT_PARAMS_ATTR
from int8mt.runtime.bundle import GREEDY_ENTRY_POINT

from ...conftest import HOST_PRESET

VOCAB, START, EOS = 50, 1, 2
WEIGHT = np.random.default_rng(0).permutation(VOCAB).astype("float32")  # distinct: the runner-up is unique


@I.ir_module
class StandInStep:
    """``decode_step``'s signature (one cache part, one row) with logits ``weight + 100`` at ``(7 * step + sum(history) +
    rows_used + token) % VOCAB``: the true step's inputs give each position one known best token."""

    @T.prim_func(private=True)
    def logits_of(tokens: T.Buffer((T.int64(1), T.int64(1)), "int64"), step: T.Buffer((T.int64(1),), "int64"),
                  history_handle: T.handle, weight: T.Buffer((T.int64(VOCAB),), "float32"), used: T.int64,
                  logits: T.Buffer((T.int64(1), T.int64(VOCAB)), "float32")):
        width = T.int64()
        history = T.match_buffer(history_handle, (T.int64(1), width), "int64")
        total = T.alloc_buffer((T.int64(1),), "int64", scope="local")
        total[0] = step[0] * 7 + used + tokens[0, 0]
        for j in range(width):
            total[0] = total[0] + history[0, j]
        for j in range(T.int64(VOCAB)):
            logits[0, j] = weight[j] + T.Select(j == total[0] % VOCAB, T.float32(100), T.float32(0))

    @R.function
    def decode_step(tokens: R.Tensor((1, 1), "int64"), step: R.Tensor((1,), "int64"),
                    cache_0: R.Tensor((1, 2, "rows", 1, 4), "float32"), history: R.Tensor((1, "width"), "int64"),
                    cross_0: R.Tensor((1, 2, 1, 1, "src_len", 4), "float32"), src: R.Tensor((1, "src_len"), "int64"),
                    rows_used: R.Shape(["used"]), weight0: R.Tensor((VOCAB,), "float32")):
        R.func_attr({WEIGHT_PARAMS_ATTR: 1, "relax.force_pure": True})
        used = T.int64()
        cls = StandInStep
        logits = R.call_tir(cls.logits_of, (tokens, step, history, weight0, R.prim_value(used)),
                            R.Tensor((1, VOCAB), "float32"))
        return (logits, cache_0)


def _host_greedy(max_length: int, min_length: int) -> list[int]:
    """The host's greedy search over the stand-in step (``int8mt.runtime.search.greedy_search``'s rules)."""
    token, out = START, []
    for step in range(max_length):
        history = list(range(1, step + 1)) + [0]
        logits = WEIGHT.copy()
        logits[(7 * step + sum(history) + (step + 1) + token) % VOCAB] += 100
        if step < min_length:
            logits[EOS] = -np.inf
        token = int(logits.argmax())
        if token == EOS:
            break
        out.append(token)
    return out


@pytest.fixture(scope="module")
def greedy_vm() -> relax.VirtualMachine:
    weights = LiftWeights()
    weights.uses["decode_step"] = [0]
    mod = GreedyLoop(START, EOS, weights)(StandInStep)
    assert weights.uses[GREEDY_ENTRY_POINT] == [0]
    relax.analysis.well_formed(mod)  # (raises where the module is not well formed)
    return relax.VirtualMachine(relax.build(mod, tvm.target.Target(HOST_PRESET.target), exec_mode="compiled"),
                                tvm.cpu())


@pytest.mark.parametrize("max_length,min_length", [(40, 0), (40, 12), (5, 0), (1, 0), (40, 40), (3, 9)])
def test_the_loop_gives_the_tokens_of_the_host_greedy_search(greedy_vm, max_length, min_length):
    ids = tvm.runtime.tensor(np.full(max_length, -1, np.int64))
    inputs = (np.zeros((1, 2, 1 + max_length, 1, 4), np.float32), np.zeros((1, 2, 1, 1, 3, 4), np.float32),
              np.zeros((1, 3), np.int64))
    count = int(greedy_vm[GREEDY_ENTRY_POINT](*(tvm.runtime.tensor(a) for a in inputs), ids,
                                              tvm.runtime.tensor(np.array([max_length, min_length])),
                                              tvm.runtime.tensor(WEIGHT)).numpy()[0])
    expected = _host_greedy(max_length, min_length)
    ended = len(expected) < max_length  # stopped by the end of sentence, which it wrote last
    assert count == len(expected) + ended
    assert ids.numpy()[:count].tolist() == expected + [EOS] * ended
    assert (ids.numpy()[count:] == -1).all()


def test_the_entry_point_takes_the_caches_the_source_its_outputs_and_the_step_s_weights(greedy_vm):
    weights = LiftWeights()
    weights.uses["decode_step"] = [0]
    entry = GreedyLoop(START, EOS, weights)(StandInStep)[GREEDY_ENTRY_POINT]
    assert [p.name for p in entry.params] == ["cache_0", "cross_0", "src", "ids", "limits", "weight0"]
    assert [int(d) for d in entry.params[1].ty.shape if isinstance(d, tvm.tirx.IntImm)] == [1, 2, 1, 1, 4]  # batch 1
    assert int(entry.attrs[WEIGHT_PARAMS_ATTR]) == 1 and entry.attrs["global_symbol"] == GREEDY_ENTRY_POINT
    tvm.ir.assert_structural_equal(entry.ret_ty, relax.TensorType([1], "int64"))
