"""Learned ranges: quantization-aware fine-tuning from the FP32 checkpoint.

Every matmul input is fake-quantized in the forward pass with a learnable clipping scale (LSQ-style: the
straight-through estimator passes gradients through rounding, and the scale gets the gradient of the
clipped, rounded value); weights are fake-quantized per channel. Scales start from MSE calibration.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..data import length_batches, pad_batch, read_aligned
from ..errors import UserError
from ..metrics import corpus_bleu
from ..model.checkpoint import load_model_dir
from ..model.generate import translate_greedy
from ..tokenizer import MarianTokenizer, Tokenizer, load_tokenizer
from .calibrate import calibrate
from .checkpoint import learned_dir, save_quantized
from .config import QuantConfig
from .modules import act_quantizers, convert, prepare


@dataclass(frozen=True)
class QATConfig:
    epochs: float = 1.0         # passes over the training batches, a fraction of one included
    batch_tokens: int = 3000
    lr: float = 2e-5            # weights
    scale_lr: float = 1e-3      # log-scales of the clipping ranges
    label_smoothing: float = 0.1
    calib_sentences: int = 512
    seed: int = 1
    max_tokens: int = 128

    def __post_init__(self) -> None:
        if not (math.isfinite(self.epochs) and self.epochs > 0):
            raise UserError(f"epochs must be a number above 0, got {self.epochs}")


def scheduled_batches(batches: list, epochs: float) -> list:
    """``batches`` (one epoch) repeated for ``epochs`` passes, a fraction of a pass as the first batches of one;
    at least one batch."""
    return [batches[i % len(batches)] for i in range(max(1, int(len(batches) * epochs)))]


HELD_OUT_SHARE, HELD_OUT_MAX = 0.05, 500  # validation pairs taken from the training text when none are given


@dataclass(frozen=True)
class ParallelText:
    """Aligned source and target sentences."""

    sources: list[str]
    targets: list[str]

    @classmethod
    def read(cls, source: Path, target: Path) -> "ParallelText":
        pairs = [(s, t) for s, t in zip(*read_aligned(source, target)) if s.strip() and t.strip()]
        if not pairs:
            raise UserError(f"{source} and {target} have no sentence pairs")
        return cls([s for s, _ in pairs], [t for _, t in pairs])

    def split_off(self) -> tuple["ParallelText", "ParallelText"]:
        """(training, held-out validation): the last 5 % of the pairs, at most 500, at least one."""
        held = min(HELD_OUT_MAX, max(1, int(len(self.sources) * HELD_OUT_SHARE)))
        if len(self.sources) < 2:
            raise UserError("QAT needs at least two sentence pairs (one is held out for validation)")
        return (ParallelText(self.sources[:-held], self.targets[:-held]),
                ParallelText(self.sources[-held:], self.targets[-held:]))


def fine_tune(model_dir: Path, qcfg: QuantConfig, train: ParallelText, val: ParallelText,
              tc: QATConfig = QATConfig(), out_dir: Path | None = None) -> dict:
    """Fine-tune ``model_dir`` with learned ranges on ``train`` (BLEU reported on ``val``) and write the
    quantized model; returns its record."""
    qcfg = QuantConfig(bits=qcfg.bits, ranges="learned", calibration="mse", keep_fp32=qcfg.keep_fp32)
    out_dir = out_dir or learned_dir(model_dir, qcfg.bits)
    torch.manual_seed(tc.seed)
    tok = load_tokenizer(model_dir)
    model = load_model_dir(model_dir)
    pad, start = model.cfg.pad_id, model.cfg.decoder_start_id
    prepare(model, qcfg)
    train_src, train_tgt, val_src, val_tgt = train.sources, train.targets, val.sources, val.targets
    calibrate(model, qcfg, tok, train_src[:tc.calib_sentences], train_tgt[:tc.calib_sentences])
    start_bleu = _val_bleu(model, tok, val_src, val_tgt, tc.max_tokens)
    print(f"calibrated {qcfg.name}: val BLEU {start_bleu:.2f}", file=sys.stderr)

    scales = [q.log_scale for q in act_quantizers(model).values()]
    scale_ids = {id(p) for p in scales}
    weights = [p for p in model.parameters() if id(p) not in scale_ids]
    opt = torch.optim.Adam([{"params": weights, "lr": tc.lr}, {"params": scales, "lr": tc.scale_lr}],
                           betas=(0.9, 0.98), eps=1e-9)
    src_ids = tok.encode_batch(train_src, tc.max_tokens)
    tgt_ids = [[start] + tok.encode_target(t, tc.max_tokens - 1) for t in train_tgt]
    lengths = [max(len(s), len(t)) for s, t in zip(src_ids, tgt_ids)]
    batches = length_batches(lengths, tc.batch_tokens // 2, shuffle=True, seed=tc.seed)
    batches = scheduled_batches(batches, tc.epochs)
    t0, total = time.time(), 0.0
    model.train()
    bar = tqdm(batches, desc=f"QAT {qcfg.name}", unit="batch", file=sys.stderr, mininterval=5)
    for step, idx in enumerate(bar, 1):
        src = torch.from_numpy(pad_batch([src_ids[i] for i in idx], pad))
        tgt = torch.from_numpy(pad_batch([tgt_ids[i] for i in idx], pad))
        logits = model(src, tgt[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tgt[:, 1:].flatten(), ignore_index=pad,
                               label_smoothing=tc.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(weights, 1.0)
        opt.step()
        total += loss.item()
        bar.set_postfix(loss=f"{total / step:.3f}", refresh=False)
    end_bleu = _val_bleu(model, tok, val_src, val_tgt, tc.max_tokens)
    print(f"after fine-tuning: val BLEU {end_bleu:.2f}", file=sys.stderr)
    record = {"qat": asdict(tc), "val_bleu_calibrated": round(start_bleu, 2), "val_bleu_learned": round(end_bleu, 2),
              "steps": len(batches), "seconds": round(time.time() - t0)}
    save_quantized(convert(model), qcfg, out_dir, tok, record)
    return record


def _val_bleu(model, tok: Tokenizer | MarianTokenizer, sources: list[str], refs: list[str], max_tokens: int) -> float:
    """Val BLEU of the model as it will run: fake quantization in eval mode equals the converted form."""
    model.eval()
    try:
        return corpus_bleu(translate_greedy(model, tok, sources, max_tokens), refs)
    finally:
        model.train()
