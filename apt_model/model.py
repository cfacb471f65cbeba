"""The APT language model: a causal decoder-only transformer with autopoietic attention.

Autopoietic attention computes the usual scaled dot-product scores per head, then lets the
heads shape each other: the head-averaged score map is passed through a small learned
transform (a learned temperature), and a learned per-head gate mixes that shared map back into
every head before the causal mask and the softmax. The map at (i, j) depends only on positions
i and j, so masking afterwards keeps the model strictly causal. ``use_autopoietic=False`` gives
plain multi-head attention. Input and output embeddings are tied.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from apt_model.config import APTConfig
from apt_model.errors import ConfigError


class AutopoieticAttention(nn.Module):
    """Multi-head causal self-attention whose heads are modulated by their shared score map."""

    def __init__(self, cfg: APTConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.autopoietic = cfg.use_autopoietic
        if self.autopoietic:
            # softplus(0.5413) == 1.0: start at temperature one
            self.log_temperature = nn.Parameter(torch.tensor(0.5413))
            # sigmoid(-2) ~ 0.12: start close to plain attention, let training open the gate
            self.gate = nn.Parameter(torch.full((cfg.n_heads,), -2.0))
        mask = torch.tril(torch.ones(cfg.block_size, cfg.block_size, dtype=torch.bool))
        self.register_buffer("causal", mask.view(1, 1, cfg.block_size, cfg.block_size), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_heads, self.head_dim).transpose(1, 2) for z in (q, k, v))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        mask = self.causal[:, :, :t, :t]
        if self.autopoietic:
            shared = scores.masked_fill(~mask, 0.0).mean(dim=1, keepdim=True)
            shared = shared / (F.softplus(self.log_temperature) + 1e-4)
            g = torch.sigmoid(self.gate).view(1, -1, 1, 1)
            scores = (1 - g) * scores + g * shared
        scores = scores.masked_fill(~mask, float("-inf"))
        att = self.drop(torch.softmax(scores, dim=-1))
        y = (att @ v).transpose(1, 2).contiguous().view(b, t, c)
        return self.drop(self.proj(y))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: APTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = AutopoieticAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.ff = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_ff), nn.GELU(), nn.Linear(cfg.d_ff, cfg.d_model),
                                nn.Dropout(cfg.dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.ff(self.ln2(x))


class APTModel(nn.Module):
    """The APT language model.

    For example::

        model = APTModel(preset("tiny", vocab_size=300)); logits = model(ids)
    """

    def __init__(self, cfg: APTConfig):
        super().__init__()
        if cfg.vocab_size < 1:
            raise ConfigError("config field vocab_size: set it from the tokenizer before building the model")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # tied input/output embeddings
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """Logits ``(B, T, vocab)``; with ``targets``, also the mean cross-entropy loss."""
        b, t = idx.shape
        if t > self.cfg.block_size:
            raise ConfigError(f"sequence of {t} tokens is longer than block_size {self.cfg.block_size}")
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for blk in self.blocks:
            x = blk(x)
        logits = self.head(self.ln_f(x))
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def num_parameters(self) -> int:
        """Distinct parameters (tied weights counted once)."""
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 0.8,
                 top_k: int | None = 20, generator: torch.Generator | None = None,
                 progress=None) -> torch.Tensor:
        """Sample ``max_new_tokens`` continuations of ``idx`` (B, T); ``progress(1)`` after each."""
        for _ in range(max_new_tokens):
            ctx = idx[:, -self.cfg.block_size:]
            logits = self(ctx)[:, -1, :] / max(temperature, 1e-5)
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
            if progress:
                progress(1)
        return idx
