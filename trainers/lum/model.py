"""The Large User Model (LUM paper, sec. 4.1-4.2): config, token encoder, causal transformer, InfoNCE loss.

Reads top to bottom: ``LumConfig`` and ``PRESETS``; id hashing; ``TokenEncoder`` (condition and item tokens
-> width D); ``Block`` (pre-norm attention + MLP); ``LumModel``; the attention visibility mask; the
next-condition-item InfoNCE loss.

A batch (``trainers.lum.packing.Batch``) holds rows of tokens ``[c1, i1, c2, i2, ...]`` of one or more users.
Every token has a kind (pad / condition / item / query condition), a segment (which user in the row) and a
position that restarts per user. One mask rule covers training, packing and group query: a token sees the
earlier tokens of its own segment, except query conditions, which only see themselves. Training asks its
questions the way inference does (``LumConfig.query_tokens``): a hidden query token per pair, with some
condition kinds unset, predicts the pair's item, while the history keeps every condition.

    from trainers.lum.model import LumModel, PRESETS
    model = LumModel(PRESETS["debug"])
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from schemas.tokenize import CONDITION_KINDS

# Token kinds in a batch.
PAD, COND, ITEM, QUERY = 0, 1, 2, 3


class LumConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field("custom", description="preset name, part of the model version")
    # --- model
    d_model: int = Field(64, ge=8, description="transformer width D")
    n_layers: int = Field(2, ge=1, description="transformer blocks")
    n_heads: int = Field(2, ge=1, description="attention heads (d_model must divide)")
    ff_mult: int = Field(4, ge=1, description="MLP hidden size = ff_mult * d_model")
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout in blocks (0 in eval)")
    max_pairs: int = Field(50, ge=1, description="most recent (condition, item) pairs a user sequence keeps")
    item_buckets: int = Field(100_003, ge=16, description="rows of the hashed item-id table (open vocabulary)")
    item_hashes: int = Field(2, ge=1, le=4, description="hash functions per item id, summed: fewer collisions")
    cat_buckets: int = Field(10_007, ge=16, description="rows of the hashed category table")
    cond_buckets: int = Field(10_007, ge=16, description="rows per condition kind (row 0 = 'any')")
    d_item: int = Field(64, ge=4, description="item-id embedding width before projection")
    d_cat: int = Field(16, ge=4, description="category embedding width before projection")
    d_cond: int = Field(16, ge=4, description="per-kind condition embedding width before projection")
    use_conditions: bool = Field(True, description="False: SASRec-style baseline, items only, next-item loss")
    # Real catalogs keep adding items (72-78% of the Taobao sample's ranking targets are absent from its
    # pre-training segment): an item the model never trained on is read as its category alone, so training
    # must show the model category-only items too.
    item_id_dropout: float = Field(0.1, ge=0, lt=1, description="chance an item token or candidate loses its id "
                                                                "embedding in training (category only)")
    # --- loss
    temperature: float = Field(0.07, gt=0, description="InfoNCE temperature on cosine similarity")
    logq: bool = Field(True, description="subtract log Q(candidate) from logits: the sampled-softmax correction")
    neg_samples: int = Field(256, ge=0, description="uniformly sampled negatives per batch, added to in-batch ones")
    # The unconditional question (nothing known about the next item) must be common among training queries:
    # with two informative kinds (behavior, category) 0.75 asks it at 56% of them, 0.5 at 25% (ML-100K, one
    # seed, 100 steps: next-item HR@10 0.143 vs 0.132).
    cond_drop: float = Field(0.75, ge=0, le=1, description="chance each condition kind is set to 'any' in a "
                                                           "training query (or condition token, query_tokens off)")
    query_tokens: bool = Field(True, description="train with a hidden query token per pair (group query in "
                                                 "training) instead of dropping the history's conditions")
    # --- training
    row_len: int = Field(128, ge=4, description="tokens per packed row")
    rows_per_batch: int = Field(16, ge=1, description="packed rows per batch")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay")
    warmup_steps: int = Field(50, ge=0, description="linear learning-rate warm-up")

    @property
    def n_kinds(self) -> int:
        return len(CONDITION_KINDS)

    @property
    def max_positions(self) -> int:  # a sequence plus one group-query position
        return 2 * self.max_pairs + 1

    @property
    def tokens_per_pair(self) -> int:
        """Training tokens per (condition, item) pair: [q, c, i], [c, i] or, items only, [i]."""
        return (3 if self.query_tokens else 2) if self.use_conditions else 1

    @property
    def window_pairs(self) -> int:
        """Pairs per training window: at most ``max_pairs``, and a window fits one packed row."""
        return min(self.max_pairs, self.row_len // self.tokens_per_pair)

    @property
    def context_pairs(self) -> int:
        """Pairs of history inference reads: one less than a training window, so that the group-query token
        (or, items-only, the last item) sits at a position training actually used (a trained window of W pairs
        has condition tokens at 0, 2, ..., 2W-2; a query after W-1 pairs sits at 2W-2)."""
        return max(1, self.window_pairs - 1)


PRESETS: dict[str, LumConfig] = {
    # CPU, seconds: tests (no randomness in a step: runs at any world size follow one process step by step).
    "debug": LumConfig(name="debug", d_model=32, n_layers=2, n_heads=2, max_pairs=32, item_buckets=4099,
                       cat_buckets=257, cond_buckets=257, d_item=32, d_cat=8, d_cond=8, row_len=64,
                       rows_per_batch=8, dropout=0.0, item_id_dropout=0.0, lr=3e-3, warmup_steps=10),
    # CPU, minutes: MovieLens-100K, demo.
    "small": LumConfig(name="small", d_model=64, n_layers=2, n_heads=2, max_pairs=100, item_buckets=16_411,
                       cat_buckets=4099, cond_buckets=4099, d_item=64, d_cat=16, d_cond=16, row_len=256,
                       rows_per_batch=16, dropout=0.2, lr=2e-3),
    # GPU sizes.
    "base": LumConfig(name="base", d_model=256, n_layers=4, n_heads=4, max_pairs=256, item_buckets=1_000_003,
                      d_item=128, d_cat=32, d_cond=32, row_len=1024, rows_per_batch=32, lr=1e-3),
    "large": LumConfig(name="large", d_model=768, n_layers=12, n_heads=12, max_pairs=1024,
                       item_buckets=2_000_003, d_item=256, d_cat=64, d_cond=64, row_len=4096,
                       rows_per_batch=16, lr=3e-4, warmup_steps=2000),
}


# --- Hashing: raw 63-bit ids -> table rows, same on every machine ------------------------------------
_P = 2_147_483_647  # 2**31 - 1 (prime); every product below stays under 2**62, so int64 never overflows
_SEEDS = ((1_103_515_245, 12_345, 0x5BD1E995 % _P), (2_654_435_761 % _P, 40_503, 97_531),
          (1_597_334_677, 3_812_015_801 % _P, 7), (747_796_405, 2_891_336_453 % _P, 1_013_904_223))


def hash_ids(ids: torch.Tensor, buckets: int, seed: int = 0) -> torch.Tensor:
    """Universal hash of non-negative int64 ids into [0, buckets)."""
    a, b, c = _SEEDS[seed]
    lo, hi = (ids & 0xFFFFFFFF) % _P, (ids >> 32) % _P
    return ((lo * a % _P + hi * b % _P + c) % _P) % buckets


# --- Token encoder ----------------------------------------------------------------------------------
class TokenEncoder(nn.Module):
    """Concatenate a token's feature embeddings, then project to D (paper sec. 4.1.2)."""

    def __init__(self, cfg: LumConfig):
        super().__init__()
        self.cfg = cfg
        self.item = nn.Embedding(cfg.item_buckets, cfg.d_item)
        self.cat = nn.Embedding(cfg.cat_buckets, cfg.d_cat)
        self.item_proj = nn.Linear(cfg.d_item + cfg.d_cat, cfg.d_model)
        # One table for all kinds: kind k uses rows [k*B, (k+1)*B); row 0 of each block is "any".
        self.cond = nn.Embedding(cfg.n_kinds * cfg.cond_buckets, cfg.d_cond)
        self.cond_proj = nn.Linear(cfg.n_kinds * cfg.d_cond, cfg.d_model)
        for emb in (self.item, self.cat, self.cond):
            nn.init.normal_(emb.weight, std=0.02)

    def items(self, item_ids: torch.Tensor, cat_ids: torch.Tensor, known: torch.Tensor | None = None) -> torch.Tensor:
        """(...,) raw ids -> (..., D) item-token embeddings. ``known`` (...,) False: the item's id is not used (an
        item never trained on, or id dropout in training), its token is its category alone."""
        cfg = self.cfg
        e = sum(self.item(hash_ids(item_ids, cfg.item_buckets, s)) for s in range(cfg.item_hashes))
        if known is not None:
            e = e * known[..., None].to(e.dtype)
        return self.item_proj(torch.cat([e, self.cat(hash_ids(cat_ids, cfg.cat_buckets, 1))], -1))

    def conditions(self, cond_ids: torch.Tensor) -> torch.Tensor:
        """(..., n_kinds) raw condition ids (0 = any) -> (..., D)."""
        B = self.cfg.cond_buckets
        rows = torch.where(cond_ids == 0, 0, 1 + hash_ids(cond_ids, B - 1, 2))
        rows = rows + torch.arange(self.cfg.n_kinds, device=cond_ids.device) * B
        return self.cond_proj(self.cond(rows).flatten(-2))  # (..., n_kinds*d_cond) -> (..., D)


# --- Transformer ------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, cfg: LumConfig):
        super().__init__()
        self.n_heads, self.dropout = cfg.n_heads, cfg.dropout
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, cfg.ff_mult * cfg.d_model), nn.GELU(),
                                 nn.Linear(cfg.ff_mult * cfg.d_model, cfg.d_model), nn.Dropout(cfg.dropout))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.n_heads, D // self.n_heads).transpose(1, 3).unbind(2)
        # (B, H, T, Dh) each. mask None: plain causal (one user per row, right padding).
        # No attention dropout: on CPU it forces the slow math kernel (residual dropout regularizes instead).
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        x = x + F.dropout(self.proj(a.transpose(1, 2).reshape(B, T, D)), self.dropout, self.training)
        return x + self.mlp(self.ln2(x))


class LumModel(nn.Module):
    def __init__(self, cfg: LumConfig):
        super().__init__()
        if cfg.d_model % cfg.n_heads:
            raise ValueError(f"d_model {cfg.d_model} is not a multiple of n_heads {cfg.n_heads}")
        self.cfg = cfg
        self.tokens = TokenEncoder(cfg)
        self.pos = nn.Embedding(cfg.max_positions, cfg.d_model)
        nn.init.normal_(self.pos.weight, std=0.02)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.d_model)  # user-side output -> item-embedding space

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def embed(self, batch) -> torch.Tensor:
        """Token embeddings of a batch: (B, T, D)."""
        is_cond = (batch.kind == COND) | (batch.kind == QUERY)  # (B, T); the rest use the item encoder
        ids = batch.item[~is_cond]
        items = self.tokens.items(ids, batch.cat[~is_cond], self.id_kept(ids))  # (N_items, D)
        x = items.new_zeros(*batch.kind.shape, self.cfg.d_model)  # (B, T, D)
        x[~is_cond] = items
        x[is_cond] = self.tokens.conditions(batch.cond[is_cond]).to(x.dtype)
        if int(batch.pos.max()) >= self.cfg.max_positions:
            raise ValueError(f"position {int(batch.pos.max())} >= max_positions {self.cfg.max_positions}")
        return x + self.pos(batch.pos)

    def forward(self, batch) -> torch.Tensor:
        """Hidden states (B, T, D) after the final norm."""
        x = F.dropout(self.embed(batch), self.cfg.dropout, self.training)
        mask = visibility(batch.seg, batch.kind) if batch.packed else None  # (B, 1, T, T)
        for block in self.blocks:
            x = block(x, mask)
        return self.ln_f(x)

    def id_kept(self, ids: torch.Tensor) -> torch.Tensor | None:
        """Training only: which of these item tokens keep their id (``item_id_dropout``); None keeps all."""
        p = self.cfg.item_id_dropout
        return torch.rand(ids.shape, device=ids.device) >= p if self.training and p > 0 else None

    def user_vectors(self, h: torch.Tensor) -> torch.Tensor:
        """Outputs at condition tokens -> unit vectors comparable with ``item_vectors`` (..., D), in fp32."""
        with torch.autocast(h.device.type, enabled=False):  # logits need fp32: bf16 cosines are off by ~1e-2
            return F.normalize(self.head(h.float()), dim=-1)

    def item_vectors(self, item_ids: torch.Tensor, cat_ids: torch.Tensor,
                     known: torch.Tensor | None = None) -> torch.Tensor:
        """The item-token embedding e_i as a unit vector (..., D), fp32: what the loss and interest matching use.
        ``known`` False: an item the model never trained on, represented by its category (``item_id_dropout``)."""
        with torch.autocast(item_ids.device.type, enabled=False):
            return F.normalize(self.tokens.items(item_ids, cat_ids, known).float(), dim=-1)


def visibility(seg: torch.Tensor, kind: torch.Tensor) -> torch.Tensor:
    """Boolean attention mask (B, 1, T, T), True = may attend.

    Block-diagonal causal over segments (packing: no user sees another's tokens), and query conditions are
    hidden from every other token (group query: each query sees the shared prefix and itself only).
    Every token sees itself, so padding rows never produce NaN.
    """
    T = seg.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=seg.device).tril()
    eye = torch.eye(T, dtype=torch.bool, device=seg.device)
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] >= 0)  # (B, T, T)
    key_hidden = (kind == QUERY)[:, None, :]
    return ((same & causal & ~key_hidden) | eye)[:, None]


# --- Loss -------------------------------------------------------------------------------------------
def training_outputs(model: LumModel, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """User vectors at trained positions (N, D) and the raw id of the item each must predict (N,)."""
    h = model(batch)  # (B, T, D)
    return model.user_vectors(h[batch.target]), batch.label[batch.target]


def info_nce(model: LumModel, user: torch.Tensor, pos_items: torch.Tensor, cand_items: torch.Tensor,
             cand_cats: torch.Tensor, cand_logq: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """Sampled-softmax InfoNCE of user vectors (N, D) against distinct candidate items (C,), in fp32.

    ``cand_items`` must be sorted and distinct and hold every positive (a positive's duplicates are never
    its negatives). ``cand_logq``: log of each candidate's chance to be among the candidates of a batch;
    subtracting it makes the sampled softmax a consistent estimate of the full softmax (logQ correction).
    """
    with torch.autocast(user.device.type, enabled=False):
        cand = model.item_vectors(cand_items, cand_cats, model.id_kept(cand_items))  # (C, D)
        logits = user.float() @ cand.T / temperature  # (N, C) fp32
        if cand_logq is not None:
            logits = logits - cand_logq.float()
        target = torch.searchsorted(cand_items, pos_items)
        return F.cross_entropy(logits, target)


def in_batch_candidates(batch, logq: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Candidates of a batch without a sampler: its distinct item tokens; logQ estimated from the batch itself
    (an item with share p of the M item tokens is a candidate with chance 1 - (1 - p)^M)."""
    items = batch.kind == ITEM
    ids, cats = batch.item[items], batch.cat[items]
    uniq, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)
    ucats = torch.zeros_like(uniq).scatter_(0, inverse, cats)
    if not logq:
        return uniq, ucats, None
    m = float(counts.sum())
    q = -torch.expm1(m * torch.log1p(-counts.double() / m).clamp(min=-1e30))
    return uniq, ucats, torch.log(q.clamp(min=1e-30)).float()


def lum_loss(model: LumModel, batch) -> torch.Tensor:
    user, pos = training_outputs(model, batch)
    if getattr(batch, "cand_item", None) is not None:
        cand = (batch.cand_item, batch.cand_cat, batch.cand_logq if model.cfg.logq else None)
    else:
        cand = in_batch_candidates(batch, model.cfg.logq)
    return info_nce(model, user, pos, *cand, model.cfg.temperature)


def describe(model: LumModel) -> str:
    c = model.cfg
    return (f"LUM[{c.name}] {model.num_params() / 1e6:.2f}M params, d={c.d_model} layers={c.n_layers} "
            f"heads={c.n_heads} row_len={c.row_len} rows/batch={c.rows_per_batch} "
            f"{'conditions' if c.use_conditions else 'items only (SASRec-style)'}")


def cosine_warmup(step: int, warmup: int, total: int) -> float:
    """Learning-rate factor: linear warm-up, then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))
