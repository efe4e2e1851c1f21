"""Beam search's vectorized choice of each sentence's continuations (``_select``), case by case."""
import numpy as np

from int8mt.runtime.search import _select

EOS, K = 2, 2
NEG = -np.inf


def _choose(scores, tokens, finished, eos_banned=False):
    return _select(np.array(scores, float), np.array(tokens), np.array(finished), K, EOS, eos_banned)


def test_each_sentence_takes_candidates_in_order_until_k_continue_or_k_have_finished():
    chosen = _choose(
        [[-1, -2, -3, -4],      # continues, ends, continues: k continue, so the 4th is not taken
         [-1, -2, -3, -4],      # one finished before: the end of sentence makes k finished, nothing after it
         [-1, NEG, -3, -4],     # an impossible candidate stops the sentence
         [-1, -2, -3, -4]],     # k finished before this step: takes nothing
        [[5, EOS, 7, 8], [EOS, 5, 6, 7], [5, 6, 7, 8], [5, 6, 7, 8]],
        [0, 1, 0, 2])
    assert chosen.new_slot.tolist() == [[0, -1, 1, -1], [-1, -1, -1, -1], [0, -1, -1, -1], [-1, -1, -1, -1]]
    assert chosen.ended.tolist() == [[False, True, False, False], [True, False, False, False],
                                     [False] * 4, [False] * 4]
    assert chosen.new_scores.tolist() == [[-1, -3], [NEG, NEG], [-1, NEG], [NEG, NEG]]
    assert chosen.active.tolist() == [True, True, True, False]


def test_a_banned_end_of_sentence_is_passed_over():
    chosen = _choose([[-1, -2, -3, -4]], [[5, EOS, 7, 8]], [1], eos_banned=True)
    assert chosen.new_slot.tolist() == [[0, -1, 1, -1]] and not chosen.ended.any()
    assert chosen.new_scores.tolist() == [[-1, -3]]
