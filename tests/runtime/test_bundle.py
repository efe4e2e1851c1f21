"""Bundles: export/load round trip, translation, and clear errors for bad bundles and bad input."""
import json

import numpy as np
import pytest
import torch

from int8mt.model.generate import greedy_decode
from int8mt.runtime import bundle as bundle_mod
from int8mt.runtime.bundle import Bundle, BundleError
from int8mt.runtime.cache import aligned_empty
from int8mt.runtime.tensors import TENSOR_ALIGNMENT
from int8mt.runtime.options import SearchOptions
from int8mt.runtime.search import _row_candidates, beam_search, greedy_search
from int8mt.runtime.translator import Translator

from ..conftest import HOST_PRESET, edit_manifest, through_the_gpu_host_path


def test_round_trip_matches_pytorch_greedy(tiny_bundle, tiny_model):
    bundle = Bundle(tiny_bundle)
    src = np.array([[10, 20, 30, 40, 3], [50, 60, 3, 0, 0]], np.int64)
    expected = greedy_decode(tiny_model, torch.from_numpy(src), max_len=12)
    assert greedy_search(bundle, src, [12, 12]) == expected


def test_inputs_are_aligned_contiguous_views_or_copies(tiny_bundle):
    """An aligned contiguous array becomes an input without a copy; an unaligned, strided or read-only one is copied
    into an aligned contiguous one (TVM's kernels assume both), with the same values."""
    bundle = Bundle(tiny_bundle)
    memory = aligned_empty((25,), np.int64)
    memory[:] = np.arange(25)
    aligned, unaligned = memory[:24].reshape(4, 6), memory[1:].reshape(4, 6)
    read_only = aligned.copy()
    read_only.flags.writeable = False
    for array, shared in ((aligned, True), (unaligned, False), (aligned[:, ::2], False), (read_only, False)):
        tensor = bundle.tensor(array)
        assert tensor.data_ptr() % TENSOR_ALIGNMENT == 0 and tensor.is_contiguous()
        assert (tensor.data_ptr() == array.__array_interface__["data"][0]) == shared
        np.testing.assert_array_equal(np.from_dlpack(tensor), array)


def test_manifest_records_target_and_versions(tiny_bundle):
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    assert manifest["target"]["preset"] == HOST_PRESET.name
    assert manifest["target"]["tvm"] == HOST_PRESET.target
    assert manifest["quantization"] == {"scheme": "fp32", "matmuls_int": 0, "matmuls": 45} and manifest["tvm_version"]
    assert set(manifest["files"]) == {"model.so", "weights.bin", "spm.model"}


@pytest.mark.parametrize("beam", [1, 3])
def test_translate_handles_awkward_input(tiny_bundle, beam):
    translator = Translator(tiny_bundle, SearchOptions(beam_size=beam), batch_size=2)
    inputs = ["A man is riding a bike.", "", "   ", "猫が好き 🐈 ∮ ≠", "word " * 500]
    out = translator.translate(inputs)
    assert len(out) == len(inputs)
    assert out[1] == "" and out[2] == ""
    assert all(isinstance(o, str) for o in out)


def test_batching_does_not_change_greedy_results(tiny_bundle):
    sentences = ["A dog runs.", "Two women are sitting on a bench in the park.", "Hi", "A red car."]
    one = Translator(tiny_bundle, SearchOptions(beam_size=1), batch_size=1).translate(sentences)
    many = Translator(tiny_bundle, SearchOptions(beam_size=1), batch_size=4).translate(sentences)
    assert one == many


def test_greedy_drops_finished_rows_without_changing_results(tiny_bundle, monkeypatch):
    bundle = Bundle(tiny_bundle)
    src = np.random.default_rng(5).integers(4, 8000, (6, 7))
    src[4:, 5:] = 0
    max_lens = [1, 2, 2, 9, 12, 5]  # rows finish at different steps: the batch shrinks twice
    batches = []
    step = bundle.decode_step
    monkeypatch.setattr(bundle, "decode_step", lambda tokens, *a: batches.append(len(tokens)) or step(tokens, *a))
    together = greedy_search(bundle, src, max_lens)
    assert batches[0] == 6 and batches[-1] < 6  # it did shrink
    alone = [greedy_search(bundle, src[i:i + 1], [n])[0] for i, n in enumerate(max_lens)]
    assert together == alone and [len(t) for t in together] == max_lens


def test_one_sentence_decodes_greedily_in_one_call_with_the_host_loop_s_tokens(tiny_bundle, bundle_copy, monkeypatch):
    """The library's greedy loop gives each sentence the tokens of the host's steps (the maximum length cutting it,
    or the minimum keeping the end of sentence out), without a decoder step from the host; a bundle whose manifest
    lacks the loop (built before it) decodes on the host, alike."""
    bundle = Bundle(tiny_bundle)
    assert bundle.decodes_greedily
    rng = np.random.default_rng(7)
    sources = [rng.integers(4, 8000, (1, n)) for n in (3, 9, 20)]
    cases = [(src, max_len, min_len) for src in sources for max_len, min_len in ((12, 0), (1, 0), (30, 30), (6, 9))]
    on_device = []
    monkeypatch.setattr(bundle, "decode_step", lambda *a: pytest.fail("a host step"))
    for src, max_len, min_len in cases:
        on_device.append(greedy_search(bundle, src, [max_len], min_len)[0])
    monkeypatch.undo()
    edit_manifest(bundle_copy, lambda m: (m["entry_points"].remove("greedy_decode"),
                                          m["weights"]["entry_points"].pop("greedy_decode")))
    older = Bundle(bundle_copy)
    assert not older.decodes_greedily
    on_host = [greedy_search(older, src, [max_len], min_len)[0] for src, max_len, min_len in cases]
    assert on_device == on_host
    for tokens, (_, max_len, min_len) in zip(on_device, cases):
        assert len(tokens) <= max_len and (len(tokens) == max_len or min_len < max_len)
        assert bundle.eos_id not in tokens


@pytest.mark.parametrize("on_device", [True, False])
def test_beam_search_drops_finished_sentences_without_changing_results(tiny_bundle, monkeypatch, on_device):
    """Sentences that finish early leave the batch (their k rows, cache and cross-attention alike); each result
    equals the sentence decoded alone, with the device's candidates or with the whole logits."""
    bundle = Bundle(tiny_bundle)
    searched = bundle if on_device else _FullLogits(bundle)
    src = np.random.default_rng(9).integers(4, 8000, (6, 7))
    src[4:, 5:] = bundle.pad_id
    max_lens = [1, 2, 2, 9, 12, 5]  # sentences run out of length at different steps: the batch shrinks
    opts = SearchOptions(beam_size=3)
    rows = []
    step = bundle.beam_step if on_device else bundle.decode_step
    monkeypatch.setattr(bundle, step.__name__, lambda tokens, *a: rows.append(len(tokens)) or step(tokens, *a))
    together = beam_search(searched, src, max_lens, opts)
    assert rows[0] == 6 * 3 and rows[-1] < 6 * 3 and all(r % 3 == 0 for r in rows)  # whole sentences left
    alone = [beam_search(searched, src[i:i + 1], [n], opts)[0] for i, n in enumerate(max_lens)]
    assert together == alone


@pytest.mark.parametrize("missing", ["model.so", "manifest.json", "spm.model"])
def test_missing_file(bundle_copy, missing):
    (bundle_copy / missing).unlink()
    with pytest.raises(BundleError, match=f"{missing} is missing"):
        Bundle(bundle_copy)


def test_missing_bundle(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        Bundle(tmp_path / "nowhere")


def test_corrupt_manifest(bundle_copy):
    (bundle_copy / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="corrupt"):
        Bundle(bundle_copy)


def test_bundles_of_an_earlier_format_are_refused_with_a_rebuild_message(bundle_copy):
    """Format 8 chooses beam search's hypotheses on the device (format 7's host did, from ``top_candidates``)."""
    edit_manifest(bundle_copy, lambda m: m.update({"format": 7}))
    with pytest.raises(BundleError, match="bundle format 7 is not supported .this runtime reads 8.; rebuild it"):
        Bundle(bundle_copy)


def test_weights_that_do_not_match_the_library_are_refused_at_load(bundle_copy):
    """The entry points do not check their weights at each call; the library checks them all once, at load."""
    def reshape_first(manifest: dict) -> None:
        tensor = manifest["weights"]["tensors"][0]
        tensor["shape"] = [1, *tensor["shape"][:-1], tensor["shape"][-1] // 2]  # fewer elements: inside the file

    edit_manifest(bundle_copy, reshape_first)
    with pytest.raises(BundleError, match="weights of .* do not match .*model.so .*; rebuild the bundle"):
        Bundle(bundle_copy)


def test_corrupt_library_is_caught_before_loading(bundle_copy):
    with open(bundle_copy / "model.so", "r+b") as f:
        f.seek(4096)
        f.write(b"\x00" * 64)
    with pytest.raises(BundleError, match="checksum"):
        Bundle(bundle_copy)


def test_tokenizer_with_a_wrong_checksum(bundle_copy):
    (bundle_copy / "spm.model").write_bytes(b"garbage")
    with pytest.raises(BundleError, match="spm.model"):
        Bundle(bundle_copy)


def test_tokenizer_that_is_not_a_sentencepiece_model(bundle_copy):
    """A damaged tokenizer whose checksum matches (the manifest rewritten with it) fails where it is loaded."""
    from int8mt.runtime.bundle import sha256
    from int8mt.runtime.translator import Translator

    (bundle_copy / "spm.model").write_bytes(b"garbage")
    edit_manifest(bundle_copy, lambda m: m["files"].update({"spm.model": sha256(bundle_copy / "spm.model")}))
    translator = Translator(bundle_copy)  # (token ids need no tokenizer: it is loaded for text)
    with pytest.raises(ValueError, match="spm.model is not a valid SentencePiece model"):
        translator.translate(["A dog."])


def test_cpu_without_required_features(bundle_copy, monkeypatch):
    required = json.loads((bundle_copy / "manifest.json").read_text())["target"]["required_features"]
    monkeypatch.setattr(bundle_mod, "host_features", lambda: set(required[1:]))
    with pytest.raises(BundleError, match=f"this CPU lacks \\({required[0]}\\)"):
        Bundle(bundle_copy)


def test_bundle_for_another_architecture_is_refused_before_its_library_is_read(bundle_copy):
    edit_manifest(bundle_copy, lambda m: m["target"].update({"arch": "aarch64", "preset": "arm-dotprod"}))
    (bundle_copy / "model.so").write_bytes(b"never opened")  # not even its checksum is compared first
    with pytest.raises(BundleError, match="compiled for aarch64 \\(target 'arm-dotprod'\\); this machine is x86_64: "
                                          "copy it to an aarch64 machine"):
        Bundle(bundle_copy)


def test_unsupported_format(bundle_copy):
    edit_manifest(bundle_copy, lambda m: m.update({"format": 99}))
    with pytest.raises(BundleError, match="format 99"):
        Bundle(bundle_copy)


def test_bundle_from_an_older_build_lacking_an_entry_point(bundle_copy):
    edit_manifest(bundle_copy, lambda m: m.update({"entry_points": ["encode", "decode_step"]}))
    with pytest.raises(BundleError, match="reorder_cache"):
        Bundle(bundle_copy)


@pytest.mark.parametrize("bad", [-1, 8000, 10**9])
def test_token_ids_outside_the_source_vocabulary_are_refused(tiny_bundle, bad):
    """The embedding kernel reads the row of any id: one past the table read other memory (8000: a translation of
    garbage; 10**9: a segfault)."""
    translator = Translator(tiny_bundle)
    with pytest.raises(ValueError, match=f"source 2 has token id {bad}; the model's source vocabulary has ids 0 to "
                                         "7999"):
        translator.translate_ids([[5, 2], [5, bad, 2]])
    assert len(translator.translate_ids([[5, 2], [5, 7999, 2]])) == 2


def test_bad_search_options():
    with pytest.raises(ValueError, match="beam size"):
        SearchOptions(beam_size=0)


def _first_step(bundle: Bundle, src: np.ndarray):
    tokens = np.full((len(src), 1), bundle.start_id, np.int64)
    return tokens, 0, bundle.empty_cache(len(src), 1), bundle.encode(src), bundle.tensor(src)


def test_device_candidates_are_the_largest_logits_and_their_log_sum_exp(tiny_bundle):
    """As the host makes them from the whole logits for beams wider than the device's candidates allow."""
    bundle = Bundle(tiny_bundle)
    src = np.array([[10, 20, 30, 40, 3], [50, 60, 3, 0, 0]], np.int64)
    logits = bundle.decode_step(*_first_step(bundle, src))
    values, ids, log_sum_exp = map(bundle.host, bundle._top(bundle.tensor(logits)))  # (the entry point)
    host_values, host_ids, host_log_sum_exp = _row_candidates(logits, bundle.candidates)
    assert ids.shape == (2, bundle.candidates)
    np.testing.assert_array_equal(ids, host_ids)
    np.testing.assert_array_equal(values, host_values)
    np.testing.assert_allclose(log_sum_exp, host_log_sum_exp, rtol=1e-6)
    order = np.argsort(-logits, axis=1, kind="stable")[:, :bundle.candidates]
    np.testing.assert_array_equal(ids, order)
    np.testing.assert_array_equal(values, np.take_along_axis(logits, order, 1))


class _FullLogits:
    """A bundle that offers no device candidates: beam search reads the whole logits."""

    candidates = 0

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle

    def __getattr__(self, name: str):
        return getattr(self.bundle, name)


def test_beam_search_encodes_each_sentence_once(tiny_bundle, monkeypatch):
    """The cross-attention keys/values of a sentence's k rows are its one encoding repeated on the device,
    equal to encoding the repeated sources."""
    bundle = Bundle(tiny_bundle)
    src = np.random.default_rng(7).integers(4, 8000, (3, 6))
    src[1, 4:] = bundle.pad_id
    rows = np.repeat(np.arange(3), 4)
    for got, expected in zip(bundle.reorder_cross(bundle.encode(src), rows), bundle.encode(src[rows]), strict=True):
        np.testing.assert_array_equal(got.numpy(), expected.numpy())
    encoded = []
    encode = bundle.encode
    monkeypatch.setattr(bundle, "encode", lambda s: encoded.append(len(s)) or encode(s))
    opts = SearchOptions(beam_size=4)
    beam_search(bundle, src, opts.max_lengths(src, bundle.pad_id, 20), opts)
    assert encoded == [3]


@pytest.mark.parametrize("beam", [2, 4])
def test_beam_search_on_device_candidates_equals_beam_search_on_logits(tiny_bundle, beam):
    bundle = Bundle(tiny_bundle)
    src = np.random.default_rng(beam).integers(4, 8000, (5, 9))
    src[3, 4:] = bundle.pad_id
    opts = SearchOptions(beam_size=beam)
    max_lens = opts.max_lengths(src, bundle.pad_id, 40)
    assert 2 * beam <= bundle.candidates
    assert beam_search(bundle, src, max_lens, opts) == beam_search(_FullLogits(bundle), src, max_lens, opts)


class _AsOnAGPU(_FullLogits):
    """A bundle taken for one on a GPU: greedy search chooses its tokens on the device."""

    candidates = property(lambda self: self.bundle.candidates)
    on_gpu = True


@pytest.mark.parametrize("min_length", [0, 6])
def test_greedy_search_on_the_device_equals_greedy_search_on_the_logits(tiny_bundle, min_length):
    """Beam search with one hypothesis, as a GPU bundle runs greedy search: each row's best candidate (an end of
    sentence passed over below the minimum length), the same tokens as the arg-max of the logits."""
    bundle = Bundle(tiny_bundle)
    src = np.random.default_rng(min_length).integers(4, 8000, (6, 7))
    src[2, 3:] = bundle.pad_id
    opts = SearchOptions(beam_size=1, min_length=min_length)
    max_lens = [3, 9, 12, 40, 1, 7]
    chosen = []
    beam_step = bundle.beam_step
    on_device = _AsOnAGPU(bundle)
    on_device.beam_step = lambda *args: chosen.append(args[5].shape) or beam_step(*args)
    expected = greedy_search(bundle, src, max_lens, min_length)
    assert beam_search(on_device, src, max_lens, opts) == expected
    assert chosen and all(shape[1] == 1 for shape in chosen)
    assert any(len(tokens) == n for tokens, n in zip(expected, max_lens))  # (some stop at their length)
    assert min(len(tokens) for tokens in expected) >= min(min_length, *max_lens)


class _EndsAtOnce(_FullLogits):
    """A bundle whose end-of-sentence logit is always the largest: unconstrained, every output is empty."""

    def decode_step(self, *args):
        logits = self.bundle.decode_step(*args)
        logits[:, self.bundle.eos_id] = logits.max() + 10.0
        return logits


class _EndsAtOnceOnAGPU(_AsOnAGPU):
    """:class:`_EndsAtOnce` for the device's candidates (``top_candidates`` and ``select_beams`` on its logits):
    each row's first candidate is the end of sentence."""

    def beam_step(self, tokens, step, cache, cross_kv, src, scores, finished, eos_banned):
        logits = _EndsAtOnce.decode_step(self, tokens, step, cache, cross_kv, src)
        candidates = self.bundle._top(self.bundle.tensor(logits))  # (the entry point)
        return self.bundle.select_beams(tuple(candidates), scores, finished, eos_banned)


def test_greedy_search_on_the_device_holds_back_the_end_of_sentence(tiny_bundle):
    bundle = Bundle(tiny_bundle)
    src = np.random.default_rng(3).integers(4, 8000, (4, 6))
    for opts in (SearchOptions(beam_size=1), SearchOptions(beam_size=1, max_length_a=0, max_length_b=7, min_length=7)):
        max_lens = opts.max_lengths(src, 0, 40)
        out = beam_search(_EndsAtOnceOnAGPU(bundle), src, max_lens, opts)
        assert out == greedy_search(_EndsAtOnce(bundle), src, max_lens, opts.min_length)
        assert out == [[]] * 4 if opts.min_length == 0 else [len(o) for o in out] == [7] * 4


def test_the_gpu_host_path_translates_as_the_cpu_one(tiny_bundle):
    """The host side of a GPU bundle's searches (the step's tokens, history and beam state packed into a device
    buffer that grows with the history, in one copy per step; compaction of finished sentences; results copied
    back) gives the CPU's results: greedy search (on the device, as beam search with one hypothesis) and beam
    search."""
    cpu, gpu = Bundle(tiny_bundle), through_the_gpu_host_path(Bundle(tiny_bundle))
    src = np.random.default_rng(5).integers(4, 8000, (6, 9))
    src[2, 4:] = cpu.pad_id
    max_lens = [3, 30, 12, 40, 1, 7]  # (sentences leave the batch early)
    for beam in (1, 2, 4):
        opts = SearchOptions(beam_size=beam)
        expected = greedy_search(cpu, src, max_lens) if beam == 1 else beam_search(cpu, src, max_lens, opts)
        assert beam_search(gpu, src, max_lens, opts) == expected
    assert beam_search(gpu, src[:1], [20], SearchOptions(beam_size=1)) == greedy_search(cpu, src[:1], [20])
    copies, steps = [], []  # once the steps' positions and flags are on the device: one copy to it per step
    copy, run_step = gpu._copy, gpu._step
    gpu._copy = lambda *args: copies.append(1) or copy(*args)
    gpu._step = lambda *args: steps.append(1) or run_step(*args)
    assert beam_search(gpu, src, max_lens, SearchOptions(beam_size=4)) == expected
    assert len(copies) == len(steps) > 10


@pytest.mark.parametrize("beam", [1, 3])
def test_min_length_holds_back_the_end_of_sentence(tiny_bundle, beam):
    """Fixed work, as the CTranslate2 comparison runs it: minimum = maximum = N tokens for every sentence."""
    bundle = _EndsAtOnce(Bundle(tiny_bundle))
    src = np.random.default_rng(3).integers(4, 8000, (4, 6))
    free = SearchOptions(beam_size=beam)
    assert beam_search(bundle, src, free.max_lengths(src, 0, 40), free) == [[]] * 4
    fixed = SearchOptions(beam_size=beam, max_length_a=0, max_length_b=7, min_length=7)
    out = beam_search(bundle, src, fixed.max_lengths(src, 0, 40), fixed)
    assert [len(o) for o in out] == [7] * 4 and bundle.eos_id not in sum(out, [])


def test_replicas_translate_in_parallel_with_the_same_results(tiny_bundle):
    sentences = [f"A dog number {i} runs after {i % 7} red balls." for i in range(24)] + ["", "Hi"]
    one = Translator(tiny_bundle, SearchOptions(beam_size=2), batch_size=3)
    two = Translator(tiny_bundle, SearchOptions(beam_size=2), batch_size=3, replicas=2, threads=1)
    assert two.replicas == 2 and two.threads == 1 and one.threads >= 1
    assert two.translate(sentences) == one.translate(sentences)


def test_the_first_replica_translates_in_the_calling_thread_and_the_others_on_their_own(tiny_bundle, monkeypatch):
    import threading

    from int8mt.runtime import translator as translator_mod

    searched_on = []
    search = translator_mod._search
    both_busy = threading.Barrier(2, timeout=60)

    def searched(*args):
        searched_on.append(threading.current_thread())
        if replicas == 2 and len(searched_on) <= 2:  # the first two batches run at once, one per replica
            both_busy.wait()
        return search(*args)

    monkeypatch.setattr(translator_mod, "_search", searched)
    sentences = [f"A dog number {i} runs." for i in range(6)]
    replicas = 1
    one = Translator(tiny_bundle, SearchOptions(beam_size=1), batch_size=2, threads=1)
    expected = one.translate(sentences)
    assert searched_on == [threading.current_thread()] * 3
    searched_on.clear()
    replicas = 2
    two = Translator(tiny_bundle, SearchOptions(beam_size=1), batch_size=2, replicas=2, threads=1)
    assert two.translate(sentences, progress=True) == expected
    assert len(searched_on) == 3 and len(set(searched_on)) == 2 and threading.current_thread() in searched_on
    assert all(t.name.startswith("int8mt-replica") for t in searched_on if t is not threading.current_thread())

    def failing(*args):
        raise RuntimeError("search failed")

    monkeypatch.setattr(translator_mod, "_search", failing)
    with pytest.raises(RuntimeError, match="search failed"):
        two.translate(sentences)


def test_unwritten_library_pages_are_released_and_the_model_still_runs(tiny_bundle):
    """The weights' serialized copy in the mapped library is given back after loading (read-only pages never
    written); a page read again comes back from the file."""
    bundle = Bundle(tiny_bundle)
    src = np.array([[10, 20, 30, 40, 3], [50, 60, 3, 0, 0]], np.int64)
    before = greedy_search(bundle, src, [12, 12])
    assert bundle_mod.drop_unmodified_pages(tiny_bundle / "model.so") > 0
    assert greedy_search(bundle, src, [12, 12]) == before
    assert greedy_search(bundle.replica(), src, [12, 12]) == before


def test_thread_pool_workers_spin_briefly_unless_told_otherwise(tiny_bundle):
    """Loading a bundle sets TVM's pool workers' spin count (an idle one-thread replica's worker spun for a second
    or more at TVM's default), and keeps one the user set."""
    import os
    import subprocess
    import sys

    code = (f"import os; from int8mt.runtime.bundle import Bundle; Bundle({str(tiny_bundle)!r}); "
            "print(os.environ['TVM_THREAD_POOL_SPIN_COUNT'])")
    env = {k: v for k, v in os.environ.items() if k != "TVM_THREAD_POOL_SPIN_COUNT"}
    default = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert default.stdout.strip() == str(bundle_mod.POOL_SPIN_COUNT), default.stderr[-2000:]
    chosen = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**env, "TVM_THREAD_POOL_SPIN_COUNT": "5"})
    assert chosen.stdout.strip() == "5", chosen.stderr[-2000:]


def test_numpy_loaded_after_a_bundle_starts_no_blas_threads(tiny_bundle):
    """The runtime never multiplies matrices in NumPy; NumPy's OpenBLAS would start a thread per CPU (each spinning
    at first) when a search imports NumPy after the bundle has loaded."""
    import os
    import subprocess
    import sys

    code = (f"import os; from int8mt.runtime.bundle import Bundle; Bundle({str(tiny_bundle)!r}); "
            "before = len(os.listdir('/proc/self/task')); import numpy; "
            "print(len(os.listdir('/proc/self/task')) - before, os.environ['OPENBLAS_NUM_THREADS'])")
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert run.stdout.split() == ["0", str(bundle_mod.BLAS_THREADS)], run.stderr[-2000:]


def test_a_process_translating_token_ids_loads_no_library_it_does_not_use(tiny_bundle):
    """A CPU bundle's runtime imports neither torch nor OpenSSL's hashes nor ml_dtypes (TVM's FFI would), nor
    the tokenizer when it is given token ids, nor tqdm without a progress bar (together 10 MiB of a 69 MiB
    process); its checksums are hashlib's all the same."""
    import hashlib
    import subprocess
    import sys

    code = (f"import sys; from int8mt.runtime.translator import Translator; t = Translator({str(tiny_bundle)!r}); "
            "t.translate_ids([[5, 6, 2]]); "
            "print(sorted(m for m in ('torch', '_hashlib', 'ml_dtypes', 'sentencepiece', 'tqdm') if sys.modules.get(m))); "
            f"from int8mt.runtime.bundle import sha256; print(sha256(__import__('pathlib').Path({str(tiny_bundle / 'model.so')!r})))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    loaded, digest = run.stdout.splitlines()
    assert loaded == "[]", run.stderr[-2000:]
    assert digest == hashlib.sha256((tiny_bundle / "model.so").read_bytes()).hexdigest()


def test_one_sentence_at_a_time_translates_without_numpy_and_a_later_search_imports_it(tiny_bundle):
    """A process that loads a CPU bundle and translates one sentence at a time (the library's greedy loop) never
    imports NumPy (11 MiB resident; TVM's FFI would import it); batches and beams import it later and work with the
    FFI imported without it. Both give this process's results (NumPy and the FFI imported in either order)."""
    import json
    import subprocess
    import sys

    sources = [[5, 6, 2], [7, 8, 9, 10, 3], [11, 3]]
    code = (f"import json, sys; from int8mt.runtime.options import SearchOptions; "
            f"from int8mt.runtime.translator import Translator; t = Translator({str(tiny_bundle)!r}, "
            f"SearchOptions(beam_size=1), batch_size=1); greedy = t.translate_ids({sources}); "
            "numpy = 'numpy' in sys.modules; "
            f"beam = t.translate_ids({sources}, SearchOptions(beam_size=3)); t.batch_size = 3; "
            f"batch = t.translate_ids({sources}); print(json.dumps([numpy, greedy, beam, batch]))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    numpy_imported, greedy, beam, batch = json.loads(run.stdout)
    assert not numpy_imported
    here = Translator(tiny_bundle, SearchOptions(beam_size=1), batch_size=1)
    assert greedy == batch == here.translate_ids(sources)
    assert beam == here.translate_ids(sources, SearchOptions(beam_size=3))
