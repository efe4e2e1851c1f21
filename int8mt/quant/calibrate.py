"""Post-training calibration: observe every matmul input on training sentences, then pick a clipping
range per tensor (largest magnitude, a percentile of magnitudes, or the clip that minimises the mean
squared quantization error)."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from ..data import iterate_batches, pad_batch, read_lines
from ..errors import UserError
from ..model.generate import translate_greedy
from ..model.transformer import Transformer
from ..tokenizer import MarianTokenizer, Tokenizer
from .config import QuantConfig
from .modules import act_quantizers

SAMPLES_PER_CALL = 1 << 15
MAX_SAMPLES = 1 << 20
MSE_GRID = 100


class Observer:
    """Exact largest magnitude plus a uniform random sample of magnitudes (bounded memory)."""

    def __init__(self, seed: int) -> None:
        self.amax = 0.0
        self.samples: list[Tensor] = []
        self.kept = 0
        self.gen = torch.Generator().manual_seed(seed)

    def update(self, x: Tensor) -> None:
        a = x.detach().abs().flatten().float()
        self.amax = max(self.amax, float(a.max()))
        if self.kept < MAX_SAMPLES:
            if a.numel() > SAMPLES_PER_CALL:
                a = a[torch.randint(a.numel(), (SAMPLES_PER_CALL,), generator=self.gen)]
            self.samples.append(a)
            self.kept += a.numel()

    def clip(self, method: str, qmax: int, percentile: float) -> float:
        """The clipping threshold (scale = threshold / qmax) chosen by ``method``."""
        if method == "max" or not self.samples:
            return max(self.amax, 1e-8)
        a = torch.cat(self.samples)
        if method == "percentile":
            return max(float(torch.quantile(a[:1 << 24], percentile / 100.0)), 1e-8)
        candidates = torch.linspace(0.05, 1.0, MSE_GRID) * self.amax
        errors = torch.stack([_quant_mse(a, c / qmax, qmax) for c in candidates])
        return max(float(candidates[int(errors.argmin())]), 1e-8)


def _quant_mse(a: Tensor, scale: Tensor, qmax: int) -> Tensor:
    return ((torch.clamp(torch.round(a / scale), -qmax, qmax) * scale - a) ** 2).mean()


@torch.no_grad()
def calibrate(model: Transformer, qcfg: QuantConfig, tok: Tokenizer | MarianTokenizer, sources: list[str],
              targets: list[str], batch_size: int = 32, max_tokens: int = 128) -> dict[str, float]:
    """Set every static activation scale of a prepared ``model`` from teacher-forced passes over the
    sentence pairs; returns {quantizer name: scale}."""
    quantizers = {n: q for n, q in act_quantizers(model).items() if not q.dynamic}
    if not quantizers:
        return {}
    for i, q in enumerate(quantizers.values()):
        q.observer = Observer(seed=i)
    model.eval()
    pad, start = model.cfg.pad_id, model.cfg.decoder_start_id  # the model's, not the tokenizer's (Marian: none)
    src_ids = tok.encode_batch(sources, max_tokens)
    tgt_ids = [[start] + tok.encode_target(t, max_tokens - 1) for t in targets]
    try:
        for idx in tqdm(list(iterate_batches(src_ids, batch_size)), desc="calibrating", unit="batch",
                        file=sys.stderr, mininterval=2):
            src = torch.from_numpy(pad_batch([src_ids[i] for i in idx], pad))
            tgt = torch.from_numpy(pad_batch([tgt_ids[i] for i in idx], pad))
            model(src, tgt)
        scales = {}
        for name, q in quantizers.items():
            scales[name] = q.observer.clip(qcfg.calibration, q.qmax, qcfg.percentile) / q.qmax
            q.set_scale(scales[name])
    finally:
        for q in quantizers.values():
            q.observer = None
    return scales


def self_translated(model: Transformer, tok: Tokenizer | MarianTokenizer, path: Path,
                    limit: int) -> tuple[list[str], list[str]]:
    """Calibration text from a file of source sentences: its first ``limit`` non-empty lines, and the FP32
    ``model``'s greedy translations of them as the decoder's side (run before the model is prepared)."""
    sources = [line.strip() for line in read_lines(path) if line.strip()][:limit]
    if not sources:
        raise UserError(f"{path} has no sentences to calibrate on")
    print(f"calibrating on {len(sources)} sentences of {path}, with the model's own translations as targets",
          file=sys.stderr)
    return sources, translate_greedy(model, tok, sources, max_tokens=model.cfg.max_positions)
