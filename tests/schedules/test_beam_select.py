"""Beam search's choice of each sentence's next hypotheses (``beam_select``): case by case, and against a plain
Python walk of each sentence's candidates in score order on random inputs (ties, -inf, finished sentences, a
banned end of sentence); the GPU kernel's CUDA C run on this CPU gives the CPU kernel's results."""
import re
import shutil

import numpy as np
import pytest
import tvm

from int8mt.runtime.bundle import BeamChoice
from int8mt.schedules.beam_select import GPU_THREADS, beam_select_kernel

from ..conftest import HOST_PRESET
from ..cuda_emulation import emulated_kernel, kernel_cuda_source

EOS, PAD = 2, 0
NEG = -np.inf
OUTPUTS = BeamChoice._fields  # the planes of the result


@pytest.fixture(scope="module")
def beam_select():
    kernel = beam_select_kernel().with_attr("global_symbol", "main")
    return tvm.compile(tvm.IRModule({"main": kernel}), target=tvm.target.Target(HOST_PRESET.target))["main"]


def _inputs(values, ids, log_sum_exp, scores, finished, banned=False):
    """The kernel's inputs: ``state`` is each sentence's scores, then its count of finished hypotheses."""
    state = np.concatenate([np.asarray(scores, np.float64), np.asarray(finished, np.float64)[:, None]], 1)
    return (np.asarray(values, np.float32), np.asarray(ids, np.int64), np.asarray(log_sum_exp, np.float32), state,
            np.array([int(banned)], np.int64))


def _outputs(inputs) -> list[np.ndarray]:
    n, k = inputs[3].shape[0], inputs[3].shape[1] - 1
    return [np.full((len(OUTPUTS), n, k), np.nan), np.zeros((n, k), np.int64)]  # the planes, the heads


def _run(kernel, inputs) -> dict[str, np.ndarray]:
    outputs = [tvm.runtime.tensor(out) for out in _outputs(inputs)]
    kernel(*(tvm.runtime.tensor(a) for a in inputs), EOS, PAD, *outputs)
    return dict(zip(OUTPUTS, outputs[0].numpy()))


def _reference_of(inputs) -> dict[str, np.ndarray]:
    values, ids, log_sum_exp, state, banned = inputs
    return _reference(values, ids, log_sum_exp, state[:, :-1], state[:, -1].astype(np.int64), bool(banned[0]))


def _reference(values, ids, log_sum_exp, scores, finished, banned) -> dict[str, np.ndarray]:
    """Each sentence's 2k best candidates by score (a stable sort of its rows' candidates in row order), walked
    one by one."""
    n, k = scores.shape
    out = {"tokens": np.full((n, k), PAD), "origin": np.arange(n * k).reshape(n, k),
           "new_scores": np.full((n, k), NEG), "ended_rows": np.full((n, k), -1), "ended_scores": np.full((n, k), NEG)}
    for i in range(n):
        rows = range(i * k, i * k + k)
        cands = [(scores[i, r - i * k] + (float(values[r, c]) - float(log_sum_exp[r])), r, int(ids[r, c]))
                 for r in rows for c in range(values.shape[1])]
        order = sorted(range(len(cands)), key=lambda j: -cands[j][0])[:2 * k]  # (stable)
        continued, ended = 0, int(finished[i])
        for j in order if ended < k else []:
            score, row, token = cands[j]
            if not score > NEG:
                break
            if token == EOS:
                if banned:
                    continue
                out["ended_rows"][i, ended - finished[i]], out["ended_scores"][i, ended - finished[i]] = row, score
                ended += 1
            else:
                out["tokens"][i, continued], out["origin"][i, continued] = token, row
                out["new_scores"][i, continued] = score
                continued += 1
            if continued == k or ended >= k:
                break
    return out


def test_each_sentence_takes_candidates_in_order_until_k_continue_or_k_have_finished(beam_select):
    """k = 2, one row per hypothesis with 4 candidates, log-sum-exp 0; the first hypothesis alone is alive."""
    values = [[-1, -2, -3, -4], [NEG] * 4,      # continues, ends, continues: k continue, the 4th is not taken
              [-1, -2, -3, -4], [NEG] * 4,      # one finished before: the end of sentence makes k finished
              [-1, NEG, NEG, NEG], [NEG] * 4,   # an impossible candidate stops the sentence
              [-1, -2, -3, -4], [NEG] * 4]      # k finished before this step: takes nothing
    ids = [[5, EOS, 7, 8], [9] * 4, [EOS, 5, 6, 7], [9] * 4, [5, 6, 7, 8], [9] * 4, [5, 6, 7, 8], [9] * 4]
    chosen = _run(beam_select, _inputs(values, ids, [0] * 8, [[0, NEG]] * 4, [0, 1, 0, 2]))
    assert chosen["tokens"].tolist() == [[5, 7], [PAD, PAD], [5, PAD], [PAD, PAD]]
    assert chosen["origin"].tolist() == [[0, 0], [2, 3], [4, 5], [6, 7]]
    assert chosen["new_scores"].tolist() == [[-1, -3], [NEG, NEG], [-1, NEG], [NEG, NEG]]
    assert chosen["ended_rows"].tolist() == [[0, -1], [2, -1], [-1, -1], [-1, -1]]
    assert chosen["ended_scores"].tolist() == [[-2, NEG], [-1, NEG], [NEG, NEG], [NEG, NEG]]


def test_a_banned_end_of_sentence_is_passed_over(beam_select):
    chosen = _run(beam_select, _inputs([[-1, -2, -3, -4], [NEG] * 4], [[5, EOS, 7, 8], [9] * 4], [0, 0],
                                       [[0, NEG]], [1], banned=True))
    assert chosen["tokens"].tolist() == [[5, 7]] and (chosen["ended_rows"] == -1).all()
    assert chosen["new_scores"].tolist() == [[-1, -3]]


def test_candidates_merge_by_score_with_the_hypothesis_score_and_log_sum_exp(beam_select):
    """Rows' scores and log-sum-exps move their candidates past each other; equal scores go in row order."""
    values = [[5, 1, 0, -1], [4, 3, 2, 0]]
    chosen = _run(beam_select, _inputs(values, [[10, 11, 12, 13], [20, 21, 22, 23]], [2, 1], [[-1, -2]], [0]))
    # row 0: 2, -2, -3, -4; row 1: 1, 0, -1, -3 (scores + values - log_sum_exp)
    assert chosen["tokens"].tolist() == [[10, 20]] and chosen["origin"].tolist() == [[0, 1]]
    tied = _run(beam_select, _inputs([[3, 3, 0, 0], [4, 0, 0, 0]], [[10, 11, 12, 13], [20, 21, 22, 23]], [0, 1],
                                     [[0, 0]], [0]))
    assert tied["tokens"].tolist() == [[10, 11]] and tied["new_scores"].tolist() == [[3, 3]]  # row 1's 3 after


def _random_inputs(rng, n: int, k: int, width: int):
    values = -np.sort(-rng.integers(-6, 6, (n * k, width)).astype(np.float32), axis=1)  # many ties
    values[rng.random(values.shape) < 0.05] = NEG
    values = -np.sort(-values, axis=1)
    ids = rng.integers(0, 6, (n * k, width))  # ends of sentence often
    scores = rng.integers(-5, 1, (n, k)).astype(np.float64)
    scores[rng.random((n, k)) < 0.2] = NEG
    return _inputs(values, ids, rng.integers(0, 3, n * k), scores, rng.integers(0, k + 1, n), rng.random() < 0.3)


@pytest.mark.parametrize("seed", range(4))
def test_random_choices_equal_a_walk_of_the_sorted_candidates(beam_select, seed):
    rng = np.random.default_rng(seed)
    for _ in range(50):
        k = int(rng.integers(1, 6))
        inputs = _random_inputs(rng, int(rng.integers(1, 6)), k, int(rng.integers(2 * k, 2 * k + 5)))
        chosen, expected = _run(beam_select, inputs), _reference_of(inputs)
        for name in OUTPUTS:
            np.testing.assert_array_equal(chosen[name], expected[name], err_msg=name)


def test_gpu_kernels_cuda_code_run_on_this_cpu_equals_the_cpu_kernel(beam_select, tmp_path):
    """Sentences over more than one thread block, the last one part full."""
    if shutil.which("g++") is None:
        pytest.skip("runs the kernel's CUDA C on this CPU with g++ (Debian: apt-get install g++)")
    source = kernel_cuda_source(beam_select_kernel(gpu=True), "beam_select")
    run = emulated_kernel(source, "beam_select_kernel", tmp_path)
    rng = np.random.default_rng(7)
    n, k, width = GPU_THREADS + 5, 4, 16
    inputs = _random_inputs(rng, n, k, width)
    chosen, heads = _outputs(inputs)
    beams = dict.fromkeys(re.findall(r"int64_t (cse_v\d+)", source), k)  # (the host's columns - 1, hoisted)
    run((-(-n // GPU_THREADS), 1), **dict(zip(("V", "I", "L", "S", "banned"), inputs)), O=chosen, H=heads,
        eos_id=EOS, pad_id=PAD, n=n, columns=k + 1, width=width, **beams)
    expected = _run(beam_select, inputs)
    for name, got in zip(OUTPUTS, chosen):
        np.testing.assert_array_equal(got, expected[name], err_msg=name)
