"""Loss-path memory benchmark: fused lm-head + CE + top-k KL vs the naive full-logits path.

    python bench/loss_bench.py [--quick] [--no-trainable]   # writes bench/results/loss_bench.json
    python bench/loss_bench.py --exact    # the exact-teacher KL instead: bench/results/loss_bench_exact.json

--exact: CE + full-vocabulary KL to the teacher rebuilt from hidden states (pipeline/losses/exact_kl.py), fused
vs `naive_ce_exact_kl` (both heads' (N, V) logits materialised), teacher hidden states (N, 3584) and a frozen
float32 teacher head (V, 3584) (Qwen2.5-7B's width; float32 so that the CPU matmul is not the bf16 emulation),
N in {1024, 2048}, frozen student W. The same peak measurement; the teacher head (2.2 GB) is an input, in the
baseline of both paths.

Runtime on 2 shared cores: --quick ~80 s (3 cases at N = 1024); full ~8-10 min (9 frozen-W cases + 2
trainable-W cases; --no-trainable saves ~3 min). Needs ~16 GB free RAM (naive at N = 4096).

What is measured. CE + top-k KL (forward KL, tail bucket, w_ce = w_kl = 1) computed from hidden states
h (N, d) and an lm-head weight (V, d), forward AND backward, at the real Qwen2.5-1.5B shape: V = 151,936,
d = 1536, k = 64, N in {1024, 2048, 4096} rows. Two paths with the same signature, both from
pipeline/losses/fused_ce_kl.py:
  naive   `naive_ce_kl`: logits = h W^T materialised (N, V) float32, then log_softmax -> ce_loss +
          topk_kl_loss through autograd (what a plain Trainer does);
  fused   `fused_ce_kl`: chunked over rows (the default chunk, 2^26 logits = 441 rows at this V, and
          1024 rows), closed-form d loss / d logits per chunk, no (N, V) tensor ever exists whole.
Main case: h float32 requires_grad, W float32 FROZEN (the QLoRA case: lm_head not trained, so no V x d
gradient). Second row group (unless --no-trainable): W requires grad too (full fine-tune / trainable
lm_head), where both paths must hold a (V, d) float32 grad_W = 0.93 GB, at N = 4096 only.

Inputs (random, seeded, identical across paths): h ~ N(0, 1); W ~ N(0, 0.02^2) (logits std ~0.8);
targets uniform over V with 10% set to -100 (not supervised, and KL-masked too); teacher top-k ids sampled
without replacement per row (uniform over V); teacher log-probs from a peaked distribution: top-1
probability ~ Beta(3.1, 1) (median 0.8), tail mass ~ U(0.01, 0.10), the rest over ranks 2..64 ~ 1/rank;
teacher_tail = log(tail mass). The loss values only have to be plausible: memory and time do not depend on
them (a sanity check still prints fused vs naive loss and |grad h| agreement).

How the peak is measured and attributed. Each (path, N, weight mode, chunk) case runs in a FRESH subprocess
(`python bench/loss_bench.py --worker ...`, one at a time, so no allocator state or cached pages leak
between cases and the naive case's ~10 GB never overlaps another). The worker
  1. builds the inputs (W alone is V x d x 4 B = 0.93 GB, common to both paths),
  2. runs one warm-up forward + backward at 128 rows (lazy init, thread pools, first-touch of code pages),
     drops its grads and runs gc,
  3. resets the kernel's resident high-water mark (`echo 5 > /proc/self/clear_refs`, Linux >= 4.0, sets
     VmHWM := current VmRSS) and reads VmRSS = the post-setup BASELINE,
  4. runs forward + backward once, timed (time.perf_counter around loss computation + .backward()),
  5. reads VmHWM from /proc/self/status = the ABSOLUTE PEAK of the measured step.
"Loss-path peak" = absolute peak - baseline: the memory the loss computation itself adds on top of inputs
that any training step holds anyway (this includes the returned h.grad, N x d x 4 B = 25 MB at N = 4096,
and, in the trainable group, grad_W). It is the number the 1/8 target is checked against; the absolute
peak (process RSS incl. torch + inputs, ~1.2 GB of it common to both paths) is reported too, and its
ratio is necessarily much closer to 1. RSS (not a torch allocator statistic) is used because it is what
the OS sees and it counts every buffer, including autograd temporaries and MKL/oneDNN workspaces. Large
tensors (> glibc's mmap threshold) are mmap'ed and returned to the OS on free, so the baseline is clean.

Threads: workers run with torch.set_num_threads(2) (and OMP/MKL_NUM_THREADS=2): this box has 2 cores
shared with other jobs, so absolute times are noisy; the TIME RATIO fused/naive within one run is the
meaningful number (cases are interleaved per N so a load change affects both paths similarly). Time is one
measured step (no repeats: the naive N = 4096 step takes tens of seconds on 2 cores).

Targets (issue "Loss-path memory"): at N = 4096, frozen W, default chunk: fused loss-path peak <= 1/8 of
naive, and fused time <= 1.2 x naive. Anchors for context (GPU, different peak definitions, so not
directly comparable): NeMo-RL reports a 3.5x lower peak on an RTX 4090 at V = 151,936, k = 64; Liger-Kernel
reports -89% memory for its fused linear cross-entropy at V = 128,256.
"""

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from memtools import proc_status, reset_peak  # noqa: E402

from pipeline.losses.chunked import default_chunk_rows  # noqa: E402  (imports only torch)
from pipeline.versions import versions  # noqa: E402

V, D, K = 151_936, 1536, 64
D_TEACHER = 3584  # --exact: Qwen2.5-7B's hidden size
N_FULL, N_QUICK, N_WARM = (1024, 2048, 4096), (1024,), 128
CHUNKS = (0, 1024)  # 0 = fused_ce_kl's default chunk (default_chunk_rows(V))
MEM_TARGET, TIME_TARGET, N_TARGET = 1 / 8, 1.2, 4096
THREADS = 2


# ----------------------------------------------------------------------------------------------- worker
def make_inputs(n: int, seed: int, train_w: bool):
    import torch

    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, D, generator=g).requires_grad_(True)
    w = (torch.randn(V, D, generator=g) * 0.02).requires_grad_(train_w)
    targets = torch.randint(0, V, (n,), generator=g)
    unsup = torch.rand(n, generator=g) < 0.10
    targets[unsup] = -100
    kl_mask = ~unsup
    # top-k ids without replacement: 128 draws per row, duplicates pushed past V, first 64 of the sorted
    # unique values, then shuffled within the row (P(< 64 unique of 128 draws over 151,936) ~ 0)
    c, _ = torch.randint(0, V, (n, 2 * K), generator=g).sort(-1)
    dup = torch.zeros_like(c, dtype=torch.bool)
    dup[:, 1:] = c[:, 1:] == c[:, :-1]
    c = torch.where(dup, V + torch.arange(2 * K), c).sort(-1).values[:, :K]
    assert int(c.max()) < V
    ids = c.gather(-1, torch.rand(n, K, generator=g).argsort(-1))
    # peaked teacher: p1 ~ Beta(3.1, 1), tail ~ U(0.01, 0.1), ranks 2..k share the rest ~ 1/rank
    torch.manual_seed(seed)
    p1 = torch.distributions.Beta(3.106, 1.0).sample((n,)).clamp(0.05, 0.97)
    tail = torch.rand(n, generator=g) * 0.09 + 0.01
    p1 = torch.minimum(p1, 1 - tail - 1e-3)
    zipf = 1.0 / torch.arange(2, K + 1, dtype=torch.float32)
    rest = (1 - p1 - tail)[:, None] * zipf / zipf.sum()
    probs = torch.cat([p1[:, None], rest], -1)  # (n, k), descending-ish, sums to 1 - tail
    return h, w, targets, ids, probs.log(), tail.log(), kl_mask


def run_step(fn, inputs, chunk):
    if len(inputs) == 6:  # the exact teacher: h, W, teacher h, teacher W, targets, mask
        h, w, th, tw, targets, mask = inputs
        loss, parts = fn(h, w, th, tw, targets, mask, w_ce=1.0, w_kl=1.0, vocab_size=V, chunk_rows=chunk or None)
        loss.backward()
        return loss.detach(), parts
    h, w, targets, ids, lp, tail, mask = inputs
    loss, parts = fn(h, w, targets, ids, lp, tail, mask, w_ce=1.0, w_kl=1.0, vocab_size=V, chunk_rows=chunk or None)
    loss.backward()
    return loss.detach(), parts


def make_exact_inputs(n: int, seed: int):
    import torch

    h, w, targets, _, _, _, mask = make_inputs(n, seed, False)
    g = torch.Generator().manual_seed(seed + 100)
    th = torch.randn(n, D_TEACHER, generator=g)  # (n, D) teacher hidden states
    tw = torch.randn(V, D_TEACHER, generator=g) * 0.02  # (V, D) frozen teacher head
    return h, w, th, tw, targets, mask


def worker(args):
    import torch

    torch.set_num_threads(THREADS)
    from pipeline.losses.exact_kl import fused_ce_exact_kl, naive_ce_exact_kl
    from pipeline.losses.fused_ce_kl import fused_ce_kl, naive_ce_kl

    fn = {"fused": fused_ce_kl, "naive": naive_ce_kl, "exact": fused_ce_exact_kl, "exact_naive": naive_ce_exact_kl}[
        args.path
    ]
    make = make_exact_inputs if args.path.startswith("exact") else (lambda n, seed: make_inputs(n, seed, args.train_w))
    rss_start = proc_status()["VmRSS"]

    warm = make(N_WARM, seed=1)  # small W copy too: freed below
    run_step(fn, warm, args.chunk)
    del warm
    inputs = make(args.n, seed=0)
    gc.collect()

    reset_peak()
    base = proc_status()["VmRSS"]
    t0 = time.perf_counter()
    loss, parts = run_step(fn, inputs, args.chunk)
    dt = time.perf_counter() - t0
    st = proc_status()
    h, w = inputs[0], inputs[1]
    out = {
        "path": args.path,
        "n": args.n,
        "chunk": args.chunk if args.path in ("fused", "exact") else None,
        "train_w": args.train_w,
        "threads": torch.get_num_threads(),
        "rss_start_B": rss_start,
        "baseline_B": base,
        "abs_peak_B": st["VmHWM"],
        "loss_path_peak_B": st["VmHWM"] - base,
        "rss_after_B": st["VmRSS"],
        "time_s": dt,
        "loss": float(loss),
        "ce": float(parts["ce"]),
        "kl": float(parts["kl"]),
        "grad_h_norm": float(h.grad.norm()),
        "grad_w_norm": float(w.grad.norm()) if w.grad is not None else None,
        "naive_logits_B": args.n * V * 4,
    }
    print("RESULT " + json.dumps(out), flush=True)


# ----------------------------------------------------------------------------------------------- parent
def run_case(path, n, chunk, train_w, timeout):
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        "--path",
        path,
        "--n",
        str(n),
        "--chunk",
        str(chunk),
    ] + (["--train-w"] if train_w else [])
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(THREADS),
        MKL_NUM_THREADS=str(THREADS),
        PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        return {
            "path": path,
            "n": n,
            "chunk": chunk if path in ("fused", "exact") else None,
            "train_w": train_w,
            "error": f"rc={p.returncode}: {p.stderr[-2000:]}",
        }
    return json.loads(lines[-1][len("RESULT ") :])


def label(r):
    if r["path"] in ("naive", "exact_naive"):
        return r["path"]
    return f"{r['path']} c{r['chunk'] or default_chunk_rows(V)}" + ("*" if not r["chunk"] else "")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"N = {N_QUICK} only, frozen W (~80 s on 2 busy cores)")
    ap.add_argument("--no-trainable", action="store_true", help="skip the trainable-W row group")
    ap.add_argument(
        "--out",
        default=None,
        help="JSON path (default bench/results/loss_bench.json; config.quick marks a --quick run)",
    )
    ap.add_argument("--timeout", type=float, default=600, help="per-case subprocess timeout, s")
    ap.add_argument("--exact", action="store_true", help="the exact-teacher KL (fused vs naive), N = 1024, 2048")
    # worker-only arguments
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--path", choices=("fused", "naive", "exact", "exact_naive"), help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--chunk", type=int, default=1024, help=argparse.SUPPRESS)
    ap.add_argument("--train-w", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        sys.path.insert(0, str(ROOT))
        return worker(args)

    out = Path(args.out or ROOT / f"bench/results/loss_bench{'_exact' if args.exact else ''}.json")
    ns = N_QUICK if args.quick else N_FULL
    cases = [(False, n, p, c) for n in ns for p, c in (("naive", 1024), ("fused", CHUNKS[0]), ("fused", CHUNKS[1]))]
    if args.exact:
        ns = (1024, 2048)
        cases = [(False, n, p, c) for n in ns for p, c in (("exact_naive", 1024), ("exact", CHUNKS[0]))]
    elif not args.quick and not args.no_trainable:
        cases += [(True, N_TARGET, p, c) for p, c in (("naive", 1024), ("fused", CHUNKS[0]))]
    t_all = time.perf_counter()
    rows = []
    for train_w, n, path, chunk in cases:
        r = run_case(path, n, chunk, train_w, args.timeout)
        rows.append(r)
        msg = r.get("error") or (
            f"loss-path {r['loss_path_peak_B'] / 2**20:,.0f} MB, abs "
            f"{r['abs_peak_B'] / 2**20:,.0f} MB, {r['time_s']:.1f} s"
        )
        print(f"  [{'trainable W' if train_w else 'frozen W'}] N={n} {label(r)}: {msg}", flush=True)

    # ratios against the naive case of the same (train_w, N); agreement of loss / grad with naive
    naive = {(r["train_w"], r["n"]): r for r in rows if r["path"] in ("naive", "exact_naive") and "error" not in r}
    for r in rows:
        nv = naive.get((r["train_w"], r["n"]))
        if "error" in r or nv is None:
            continue
        r["mem_ratio"] = r["loss_path_peak_B"] / nv["loss_path_peak_B"]
        r["abs_mem_ratio"] = r["abs_peak_B"] / nv["abs_peak_B"]
        r["time_ratio"] = r["time_s"] / nv["time_s"]
        r["loss_rel_diff"] = abs(r["loss"] - nv["loss"]) / abs(nv["loss"])
        r["grad_h_norm_rel_diff"] = abs(r["grad_h_norm"] - nv["grad_h_norm"]) / nv["grad_h_norm"]

    print(
        f"\n{'W':<10}{'N':>6}  {'path':<11}{'loss-path MB':>13}{'abs peak MB':>12}{'baseline MB':>12}"
        f"{'time s':>8}{'mem f/n':>9}{'abs f/n':>9}{'time f/n':>9}{'loss rel d':>11}"
    )
    for r in rows:
        w = "trainable" if r["train_w"] else "frozen"
        if "error" in r:
            print(f"{w:<10}{r['n']:>6}  {label(r):<11}ERROR {r['error'][:200]}")
            continue
        rat = (
            f"{r['mem_ratio']:>9.3f}{r['abs_mem_ratio']:>9.3f}{r['time_ratio']:>9.2f}{r['loss_rel_diff']:>11.1e}"
            if "mem_ratio" in r
            else ""
        )
        print(
            f"{w:<10}{r['n']:>6}  {label(r):<11}{r['loss_path_peak_B'] / 2**20:>13,.0f}"
            f"{r['abs_peak_B'] / 2**20:>12,.0f}{r['baseline_B'] / 2**20:>12,.0f}{r['time_s']:>8.1f}{rat}"
        )

    verdict = {}
    n_t = N_TARGET if N_TARGET in ns else max(ns)
    tgt = next(
        (
            r
            for r in rows
            if not r["train_w"]
            and r["n"] == n_t
            and r["path"] in ("fused", "exact")
            and r.get("chunk") == CHUNKS[0]
            and "mem_ratio" in r
        ),
        None,
    )
    if tgt is None:
        print(f"\nTARGET: cannot check (fused/naive case at N={n_t} missing or failed)")
    else:
        mem_ok, time_ok = tgt["mem_ratio"] <= MEM_TARGET, tgt["time_ratio"] <= TIME_TARGET
        verdict = {
            "n": n_t,
            "mem_ratio": tgt["mem_ratio"],
            "mem_target": MEM_TARGET,
            "mem_pass": mem_ok,
            "time_ratio": tgt["time_ratio"],
            "time_target": TIME_TARGET,
            "time_pass": time_ok,
            "abs_mem_ratio": tgt["abs_mem_ratio"],
            "official": n_t == N_TARGET,
        }
        note = "" if n_t == N_TARGET else f" (--quick: N={n_t}, the target is defined at N={N_TARGET})"
        print(f"\nTARGET{note}, frozen W, default chunk ({default_chunk_rows(V)} rows):")
        print(
            f"  memory: fused loss-path peak = {tgt['mem_ratio']:.3f} x naive (1/{1 / tgt['mem_ratio']:.1f}; "
            f"target <= 1/8 = {MEM_TARGET:.3f}) -> {'PASS' if mem_ok else 'FAIL'}"
            f"   [absolute process peak ratio {tgt['abs_mem_ratio']:.3f}, not the target metric]"
        )
        print(
            f"  time:   fused = {tgt['time_ratio']:.2f} x naive (target <= {TIME_TARGET}) -> "
            f"{'PASS' if time_ok else 'FAIL'}"
        )
    total = time.perf_counter() - t_all
    print(f"total {total:.0f} s")
    res = {
        "config": {
            "V": V,
            "d": D,
            "k": K,
            "ns": list(ns),
            "warmup_rows": N_WARM,
            "chunks": list(CHUNKS),
            "threads": THREADS,
            "quick": args.quick,
            "w_ce": 1.0,
            "w_kl": 1.0,
            "tail": "bucket",
            "dtype": "float32",
            "peak_method": "VmHWM after clear_refs=5, minus VmRSS baseline",
            "python": sys.version.split()[0],
            "total_s": total,
        },
        "cases": rows,
        "target": verdict,
        "versions": versions(),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
