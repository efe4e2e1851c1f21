"""End-to-end translation benchmark: a compiled bundle against PyTorch eager on the same sentences, FP32 and, against
an INT8 bundle, PyTorch's own INT8 (dynamic quantization of every linear layer, as its users quantize a Transformer
for the CPU)."""
from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from int8mt.metrics import corpus_bleu


@dataclass
class BenchRow:
    backend: str
    search: str
    batch_size: int
    sentences: int
    seconds: float
    sentences_per_second: float
    bleu: float


def _timed(backend: str, search: str, batch: int, translate: Callable[[], list[str]], refs: list[str]) -> BenchRow:
    t0 = time.perf_counter()
    hyps = translate()
    seconds = time.perf_counter() - t0
    return BenchRow(backend, search, batch, len(hyps), round(seconds, 2), round(len(hyps) / seconds, 2),
                    round(corpus_bleu(hyps, refs), 2))


@contextmanager
def quiet_pytorch_quantization() -> Iterator[None]:
    """PyTorch's quantization, a peer measured here, without the notices of its 2.13 deprecation (of
    ``torch.ao.quantization`` and of quantized tensors, in favour of torchao)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", "torch.quantize_per_tensor, torch.quantize_per_channel", UserWarning)
        yield


def pytorch_dynamic_int8(model):
    """``model`` with every ``nn.Linear`` quantized by PyTorch's dynamic quantization (int8 weights with a scale
    each, activations quantized at run time; ``torch.ao.quantization.quantize_dynamic``), a copy."""
    import torch

    with quiet_pytorch_quantization():
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=False)


def bench_translation(bundle_dir: Path, model_dir: Path | None, sources: list[str], references: list[str],
                      batch_sizes: tuple[int, ...] = (1, 32), beam_size: int = 4) -> list[BenchRow]:
    """Greedy at each batch size for every backend, plus the bundle's beam search at the largest batch; PyTorch
    INT8 against a quantized bundle."""
    from int8mt.runtime.bundle import read_manifest
    from int8mt.runtime.options import SearchOptions
    from int8mt.runtime.translator import Translator

    from .bench_against import compute_type

    runs = [(1, batch) for batch in batch_sizes] + [(beam_size, max(batch_sizes))]
    rows = []
    for beam, batch in runs:
        translator = Translator(bundle_dir, SearchOptions(beam_size=beam), batch_size=batch)
        search = "greedy" if beam == 1 else f"beam {beam}"
        rows.append(_timed("int8mt bundle", search, batch, lambda: translator.translate(sources, progress=True),
                           references))
    if model_dir is not None:
        import torch

        from int8mt.model.checkpoint import load_model_dir
        from int8mt.model.generate import translate_greedy
        from int8mt.tokenizer import load_tokenizer

        model, tok = load_model_dir(model_dir), load_tokenizer(model_dir)
        models = {"FP32": model}
        if compute_type(read_manifest(bundle_dir)) == "int8":
            models["dynamic INT8"] = pytorch_dynamic_int8(model)
        version = torch.__version__.split("+")[0]
        for name, pytorch in models.items():
            for batch in batch_sizes:
                with torch.inference_mode():
                    rows.append(_timed(f"PyTorch {version} {name}", "greedy", batch,
                                       lambda: translate_greedy(pytorch, tok, sources, pytorch.cfg.max_positions,
                                                                batch), references))
    return rows


def format_table(rows: list[BenchRow]) -> str:
    header = f"| {'backend':<28} | {'search':<7} | batch | sentences | seconds | sentences/s | BLEU  |"
    lines = [header, "|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|"]
    for r in rows:
        lines.append(f"| {r.backend:<28} | {r.search:<7} | {r.batch_size:>5} | {r.sentences:>9} | {r.seconds:>7} "
                     f"| {r.sentences_per_second:>11} | {r.bleu:>5} |")
    return "\n".join(lines)


def rows_as_dicts(rows: list[BenchRow]) -> list[dict]:
    return [asdict(r) for r in rows]
