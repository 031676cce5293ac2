"""Teacher-cache benchmark: bytes per row on disk, write cost per row, read throughput.

    python bench/cache_bench.py [--quick]      # writes bench/results/cache_bench.json

Realistic inputs at the real Qwen2.5 vocabulary (V = 151,936 logit columns) and k = 64: per row a peaked
distribution (top-1 probability ~ Beta with median 0.8, a Zipf-like head, a log-normal tail over the whole
vocabulary holding ~6% of the mass) whose statistics are printed so they can be checked. Head token ids are
drawn with a Zipf-like preference for small ids (BPE ids roughly follow merge order, i.e. frequency); tail
ranks are random. Hidden states: bf16 Gaussian at D = 3584 with log-normal per-channel scales and a few
outlier channels (real ones compress no better: they are near-incompressible either way).

What "overhead" means here. Stage 1 does, per supervised row: the teacher forward (GPU), top-k of the full
log-softmax (GPU, inside `topk_from_hidden`), then encoding + Zarr write (CPU). Only the last two are cache
work. This machine has no GPU, so the bench measures on the CPU: top-k extraction, encoding + write, and the
lm_head matmul at the 7B shape (3584 x 152,064), whose FLOP rate gives a same-hardware estimate of a full 7B
forward (2 x 7.6e9 FLOP/token). It reports (a) the CPU write path against that CPU forward estimate and (b)
the CPU write path against an *assumed* GPU forward rate (7B bf16 prefill on an RTX 4090), since there the
write path runs on the otherwise idle CPU and is the only part that can slow the GPU loop. Rows are counted
as tokens (every token supervised): with ~50% supervised tokens the real overhead per token is half.
"""
import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from cache import CacheWriter, open_cache  # noqa: E402
from pipeline.topk import topk_logprobs  # noqa: E402

V, K, D = 151_936, 64, 3584
PARAMS_7B, LM_HEAD_V = 7.6e9, 152_064
GPU_TOK_S = 3000.0  # assumed 7B bf16 prefill on a 4090: ~50 TFLOP/s effective / 15.2 GFLOP per token
TARGET_BYTES, TARGET_OVERHEAD = 128, 0.10


def synth_logits(n: int, gen: torch.Generator) -> torch.Tensor:
    """(n, V) float32 logits of peaked teacher-like distributions (see module docstring)."""
    p1 = torch.distributions.Beta(3.106, 1.0).sample((n,))  # median 0.5 ** (1 / 3.106) = 0.80
    tail = (1 - p1) * torch.distributions.Beta(2.0, 6.0).sample((n,))  # mean ~6% outside the head
    head_w = torch.arange(1, 64, dtype=torch.float32) ** -1.2  # ranks 2..64, Zipf-like
    head = (1 - p1 - tail)[:, None] * head_w / head_w.sum()
    z = torch.exp(2.0 * torch.randn(n, V, generator=gen))  # log-normal tail weights over the vocabulary
    p = tail[:, None] * z / z.sum(1, keepdim=True)
    # 64 distinct head ids, preferring small ids (Gumbel top-k over log-weights -log(id + 100))
    gumbel = -torch.log(-torch.log(torch.rand(n, V, generator=gen)))
    keys = -torch.log(torch.arange(V, dtype=torch.float32) + 100) + gumbel
    ids = keys.topk(64, dim=1).indices
    p.scatter_(1, ids, torch.cat([p1[:, None], head], 1))
    return torch.log(p) + 3.0 * torch.randn(n, 1, generator=gen)  # logits = log p + a per-row constant


def sequences(n_rows: int, rng) -> tuple[list, list]:
    """Alpaca-like sequences (64..512 tokens, the last ~45% supervised) holding exactly n_rows rows."""
    ids, sup, total = [], [], 0
    while total < n_rows:
        L = int(rng.integers(64, 513))
        r = min(int(L * rng.uniform(0.3, 0.6)), n_rows - total, L - 1)
        m = np.zeros(L, bool)
        m[L - 1 - r:L - 1] = True  # row j predicts token j+1: the response's tokens, never past the end
        ids.append(rng.integers(0, V, L).astype(np.int32))
        sup.append(m)
        total += r
    return ids, sup


def dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def write_store(path, rows, lp_dtype, hidden=None, shard_rows=65536, background=False, forward_s_per_row=0.0,
                batch=4096):
    """Create + write + close; returns (create s, write s incl. close, writer, s spent in the loop).

    forward_s_per_row > 0 sleeps that long per row before each batch: a stand-in for the GPU forward, during
    which Stage 1's main thread waits on CUDA (GIL released) and a background shard write can proceed.
    """
    n = len(rows[0])
    rng = np.random.default_rng(0)
    ids, sup = sequences(n, rng)
    t0 = time.perf_counter()
    w = CacheWriter.create_or_resume(
        path, sample_ids=[f"{i:016x}" for i in range(len(ids))], input_ids_per_seq=ids, supervised_per_seq=sup,
        k=K, logprob_dtype=lp_dtype, hidden_size=None if hidden is None else D,
        hidden_dtype=None if hidden is None else "bf16", provenance={"bench": True}, shard_rows=shard_rows,
        background=background)
    t1 = time.perf_counter()
    with w:
        for a in range(0, n, batch):  # Stage 1 hands over one teacher batch at a time
            if forward_s_per_row:
                time.sleep(forward_s_per_row * min(batch, n - a))
            w.write_rows(a, rows[0][a:a + batch], rows[1][a:a + batch], rows[2][a:a + batch],
                         None if hidden is None else hidden[a:a + batch])
        t_loop = time.perf_counter() - t1
    return t1 - t0, time.perf_counter() - t1, w, t_loop


def read_bench(path, fields, batch, seconds, rng) -> dict:
    c = open_cache(path)
    n_seq, rows, toks, calls = len(c), 0, 0, 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        got = c.read_many(rng.choice(n_seq, size=min(batch, n_seq), replace=False), fields)
        rows += sum(len(g["tail_logmass"]) for g in got)
        toks += sum(len(g["input_ids"]) for g in got)
        calls += 1
    dt = time.perf_counter() - t0
    return {"rows_per_s": rows / dt, "tokens_per_s": toks / dt, "ms_per_batch": 1e3 * dt / calls, "batches": calls}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rows (~30 s instead of ~1-2 min)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/cache_bench.json"))
    args = ap.parse_args()
    n_logit, n_hidden, read_s = (2048, 4096, 2.0) if args.quick else (8192, 16384, 5.0)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    res = {"config": {"V": V, "k": K, "D": D, "logit_rows": n_logit, "hidden_rows": n_hidden,
                      "torch_threads": torch.get_num_threads(), "quick": args.quick}}

    # 1. synthesise teacher logits and extract top-k (timed: part of the per-row cache work)
    t_topk, parts = 0.0, []
    for a in range(0, n_logit, 256):
        logits = synth_logits(min(256, n_logit - a), gen)
        t0 = time.perf_counter()
        parts.append(topk_logprobs(logits, K, V))
        t_topk += time.perf_counter() - t0
    ids, lp, tail = (torch.cat(x) for x in zip(*parts))
    p = lp.exp()
    stats = {"median_top1_prob": float(p[:, 0].median()), "mean_top1_prob": float(p[:, 0].mean()),
             "mean_topk_mass": float(p.sum(1).mean()), "median_topk_mass": float(p.sum(1).median()),
             "mean_tail_logmass": float(tail.mean())}
    res["teacher_stats"] = stats
    print("synthetic teacher: median top-1 p {median_top1_prob:.3f} (mean {mean_top1_prob:.3f}), top-64 mass "
          "mean {mean_topk_mass:.3f} median {median_topk_mass:.3f}".format(**stats))

    tmp = Path(tempfile.mkdtemp(prefix="cache_bench_"))
    try:
        # 2. logit part: bytes and encode+write time per row, for each log-prob dtype
        res["logits"] = {}
        for lp_dtype in ("bf16", "fp16"):
            path = tmp / f"logits_{lp_dtype}.zarr"
            t_create, t_write, w, _ = write_store(path, (ids, lp, tail), lp_dtype)
            b = {n: dir_bytes(path / n) / w.n_rows for n in ("topk_ids", "topk_logprobs", "tail_logmass")}
            res["logits"][lp_dtype] = {
                "bytes_per_row": {**b, "logit_part": sum(b.values())},
                "token_arrays_bytes_per_token": (dir_bytes(path / "input_ids") + dir_bytes(path / "supervised"))
                / int(w._group.attrs["n_tokens"]),
                "create_s": t_create, "write_us_per_row": 1e6 * t_write / w.n_rows,
                "topk_us_per_row": 1e6 * t_topk / n_logit}

        # 3. hidden part: bf16 D=3584 (log-prob rows tiled, as only the hidden bytes/time are read off here)
        g = torch.Generator().manual_seed(1)
        scale = torch.exp(0.5 * torch.randn(D, generator=g))
        scale[torch.randperm(D, generator=g)[:8]] *= 50  # a few outlier channels, as in real LLMs
        hid = (torch.randn(n_hidden, D, generator=g) * scale).bfloat16()
        rep = lambda x: x.repeat((n_hidden // n_logit + 1,) + (1,) * (x.dim() - 1))[:n_hidden]  # noqa: E731
        path = tmp / "hidden.zarr"
        _, t_write_h, w, _ = write_store(path, (rep(ids), rep(lp), rep(tail)), "bf16", hidden=hid)
        logit_us = res["logits"]["bf16"]["write_us_per_row"]
        res["hidden"] = {"bytes_per_row": dir_bytes(path / "hidden") / w.n_rows, "raw_bytes_per_row": 2 * D,
                         "write_us_per_row_total": 1e6 * t_write_h / w.n_rows,
                         "write_us_per_row_hidden_only": 1e6 * t_write_h / w.n_rows - logit_us}

        # 3b. the GPU loop, simulated: background shard writes while the "forward" sleeps at GPU_TOK_S
        res["gpu_loop_sim"] = {}
        for name, hidden in (("logits_only", None), ("with_hidden", hid)):
            n = n_hidden if hidden is not None else n_logit
            rows = (rep(ids), rep(lp), rep(tail)) if hidden is not None else (ids, lp, tail)
            fwd = n / GPU_TOK_S
            _, t_all, w, t_loop = write_store(tmp / f"sim_{name}.zarr", rows, "bf16", hidden=hidden,
                                              shard_rows=n // 4, background=True,
                                              forward_s_per_row=1 / GPU_TOK_S, batch=n // 8)
            res["gpu_loop_sim"][name] = {"rows": n, "shards": w.n_shards, "forward_s": fwd,
                                         "overhead_steady": t_loop / fwd - 1,
                                         "overhead_incl_last_shard": t_all / fwd - 1}

        # 4. reference: lm_head matmul at the 7B shape on this CPU -> FLOP rate -> full-forward estimate
        h, W = torch.randn(256, D), torch.randn(LM_HEAD_V, D)
        h @ W[:1024].T  # warm-up
        t0 = time.perf_counter()
        h @ W.T
        t_head = (time.perf_counter() - t0) / 256
        flops = 2 * D * LM_HEAD_V / t_head
        fwd_cpu = 2 * PARAMS_7B / flops
        res["reference"] = {"lm_head_us_per_row": 1e6 * t_head, "cpu_gflops": flops / 1e9,
                            "est_7b_forward_cpu_us_per_token": 1e6 * fwd_cpu,
                            "assumed_gpu_forward_tokens_per_s": GPU_TOK_S}
        for lp_dtype, r in res["logits"].items():
            cpu_cache = (r["topk_us_per_row"] + r["write_us_per_row"]) * 1e-6
            r["overhead_vs_cpu_forward"] = cpu_cache / fwd_cpu
            r["overhead_vs_gpu_forward"] = r["write_us_per_row"] * 1e-6 * GPU_TOK_S
            r["overhead_vs_gpu_forward_with_hidden"] = (r["write_us_per_row"] + res["hidden"]
                                                        ["write_us_per_row_hidden_only"]) * 1e-6 * GPU_TOK_S

        # 5. reads: random minibatches of 8 whole sequences
        rng = np.random.default_rng(0)
        res["read"] = {
            "no_hidden": read_bench(tmp / "logits_bf16.zarr", ["input_ids", "supervised", "topk_ids",
                                                               "topk_logprobs", "tail_logmass"], 8, read_s, rng),
            "with_hidden": read_bench(path, None, 8, read_s, rng)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\n{'logprob dtype':<14}{'ids B/row':>10}{'lp B/row':>10}{'tail B/row':>11}{'logit B/row':>12}"
          f"{'topk us/row':>12}{'write us/row':>13}{'ovh CPU':>9}{'ovh GPU*':>9}")
    for lp_dtype, r in res["logits"].items():
        b = r["bytes_per_row"]
        print(f"{lp_dtype:<14}{b['topk_ids']:>10.1f}{b['topk_logprobs']:>10.1f}{b['tail_logmass']:>11.1f}"
              f"{b['logit_part']:>12.1f}{r['topk_us_per_row']:>12.1f}{r['write_us_per_row']:>13.1f}"
              f"{100 * r['overhead_vs_cpu_forward']:>8.2f}%{100 * r['overhead_vs_gpu_forward']:>8.2f}%")
    hr = res["hidden"]
    print(f"hidden bf16 D={D}: {hr['bytes_per_row']:.0f} B/row on disk (raw {hr['raw_bytes_per_row']}), "
          f"write {hr['write_us_per_row_hidden_only']:.1f} us/row (logits + hidden "
          f"{hr['write_us_per_row_total']:.1f}); GPU-loop overhead with hidden "
          f"{100 * res['logits']['bf16']['overhead_vs_gpu_forward_with_hidden']:.1f}%")
    for name, r in res["gpu_loop_sim"].items():
        print(f"GPU loop simulated at {GPU_TOK_S:.0f} tok/s, background writes, {name:<11}: overhead "
              f"{100 * r['overhead_steady']:.1f}% steady ({100 * r['overhead_incl_last_shard']:.1f}% incl. the "
              f"last of {r['shards']} shards, written after the last forward)")
    ref = res["reference"]
    print(f"reference: lm_head 3584x{LM_HEAD_V} {ref['lm_head_us_per_row']:.0f} us/row on this CPU "
          f"({ref['cpu_gflops']:.0f} GFLOP/s) -> est. 7B forward {ref['est_7b_forward_cpu_us_per_token'] / 1e3:.1f} "
          f"ms/token; *GPU column: synchronous CPU write vs an assumed {GPU_TOK_S:.0f} tok/s forward (4090, 7B bf16)")
    for name, r in res["read"].items():
        print(f"read {name:<12}: {r['rows_per_s']:>9.0f} rows/s {r['tokens_per_s']:>9.0f} tokens/s "
              f"{r['ms_per_batch']:.1f} ms per batch of 8 sequences")
    ok_b = all(r["bytes_per_row"]["logit_part"] <= TARGET_BYTES for r in res["logits"].values())
    ok_o = all(r["overhead_vs_gpu_forward"] <= TARGET_OVERHEAD for r in res["logits"].values()) and \
        res["gpu_loop_sim"]["logits_only"]["overhead_steady"] <= TARGET_OVERHEAD
    res["targets"] = {"logit_bytes_le_128": ok_b, "gpu_overhead_le_10pct": ok_o}
    print(f"targets: logit part <= {TARGET_BYTES} B/token: {'PASS' if ok_b else 'FAIL'}; cache writing <= "
          f"{100 * TARGET_OVERHEAD:.0f}% of the teacher forward (GPU loop, logits only): {'PASS' if ok_o else 'FAIL'}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
