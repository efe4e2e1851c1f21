"""Greedy decoding with the PyTorch model (the reference the compiled bundle is compared with)."""
from __future__ import annotations

import torch

from ..data import iterate_batches, pad_batch
from ..tokenizer import MarianTokenizer, Tokenizer
from .transformer import Transformer


@torch.no_grad()
def greedy_decode(model: Transformer, src: torch.Tensor, max_len: int) -> list[list[int]]:
    """Token ids (EOS excluded) for each row of ``src`` [B, S], using the incremental decoder step."""
    cfg = model.cfg
    batch = src.shape[0]
    cross = model.cross_kv(model.encode(src))
    cache, history = model.empty_cache(batch)
    tokens = torch.full((batch, 1), cfg.decoder_start_id, dtype=torch.int64)
    out = torch.zeros((batch, 0), dtype=torch.int64)
    done = torch.zeros(batch, dtype=torch.bool)
    for step in range(max_len):
        logits, new_kv = model.decode_step(tokens, torch.tensor([step]), cache, history, cross, src)
        cache, history = model.append_rows(cache, history, new_kv)
        nxt = logits.argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, cfg.pad_id), nxt)
        out = torch.cat([out, nxt[:, None]], 1)
        done |= nxt == cfg.eos_id
        tokens = nxt[:, None]
        if bool(done.all()):
            break
    return [row[: row.index(cfg.eos_id)] if cfg.eos_id in row else row for row in out.tolist()]


def translate_greedy(model: Transformer, tok: Tokenizer | MarianTokenizer, sources: list[str], max_tokens: int,
                     batch_size: int = 64) -> list[str]:
    """Greedy translations of ``sources`` in batches of similar length (output limit 1.5 * source + 10, at most
    the model's positions)."""
    ids = tok.encode_batch(sources, max_tokens)
    out: list[str] = [""] * len(ids)
    for idx in iterate_batches(ids, batch_size):
        src = torch.from_numpy(pad_batch([ids[i] for i in idx], model.cfg.pad_id))
        hyps = greedy_decode(model, src, max_len=min(int(1.5 * src.shape[1]) + 10, model.cfg.max_positions))
        for i, h in zip(idx, hyps):
            out[i] = tok.decode(h)
    return out
