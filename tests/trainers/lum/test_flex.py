"""The FlexAttention block mask expresses the same visibility rule as the dense mask: on CPU (forward only:
FlexAttention has no CPU backward) ``flex_forward`` equals ``model(batch)`` for packed and group-query batches."""

from __future__ import annotations

import numpy as np
import torch

from schemas.tokenize import CONDITION_KINDS
from trainers.lum.flex import block_mask, flex_forward
from trainers.lum.model import PRESETS, LumModel
from trainers.lum.packing import Seq, group_query_batch, make_batch, pack_rows, to_tokens


def test_flex_forward_matches_the_dense_mask_path():
    rng = np.random.default_rng(0)
    K = len(CONDITION_KINDS)
    seqs = [Seq(u, rng.integers(0, 5, (n, K)), rng.integers(1, 10**12, n), rng.integers(1, 50, n))
            for u, n in enumerate(rng.integers(3, 20, 12))]
    cfg = PRESETS["debug"]
    torch.manual_seed(0)
    model = LumModel(cfg).eval()
    runs = [to_tokens(s) for s in seqs]
    packed = make_batch(runs, pack_rows([len(r) for r in runs], cfg.row_len), cfg.row_len)
    gq, _ = group_query_batch(runs, rng.integers(0, 5, (8, K)), 128)
    with torch.no_grad():
        for b in (packed, gq):
            ref, got = model(b), flex_forward(model, b, block_mask(b.seg, b.kind))
            assert (ref - got).abs().max() < 1e-4
            # and the rule matters: without the mask the outputs differ
            from torch.nn.attention.flex_attention import create_block_mask

            full = create_block_mask(lambda b_, h, q, kv: kv <= q, b.seg.shape[0], None, b.seg.shape[1],
                                     b.seg.shape[1], device="cpu")
            assert (ref - flex_forward(model, b, full)).abs().max() > 1e-3
