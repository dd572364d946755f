"""FlexAttention for the LUM on CUDA: the visibility rule of ``trainers.lum.model.visibility`` (packing +
group query) as a FlexAttention block mask, so attention skips the blocks no token may see instead of
materializing a (T, T) boolean mask per row. SDPA with the dense mask stays the CPU path (no FlexAttention
backward on CPU); ``benchmarks/gpu_check.py`` checks that both give the same outputs.

    from trainers.lum.flex import block_mask, flex_forward
    bm = block_mask(batch.seg, batch.kind)               # once per batch (cheap: block-level)
    h = flex_forward(model, batch, bm)                   # == model(batch), hidden states (B, T, D)

Added by the DLRM/GPU-check work as a separate file; ``trainers.lum.model`` is unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .model import QUERY, LumModel

_compiled = {}


def _flex():
    """flex_attention, compiled on CUDA (its fused kernel only exists compiled), eager elsewhere."""
    from torch.nn.attention.flex_attention import flex_attention

    if torch.cuda.is_available():
        if "f" not in _compiled:
            _compiled["f"] = torch.compile(flex_attention, dynamic=False)
        return _compiled["f"]
    return flex_attention


def block_mask(seg: torch.Tensor, kind: torch.Tensor, block_size: int = 128):
    """BlockMask (B, 1 head-group, T, T): same segment and causal, query conditions hidden; self always."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, T = seg.shape
    query = kind == QUERY

    def visible(b, h, q, kv):
        same = (seg[b, q] == seg[b, kv]) & (seg[b, q] >= 0)
        return (same & (kv <= q) & ~query[b, kv]) | (q == kv)

    return create_block_mask(visible, B, None, T, T, device=seg.device, BLOCK_SIZE=block_size)


def flex_forward(model: LumModel, batch, mask) -> torch.Tensor:
    """``model(batch)`` with FlexAttention under ``mask`` in every block: hidden states (B, T, D)."""
    attend = _flex()
    x = F.dropout(model.embed(batch), model.cfg.dropout, model.training)
    for blk in model.blocks:
        B, T, D = x.shape
        q, k, v = blk.qkv(blk.ln1(x)).view(B, T, 3, blk.n_heads, D // blk.n_heads).transpose(1, 3).unbind(2)
        a = attend(q, k, v, block_mask=mask)  # (B, H, T, Dh)
        x = x + F.dropout(blk.proj(a.transpose(1, 2).reshape(B, T, D)), blk.dropout, blk.training)
        x = x + blk.mlp(blk.ln2(x))
    return model.ln_f(x)
