"""The reference encoder-decoder Transformer in PyTorch.

Written for ``torch.export``: no data-dependent control flow, and every matrix multiplication is a named
submodule (``nn.Linear`` for projections, :class:`MatMul` for QK^T and softmax·V) so that quantization can
find and replace each one.

Incremental decoding keeps two caches. The cross-attention keys/values are ``[layers, 2, batch, heads,
source_length, head_dim]``. The self-attention cache holds rows that are only appended: ``[layers, 2, N, heads,
head_dim]``, row ``n`` of every layer's keys and values being one decoded position of a hypothesis (row 0 holds
none), and ``history[batch, T + 1]`` (int64) names the row of each position of hypothesis ``b``, the last one (the
step's own, not yet written) being 0. A step appends one row per hypothesis; reordering beams or dropping finished
sentences only reorders ``history``'s rows, and no step copies the cache it has.

Each cache is a tuple: the keys/values alone, float32, or int8 when every decoder attention's QK^T and softmax·V
quantize their key/value operand with a fixed scale (static ranges); or, with run-time ranges, the int8
keys/values and their float32 scales, one per position and head (``[..., 1]`` in place of ``head_dim``): each
key or value is quantized once, when it is written (:class:`Quantized`).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .config import ModelConfig

NEG_INF = -1e9


def sinusoidal_table(positions: int, dim: int) -> Tensor:
    """Marian's positions: sines in the first half of each vector, cosines in the second (not interleaved)."""
    pos = torch.arange(positions, dtype=torch.float64)[:, None]
    freq = torch.pow(10000.0, torch.arange(0, dim, 2, dtype=torch.float64) / dim)[None, :]
    return torch.cat([torch.sin(pos / freq), torch.cos(pos / freq)], dim=1)[:, :dim].float()


class Quantized(NamedTuple):
    """An int8 tensor ``q`` and its float32 ``scale``, which broadcasts to it: keys or values quantized per
    position, as a cache holds them with run-time ranges."""

    q: Tensor
    scale: Tensor

    def transpose(self, dim0: int, dim1: int) -> "Quantized":
        return Quantized(self.q.transpose(dim0, dim1), self.scale.transpose(dim0, dim1))


Cached = Tensor | Quantized  # a key or value tensor as a cache holds it


class MatMul(nn.Module):
    """``a @ b`` between two activations, as a module so that it can be named and quantized;
    ``right_positions``: the axis of ``b`` that runs over positions (-1 for QK^T's K^T, -2 for softmax·V's V)."""

    def __init__(self, right_positions: int) -> None:
        super().__init__()
        self.right_positions = right_positions

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return torch.matmul(a, b)


def _activation(name: str) -> nn.Module:
    return {"relu": nn.ReLU(), "gelu": nn.GELU(), "swish": nn.SiLU()}[name]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        self.scaling = cfg.head_dim ** -0.5
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.k_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.v_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.qk = MatMul(right_positions=-1)
        self.av = MatMul(right_positions=-2)
        self.dropout = nn.Dropout(cfg.dropout)

    def split_heads(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return x.reshape(b, t, self.heads, self.head_dim).transpose(1, 2)

    def project_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.split_heads(self.k_proj(x)), self.split_heads(self.v_proj(x))

    def attend(self, x: Tensor, k: Cached, v: Cached, bias: Tensor | None) -> Tensor:
        """Queries from ``x`` [B, T, D] attend over ``k``/``v`` [B, H, S, Dh] (float32, or :class:`Quantized` for
        quantized products); ``bias`` broadcasts to [B, H, T, S]."""
        q = self.split_heads(self.q_proj(x) * self.scaling)
        scores = self.qk(q, k.transpose(2, 3))
        if bias is not None:
            scores = scores + bias
        probs = self.dropout(torch.softmax(scores, dim=-1))
        ctx = self.av(probs, v).transpose(1, 2)
        return self.out_proj(ctx.reshape(x.shape[0], x.shape[1], self.heads * self.head_dim))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.d_model, cfg.ffn_dim)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.d_model)
        self.act = _activation(cfg.activation)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.dropout(self.act(self.fc1(x))))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.d_model)
        self.ffn = FeedForward(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, src_bias: Tensor) -> Tensor:
        k, v = self.self_attn.project_kv(x)
        x = self.self_attn_layer_norm(x + self.dropout(self.self_attn.attend(x, k, v, src_bias)))
        return self.final_layer_norm(x + self.dropout(self.ffn(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.d_model)
        self.cross_attn = Attention(cfg)
        self.cross_attn_layer_norm = nn.LayerNorm(cfg.d_model)
        self.ffn = FeedForward(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, self_k: Cached, self_v: Cached, self_bias: Tensor | None,
                cross_k: Cached, cross_v: Cached, src_bias: Tensor) -> Tensor:
        x = self.self_attn_layer_norm(x + self.dropout(self.self_attn.attend(x, self_k, self_v, self_bias)))
        x = self.cross_attn_layer_norm(x + self.dropout(self.cross_attn.attend(x, cross_k, cross_v, src_bias)))
        return self.final_layer_norm(x + self.dropout(self.ffn(x)))


class Transformer(nn.Module):
    """Encoder-decoder. Source, target and output embeddings are one table by default; with
    ``shared_embeddings`` false the decoder has its own (``decoder_embed_tokens``), and with ``tied_output``
    false the logits projection has its own weight."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=cfg.pad_id)
        nn.init.normal_(self.embed_tokens.weight, std=cfg.d_model ** -0.5)
        if not cfg.shared_embeddings:
            self.decoder_embed_tokens = nn.Embedding(cfg.output_vocab_size, cfg.d_model, padding_idx=cfg.pad_id)
            nn.init.normal_(self.decoder_embed_tokens.weight, std=cfg.d_model ** -0.5)
        self.register_buffer("positions", sinusoidal_table(cfg.max_positions, cfg.d_model), persistent=False)
        self.embed_scale = math.sqrt(cfg.d_model) if cfg.scale_embedding else 1.0
        self.encoder_layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        self.decoder_layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.decoder_layers))
        self.lm_head = nn.Linear(cfg.d_model, cfg.output_vocab_size)
        if cfg.tied_output:
            self.lm_head.weight = self.target_embeddings.weight
        nn.init.zeros_(self.lm_head.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    # -- pieces shared by training and incremental decoding --------------------------------------
    def source_bias(self, src: Tensor) -> Tensor:
        """Additive mask [B, 1, 1, S]: 0 for tokens, -1e9 for padding."""
        return (src == self.cfg.pad_id).to(torch.float32)[:, None, None, :] * NEG_INF

    @property
    def target_embeddings(self) -> nn.Module:
        """The decoder's token embedding table (the source one when shared)."""
        return self.embed_tokens if self.cfg.shared_embeddings else self.decoder_embed_tokens

    def embed(self, tokens: Tensor, positions: Tensor, target: bool = False) -> Tensor:
        """Scaled token embeddings (source, or ``target``) plus the sinusoids of ``positions`` (int64 [T])."""
        pos = torch.index_select(self.positions, 0, positions)
        table = self.target_embeddings if target else self.embed_tokens
        return self.dropout(table(tokens) * self.embed_scale + pos)

    def encode(self, src: Tensor) -> Tensor:
        """Source tokens [B, S] -> encoder output [B, S, D]."""
        bias = self.source_bias(src)
        x = self.embed(src, torch.arange(src.shape[1], device=src.device))
        for layer in self.encoder_layers:
            x = layer(x, bias)
        return x

    def cross_kv(self, memory: Tensor) -> tuple[Tensor, ...]:
        """Every decoder layer's cross-attention keys and values, [L, 2, B, H, S, Dh] (and their scales), computed
        once per sentence: the cross-attention cache (see the module docstring)."""
        return _stack([self._store(layer.cross_attn, *layer.cross_attn.project_kv(memory))
                       for layer in self.decoder_layers])

    # -- key/value caches ------------------------------------------------------------------------
    def _attention_products(self) -> list[nn.Module]:
        return [m for layer in self.decoder_layers for a in (layer.self_attn, layer.cross_attn) for m in (a.qk, a.av)]

    @property
    def cache_dtype(self) -> torch.dtype:
        """int8 if every decoder attention can store its keys and values as int8 (see the module docstring)."""
        int8 = all(getattr(m, "stores_int8", False) for m in self._attention_products())
        return torch.int8 if int8 else torch.float32

    @property
    def cache_dtype_name(self) -> str:
        """:attr:`cache_dtype` as NumPy and TVM spell it (``int8`` or ``float32``)."""
        return str(self.cache_dtype).removeprefix("torch.")

    @property
    def cache_scales(self) -> bool:
        """True if the int8 caches hold a scale per position and head (run-time ranges)."""
        return self.cache_dtype == torch.int8 and all(m.stores_scales for m in self._attention_products())

    def _store(self, attn: Attention, k: Tensor, v: Tensor) -> tuple[Cached, Cached]:
        if self.cache_dtype != torch.int8:
            return k, v
        return attn.qk.store(k), attn.av.store(v)

    @staticmethod
    def _load(attn: Attention, k: Cached, v: Cached) -> tuple[Cached, Cached]:
        """Cached keys and values as ``attn`` takes them: int8 ones with a fixed scale dequantized (the
        quantizer of the product gives them back exactly)."""
        if isinstance(k, Quantized) or k.dtype != torch.int8:
            return k, v
        return attn.qk.load(k), attn.av.load(v)

    # -- training ------------------------------------------------------------------------------
    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        """Teacher-forced logits [B, T, V] for decoder inputs ``tgt_in`` [B, T]."""
        memory = self.encode(src)
        src_bias = self.source_bias(src)
        t = tgt_in.shape[1]
        causal = torch.triu(torch.full((t, t), NEG_INF, device=src.device), diagonal=1)
        x = self.embed(tgt_in, torch.arange(t, device=src.device), target=True)
        for layer in self.decoder_layers:
            k, v = layer.self_attn.project_kv(x)
            ck, cv = layer.cross_attn.project_kv(memory)
            x = layer(x, k, v, causal, ck, cv, src_bias)
        return self.lm_head(x)

    # -- incremental decoding --------------------------------------------------------------------
    def decode_step(self, tokens: Tensor, step: Tensor, cache: tuple[Tensor, ...], history: Tensor,
                    cross: tuple[Tensor, ...], src: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        """One decoder step.

        tokens [B, 1] (last output), step [1] (its position T), the self-attention ``cache`` (rows [L, 2, N, H, Dh],
        and their scales [L, 2, N, H, 1]) and ``history`` [B, T + 1] (see the module docstring), ``cross`` from
        :meth:`cross_kv`, src [B, S] (for the padding mask). Returns logits [B, V] and each layer's new key and
        value ([B, H, 1, Dh] each: layer 0's key, its value, layer 1's key, ...; then, with scales, their scales
        [B, H, 1, 1] in the same order), to append to ``cache`` (:meth:`append_rows`).

        Each layer's keys (and values) of positions 0..T are one gather from the layer's rows that takes position T
        from the new key instead (``where``): the compiler makes it one kernel, which reads the past keys once and
        writes them once, where concatenating the past and the new key would copy them twice.
        """
        src_bias = self.source_bias(src)
        x = self.embed(tokens, step, target=True)
        # the row of cache[0][i, 0].reshape(-1, Dh) that holds head h of hypothesis b's position t
        rows = history[:, None, :] * self.cfg.heads + torch.arange(self.cfg.heads)[None, :, None]
        is_past = (history > 0)[:, None, :, None]

        def gathered(i: int, j: int, new: Cached) -> Cached:
            parts = [torch.where(is_past, c[i, j].reshape(-1, c.shape[-1])[rows], n)
                     for c, n in zip(cache, _parts(new))]
            return Quantized(*parts) if isinstance(new, Quantized) else parts[0]

        new_kv = []
        for i, layer in enumerate(self.decoder_layers):
            k_new, v_new = self._store(layer.self_attn, *layer.self_attn.project_kv(x))
            new_kv += [k_new, v_new]
            k, v = self._load(layer.self_attn, gathered(i, 0, k_new), gathered(i, 1, v_new))
            cross_k, cross_v = self._load(layer.cross_attn, *(_cached(cross, i, j) for j in (0, 1)))
            x = layer(x, k, v, None, cross_k, cross_v, src_bias)
        return self.lm_head(x[:, 0]), tuple(part for parts in zip(*map(_parts, new_kv)) for part in parts)

    def empty_cache(self, batch: int) -> tuple[tuple[Tensor, ...], Tensor]:
        """The self-attention cache and ``history`` before the first step of ``batch`` hypotheses: one row, of
        zeros, that no position names (see :meth:`decode_step`)."""
        c = self.cfg
        rows = torch.zeros(c.decoder_layers, 2, 1, c.heads, c.head_dim, dtype=self.cache_dtype)
        scales = (torch.zeros(c.decoder_layers, 2, 1, c.heads, 1),) if self.cache_scales else ()
        return (rows, *scales), torch.zeros(batch, 1, dtype=torch.int64)

    @staticmethod
    def append_rows(cache: tuple[Tensor, ...], history: Tensor,
                    new_kv: tuple[Tensor, ...]) -> tuple[tuple[Tensor, ...], Tensor]:
        """The caches after a step that returned ``new_kv`` (a reference implementation: it copies the rows;
        the runtime writes them into a preallocated buffer)."""
        layers, start, batch = cache[0].shape[0], cache[0].shape[2], history.shape[0]
        planes = 2 * layers
        grown = tuple(torch.cat([c, torch.stack(new_kv[k * planes:(k + 1) * planes]).reshape(
            layers, 2, batch, *c.shape[3:])], dim=2) for k, c in enumerate(cache))
        return grown, Transformer.next_history(history, start)

    @staticmethod
    def next_history(history: Tensor, start: int) -> Tensor:
        """``history`` after a step whose rows were written from row ``start`` on (one per hypothesis, in order)."""
        written = torch.cat([history[:, :-1], torch.arange(start, start + len(history))[:, None]], dim=1)
        return torch.cat([written, torch.zeros_like(history[:, :1])], dim=1)


def _parts(cached: Cached) -> tuple[Tensor, ...]:
    """The tensors of a cached key or value: itself, or its int8 values and their scales."""
    return tuple(cached) if isinstance(cached, Quantized) else (cached,)


def _cached(cache: tuple[Tensor, ...], layer: int, which: int) -> Cached:
    """Layer ``layer``'s keys (``which`` 0) or values (1) of a cross-attention cache."""
    parts = [c[layer, which] for c in cache]
    return Quantized(*parts) if len(parts) == 2 else parts[0]


def _stack(stored: list[tuple[Cached, Cached]]) -> tuple[Tensor, ...]:
    """Each layer's (keys, values) as one cache tuple of [L, 2, ...] tensors."""
    per_layer = [[_parts(kv) for kv in pair] for pair in stored]
    return tuple(torch.stack([torch.stack([k[p], v[p]]) for k, v in per_layer]) for p in range(len(per_layer[0][0])))
