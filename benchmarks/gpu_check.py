"""GPU check: the CUDA/bf16 paths measured and checked against the CPU reference, in a few minutes on one GPU.

    make gpu-check                      # = .venv/bin/python benchmarks/gpu_check.py
    .venv/bin/python benchmarks/gpu_check.py [--json OUT] [--steps 30] [--peak-tflops 989]

1. Correctness (exit 1 on mismatch): the LUM ``debug`` model on a small packed batch and a group-query batch,
   FlexAttention block masks on CUDA (``trainers.lum.flex``) in fp32 and bf16 against SDPA + dense mask on CPU
   (the reference path), and the group-query user vectors (what refresh publishes).
2. LUM pre-training, ``base`` preset, bf16 autocast, packed rows with FlexAttention: tokens/s and model FLOPs
   utilisation (6 x non-embedding parameters + causal attention FLOPs per token, over ``--peak-tflops``:
   default by device name, H100/H200 989 dense bf16 TFLOP/s).
3. Refresh: users/s answering K=8 conditions per user with group query (``base``).
4. DLRM: examples/s at batch 8192 with the tables on the GPU (TorchRec DMP, ``base`` preset, LUM features).

Without CUDA it prints why and exits 2 without measuring anything.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}


def _seqs(n_users: int, lengths: tuple[int, int], seed: int = 0):
    from schemas.tokenize import CONDITION_KINDS
    from trainers.lum.packing import Seq

    rng = np.random.default_rng(seed)
    K = len(CONDITION_KINDS)
    return [Seq(u, rng.integers(0, 50, (n, K)), rng.integers(1, 2**62, n), rng.integers(1, 500, n))
            for u, n in enumerate(rng.integers(*lengths, n_users))]


def check_outputs(dev) -> list[str]:
    """Packed and group-query outputs on the GPU (FlexAttention) vs the CPU reference; returns failures."""
    import torch

    from trainers.lum.flex import block_mask, flex_forward
    from trainers.lum.model import PRESETS, LumModel
    from trainers.lum.packing import group_query_batch, make_batch, pack_rows, to_tokens
    from trainers.lum.refresh import condition_outputs

    cfg = PRESETS["debug"]
    torch.manual_seed(0)
    cpu_model = LumModel(cfg).eval()
    gpu_model = LumModel(cfg).eval()
    gpu_model.load_state_dict(cpu_model.state_dict())
    gpu_model.to(dev)
    seqs = _seqs(24, (3, 30))
    runs = [to_tokens(s) for s in seqs]
    packed = make_batch(runs, pack_rows([len(r) for r in runs], cfg.row_len), cfg.row_len)
    conds = np.random.default_rng(1).integers(0, 50, (8, packed.cond.shape[-1]))
    gq, _ = group_query_batch(runs, conds, 2 * cfg.max_pairs + 8)
    failures = []
    with torch.no_grad():
        for name, batch in (("packed", packed), ("group query", gq)):
            ref = cpu_model(batch)
            real = batch.seg >= 0
            b = batch.to(dev)
            for dtype, tol in ((torch.float32, 2e-3), (torch.bfloat16, 6e-2)):
                with torch.autocast("cuda", dtype=dtype, enabled=dtype is torch.bfloat16):
                    got = flex_forward(gpu_model, b, block_mask(b.seg, b.kind)).float().cpu()
                err = float((got - ref)[real].abs().max())
                ok = err <= tol
                print(f"  {name:12s} {str(dtype).split('.')[-1]:8s} max |GPU flex - CPU SDPA| = {err:.2e} "
                      f"(tolerance {tol:.0e}) {'ok' if ok else 'MISMATCH'}")
                if not ok:
                    failures.append(f"{name} {dtype}: {err:.2e} > {tol:.0e}")
        ref_u = condition_outputs(cpu_model, seqs, conds, device="cpu")
        got_u = condition_outputs(gpu_model, seqs, conds, device=str(dev))
        err = float((got_u - ref_u).abs().max())
        print(f"  refresh (SDPA on GPU vs CPU) user vectors: max diff {err:.2e} {'ok' if err <= 2e-3 else 'MISMATCH'}")
        if err > 2e-3:
            failures.append(f"refresh user vectors: {err:.2e}")
    return failures


def bench_pretrain(dev, steps: int, peak_tflops: float) -> dict:
    import torch

    from trainers.lum.data import train_batches
    from trainers.lum.flex import block_mask, flex_forward
    from trainers.lum.model import PRESETS, LumModel, info_nce
    from trainers.lum.model import ITEM
    from trainers.lum.pretrain import make_optimizer

    cfg = PRESETS["base"]
    model = LumModel(cfg).to(dev)
    opt = make_optimizer(model)
    batches = train_batches(_seqs(4000, (20, cfg.max_pairs)), cfg)

    def step(batch):
        b = batch.to(dev)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            h = flex_forward(model, b, block_mask(b.seg, b.kind))
            at = b.target[:, :-1]
            user = model.user_vectors(h[:, :-1][at])
            items = b.kind == ITEM
            loss = info_nce(model, user, b.item[:, 1:][at], b.item[items], b.cat[items], cfg.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return b.real_tokens

    for _ in range(3):  # compile + warm up
        step(next(batches))
    torch.cuda.synchronize()
    t, tokens = time.perf_counter(), 0
    for _ in range(steps):
        tokens += step(next(batches))
    torch.cuda.synchronize()
    secs = time.perf_counter() - t
    emb = sum(p.numel() for n, p in model.named_parameters() if isinstance(dict(model.named_modules()).get(
        n.rsplit(".", 1)[0]), torch.nn.Embedding))
    dense = model.num_params() - emb
    T = cfg.row_len  # causal attention over a row: ~T/2 keys per query; QK^T and AV, forward + backward
    flops_per_token = 6 * dense + 6 * cfg.n_layers * cfg.d_model * T
    tps = tokens / secs
    return {"preset": "base", "tokens_per_s": tps, "mfu": tps * flops_per_token / (peak_tflops * 1e12),
            "params": model.num_params(), "non_embedding_params": dense, "steps": steps}


def bench_refresh(dev, users: int) -> dict:
    import torch

    from trainers.lum.model import PRESETS, LumModel
    from trainers.lum.refresh import condition_outputs

    cfg = PRESETS["base"]
    model = LumModel(cfg).to(dev).eval()
    seqs = _seqs(users, (20, cfg.max_pairs), seed=2)
    conds = np.random.default_rng(3).integers(0, 50, (8, seqs[0].conds.shape[1]))  # K=8 conditions
    with torch.autocast("cuda", dtype=torch.bfloat16):
        condition_outputs(model, seqs[:256], conds, device=str(dev))  # warm up
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = condition_outputs(model, seqs, conds, users_per_batch=512, device=str(dev))
        torch.cuda.synchronize()
    return {"users_per_s": users / (time.perf_counter() - t), "K": 8, "users": users, "shape": list(out.shape)}


def bench_dlrm(dev, batches: int, B: int = 8192) -> dict:
    import torch

    from trainers.dlrm.model import DLRMConfig
    from trainers.dlrm.synthetic import synthetic_examples
    from trainers.dlrm.train import Trainer

    from schemas.topics import TRAINING_EXAMPLES

    exs = [TRAINING_EXAMPLES.decode(TRAINING_EXAMPLES.encode(e))
           for e in synthetic_examples(B * 4, seed=0, lum_dim=32, users=50_000, items=200_000)]
    trainer = Trainer(DLRMConfig.preset("base", features="lum"), device=dev)
    fbs = [exs[i:i + B] for i in range(0, len(exs), B)]
    trainer.train_batch(fbs[0])
    torch.cuda.synchronize()
    t, n = time.perf_counter(), 0
    for i in range(batches):
        trainer.train_batch(fbs[1 + i % (len(fbs) - 1)] if len(fbs) > 1 else fbs[0], admitted=True)
        n += B
    torch.cuda.synchronize()
    return {"batch": B, "examples_per_s": n / (time.perf_counter() - t), "note": "featurize + step, tables on GPU"}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", metavar="OUT")
    ap.add_argument("--steps", type=int, default=30, help="timed pre-training steps")
    ap.add_argument("--peak-tflops", type=float, help="dense bf16 peak of this GPU (default: by name)")
    args = ap.parse_args()
    from schemas.logs import setup_logging

    setup_logging("WARNING")  # also drops fbgemm/torchrec per-table INFO dumps
    try:
        import torch
    except ImportError as e:
        print(f"gpu_check: torch is not importable ({e})", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device (torch {torch.__version__}, torch.cuda.is_available() is False): "
              "nothing measured. Run it on a GPU host with the CUDA builds of torch and fbgemm-gpu.",
              file=sys.stderr)
        return 2
    dev = torch.device("cuda", 0)
    name = torch.cuda.get_device_name(dev)
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    if peak is None:
        print(f"gpu_check: unknown peak for {name!r}; pass --peak-tflops", file=sys.stderr)
        return 2
    print(f"# GPU check on {name} (torch {torch.__version__}, peak {peak:.0f} bf16 TFLOP/s)")
    t0 = time.perf_counter()
    print("## outputs: GPU (FlexAttention) vs CPU reference (SDPA + dense mask)")
    failures = check_outputs(dev)
    res = {"device": name, "peak_tflops": peak, "check_failures": failures}
    print("## throughput")
    res["pretrain"] = p = bench_pretrain(dev, args.steps, peak)
    res["refresh"] = r = bench_refresh(dev, 20_000)
    res["dlrm"] = d = bench_dlrm(dev, 20)
    print("| measure | value |\n|---|---|")
    print(f"| LUM pre-training, base, bf16, packed + FlexAttention | {p['tokens_per_s']:,.0f} tokens/s, "
          f"MFU {100 * p['mfu']:.1f}% ({p['non_embedding_params'] / 1e6:.1f}M non-embedding params) |")
    print(f"| refresh, base, K=8 group query, bf16 | {r['users_per_s']:,.0f} users/s |")
    print(f"| DLRM, base, batch 8192, GPU tables (featurize + step) | {d['examples_per_s']:,.0f} examples/s |")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    if failures:
        print("gpu_check: GPU outputs differ from the CPU reference: " + "; ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
