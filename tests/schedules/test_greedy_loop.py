"""The greedy loop's arg-max: NumPy's (the first of equal maxima) over a row of logits, the end of sentence
passed over below the minimum length; vocabularies of whole, partial and no vector chunks."""
import numpy as np
import pytest
import tvm

from int8mt.schedules.greedy_loop import next_token_kernel

from ..conftest import HOST_PRESET

EOS = 2


@pytest.mark.parametrize("vocab", [8000, 48, 37, 7])
def test_the_next_token_is_numpy_s_argmax_with_the_end_of_sentence_banned_below_the_minimum(vocab):
    kernel = tvm.compile(tvm.IRModule({"main": next_token_kernel(vocab, EOS).with_attr("global_symbol", "main")}),
                         target=tvm.target.Target(HOST_PRESET.target))["main"]
    rng = np.random.default_rng(vocab)
    rows = [rng.standard_normal(vocab), rng.integers(-2, 3, vocab), np.full(vocab, -np.inf), np.zeros(vocab)]
    peak_at_eos = rng.standard_normal(vocab)
    peak_at_eos[EOS] = 50
    for logits in [*rows, peak_at_eos]:
        logits = logits.astype(np.float32)[None]
        for step, min_length in ((0, 0), (3, 3), (0, 5), (4, 5)):
            token = tvm.runtime.tensor(np.full((1, 1), -1, np.int64))
            kernel(tvm.runtime.tensor(logits), tvm.runtime.tensor(np.array([step])),
                   tvm.runtime.tensor(np.array([64, min_length])), token)
            expected = logits.copy()
            if step < min_length:
                expected[0, EOS] = -np.inf
            assert token.numpy()[0, 0] == expected.argmax(), (logits, step, min_length)
