"""Training of the reference model: label smoothing, warm-up, early stopping on validation BLEU, and
averaging of the best checkpoints."""
from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..config import Config
from ..data import length_batches, pad_batch, read_parallel
from ..metrics import corpus_bleu as bleu
from ..model.checkpoint import TOKENIZER_FILE, average_state_dicts, save_model_dir
from ..model.config import ModelConfig
from ..model.generate import translate_greedy
from ..model.transformer import Transformer
from ..tokenizer import Tokenizer, train_joint_vocabulary


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    val_bleu: float
    seconds: float


def _lr(step: int, peak: float, warmup: int) -> float:
    """Linear warm-up to ``peak``, then inverse square-root decay."""
    step = max(step, 1)
    return peak * min(step / warmup, math.sqrt(warmup / step))


def train(cfg: Config, out_dir: Path, run_dir: Path) -> dict:
    """Train per ``cfg`` and write the final (averaged) model to ``out_dir``; returns the training record."""
    tc = cfg.train
    torch.manual_seed(tc.seed)
    random.seed(tc.seed)
    np.random.seed(tc.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    data = cfg.paths.data
    spm_file = run_dir / TOKENIZER_FILE
    if not spm_file.exists():
        print(f"training a {cfg.model.vocab_size}-piece joint SentencePiece vocabulary", file=sys.stderr)
        model_file = train_joint_vocabulary([data / f"train.{tc.src_lang}", data / f"train.{tc.tgt_lang}"],
                                            run_dir / "spm", cfg.model.vocab_size)
        model_file.rename(spm_file)
    tok = Tokenizer(spm_file)
    mcfg = ModelConfig.from_dict({**cfg.model.to_dict(), "vocab_size": tok.vocab_size, "pad_id": tok.pad_id,
                                  "eos_id": tok.eos_id, "decoder_start_id": tok.bos_id})

    train_src, train_tgt = read_parallel(data, "train", tc.src_lang, tc.tgt_lang)
    val_src, val_tgt = read_parallel(data, "val", tc.src_lang, tc.tgt_lang)
    src_ids = tok.encode_batch(train_src, tc.max_tokens)
    tgt_ids = [[tok.bos_id] + t for t in tok.encode_batch(train_tgt, tc.max_tokens - 1)]
    lengths = [max(len(s), len(t)) for s, t in zip(src_ids, tgt_ids)]

    model = Transformer(mcfg)
    opt = torch.optim.Adam(model.parameters(), lr=tc.lr, betas=(0.9, 0.98), eps=1e-9)
    history: list[EpochRecord] = []
    step, best, since_best = 0, -1.0, 0
    t_start = time.time()
    for epoch in range(1, tc.epochs + 1):
        model.train()
        t0, total, count = time.time(), 0.0, 0
        batches = length_batches(lengths, tc.batch_tokens // 2, shuffle=True, seed=tc.seed + epoch)
        bar = tqdm(batches, desc=f"epoch {epoch}", unit="batch", file=sys.stderr, mininterval=5)
        for idx in bar:
            src = torch.from_numpy(pad_batch([src_ids[i] for i in idx], tok.pad_id))
            tgt = torch.from_numpy(pad_batch([tgt_ids[i] for i in idx], tok.pad_id))
            step += 1
            for group in opt.param_groups:
                group["lr"] = _lr(step, tc.lr, tc.warmup_steps)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=tc.bf16):
                logits = model(src, tgt[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), tgt[:, 1:].flatten(), ignore_index=tok.pad_id,
                                   label_smoothing=tc.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            total, count = total + loss.item(), count + 1
            bar.set_postfix(loss=f"{total / count:.3f}", lr=f"{opt.param_groups[0]['lr']:.2e}", refresh=False)
        model.eval()
        val_bleu = bleu(translate_greedy(model, tok, val_src, tc.max_tokens), val_tgt)
        rec = EpochRecord(epoch, total / count, val_bleu, time.time() - t0)
        history.append(rec)
        torch.save(model.state_dict(), run_dir / f"epoch{epoch}.pt")
        print(f"epoch {epoch}: loss {rec.train_loss:.3f}  val BLEU {val_bleu:.2f}  ({rec.seconds:.0f} s)",
              file=sys.stderr, flush=True)
        (run_dir / "history.json").write_text(json.dumps([r.__dict__ for r in history], indent=1))
        if val_bleu > best:
            best, since_best = val_bleu, 0
        else:
            since_best += 1
            if since_best >= tc.patience:
                print(f"early stop: no val BLEU gain in {tc.patience} epochs", file=sys.stderr)
                break

    ranked = sorted(history, key=lambda r: r.val_bleu, reverse=True)[: tc.average_best]
    model.load_state_dict(average_state_dicts([run_dir / f"epoch{r.epoch}.pt" for r in ranked]))
    model.eval()
    avg_bleu = bleu(translate_greedy(model, tok, val_src, tc.max_tokens), val_tgt)
    chosen = f"average of epochs {[r.epoch for r in ranked]}"
    if avg_bleu < ranked[0].val_bleu:
        model.load_state_dict(torch.load(run_dir / f"epoch{ranked[0].epoch}.pt", weights_only=True))
        avg_bleu, chosen = ranked[0].val_bleu, f"epoch {ranked[0].epoch}"
    test_src, test_tgt = read_parallel(data, "test_2016_flickr", tc.src_lang, tc.tgt_lang)
    test_bleu = bleu(translate_greedy(model, tok, test_src, tc.max_tokens), test_tgt)
    record = {
        "command": " ".join(["int8mt", *sys.argv[1:]]),
        "train_config": tc.__dict__,
        "model_config": mcfg.to_dict(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "epochs_run": len(history),
        "history": [r.__dict__ for r in history],
        "weights": chosen,
        "val_bleu_greedy": round(avg_bleu, 2),
        "test_2016_flickr_bleu_greedy": round(test_bleu, 2),
        "train_seconds": round(time.time() - t_start),
        "torch": torch.__version__,
    }
    save_model_dir(model, out_dir, spm_file)
    (out_dir / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"saved {out_dir}: {chosen}, val BLEU {avg_bleu:.2f}, test BLEU {test_bleu:.2f}", file=sys.stderr)
    return record
