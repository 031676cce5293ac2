"""Cross-tokenizer Stage 2 on the embedded default: how much of the teacher the student's tokenizer can see, and what
the cross-tokenizer losses cost per training step relative to the same-tokenizer step.

    dvc repro && python bench/crosstok_bench.py [--steps 12]   # writes bench/results/crosstok_bench.{json,txt}

Measured on the real artifacts of `dvc repro` (artifacts/cache, artifacts/base/student, artifacts/base/student_x):
  coverage  over the whole training cache: teacher vs student rows per sequence (N != M), the share of student rows
            aligned with a teacher row (same answer bytes before them), the share of the teacher's top-k probability
            mass on ids that map to an identical student token (what the mapped KL / OT can use), and the share of
            the teacher vocabulary that maps.
  step      one optimizer step (DistillModel forward + backward + AdamW) on the same 64-sequence blocks:
              same      the embedded default's student, its own (= the teacher's) tokenizer, CE + KL + both OT
              cross     the cross-tokenizer student (same shape), CE + aligned KL + both OT
              cross_all cross + ULD + token-level OT
              cross_ce  the cross-tokenizer student, CE only (the cost baseline of the chunk losses)
              cross_chunk_kl  CE + the chunk-level KL;  cross_alm  CE + chunk likelihood matching
            median seconds over --steps steps after one warm-up, the three interleaved step by step in one process
            (this machine is noisy: only the ratios within one run mean something).
  solver    the token-level OT's Sinkhorn (`entropic_ot`, weighted marginals, batched) against POT's log-domain
            Sinkhorn at the same L1 marginal tolerance, eps 0.1 (the default), 0.05 and 0.01, float64 and float32.
"""

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline.versions import versions, versions_line  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument(
        "--only",
        choices=["coverage", "step", "all"],
        default="all",
        help="coverage: only the alignment coverage (no step timing, no solver comparison); step: coverage and step "
        "times, no solver comparison (the results files then keep no solver table)",
    )
    args = ap.parse_args()

    import numpy as np
    import torch

    from cache.reader import CacheBlocks, open_cache
    from pipeline.config.params import load_config
    from pipeline.distill import train
    from pipeline.distill.batches import BlockCollator, cache_fields
    from pipeline.distill.chunks import ChunkEvents
    from pipeline.distill.crosstok import CrossBlocks, StudentSide, load_teacher_tokenizer, token_bytes, token_map
    from pipeline.models import load_tokenizer

    torch.set_num_threads(2)
    cfg = load_config(args.params)
    d = cfg.distill
    cache = open_cache(Path(d.cache) / "train.zarr")
    teacher_tok = load_teacher_tokenizer(d.cache, cache.provenance["tokenizer_hash"])
    x_path = str(Path(cfg.prepare.out_models) / "student_x")
    x_tok = load_tokenizer(x_path)
    tmap = token_map(teacher_tok, x_tok)
    side = StudentSide(cfg.data, x_tok, teacher_tok, log=lambda *_: None)

    # coverage over the whole training cache
    n_t, n_s, aligned, mass, mapped_mass = 0, 0, 0, 0.0, 0.0
    longer = shorter = 0
    fields = ["input_ids", "supervised", "topk_ids", "topk_logprobs"]
    for i0 in range(0, len(cache), 512):
        for r in cache.read_many(range(i0, min(i0 + 512, len(cache))), fields):
            ex = side.example(r)
            M, N = int(r["supervised"].sum()), len(ex["student_rows"])
            n_t, n_s, aligned = n_t + M, n_s + N, aligned + int((ex["aligned"] >= 0).sum())
            longer, shorter = longer + (N > M), shorter + (N < M)
            p = np.exp(r["topk_logprobs"].astype(np.float64))  # (M, k)
            mass += p.sum()
            mapped_mass += (p * (tmap.numpy()[r["topk_ids"]] >= 0)).sum()
    coverage = {
        "sequences": len(cache),
        "teacher_rows": n_t,
        "student_rows": n_s,
        "student_longer": longer,
        "student_shorter": shorter,
        "aligned_student_rows": aligned / n_s,
        "mapped_topk_mass": mapped_mass / mass,
        "mapped_vocabulary": float((tmap >= 0).float().mean()),
        "teacher_vocab": len(teacher_tok),
        "student_vocab": len(x_tok),
    }

    if args.only == "coverage":
        print(json.dumps(coverage, indent=2))
        return

    # step time: same-tokenizer vs cross-tokenizer, the same blocks, interleaved
    events = ChunkEvents(token_bytes(teacher_tok), token_bytes(x_tok), tmap)
    with_events = StudentSide(cfg.data, x_tok, teacher_tok, log=lambda *_: None, events=events)

    def setup(student, cross, **w):
        c = copy.deepcopy(d)
        c.student, c.cross_tokenizer = student, cross
        for k, v in w.items():
            setattr(c, k, v)
        tok = load_tokenizer(student)
        chunk = (events.first_piece, len(teacher_tok)) if c.w_chunk_kl else None
        model = train.build_model(c, cache.provenance["hidden_size"], len(tok), cfg.seed, None, chunk)
        blocks = CacheBlocks(cache, c.batch_size, cache_fields(c))
        if cross:
            blocks = CrossBlocks(blocks, with_events if c.w_chunk_kl else side)
        collate = BlockCollator(tok.pad_token_id, tmap if cross else None)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        return c, model, blocks, collate, opt

    ce_only = {"w_kl": 0.0, "w_ot": 0.0, "w_ot_logits": 0.0}
    runs = {
        "same": setup(d.student, False),
        "cross": setup(x_path, True),
        "cross_all": setup(x_path, True, w_uld=1.0, w_tok_ot=1.0),
        "cross_ce": setup(x_path, True, **ce_only),
        "cross_chunk_kl": setup(x_path, True, **ce_only, w_chunk_kl=1.0),
        "cross_alm": setup(x_path, True, **ce_only, w_alm=1.0),
    }
    times = {k: [] for k in runs}
    for step in range(args.steps + 1):
        for name, (c, model, blocks, collate, opt) in runs.items():  # noqa: B007
            batch = collate([blocks[step % len(blocks)]])
            t = time.perf_counter()
            loss, _ = model(batch)
            loss.backward()
            opt.step()
            opt.zero_grad()
            if step:  # the first step warms up (AdamW state, thread pools)
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    solver = token_ot_vs_pot() if args.only == "all" else []
    steps = {
        k: {"median_s": med[k], "ratio_to_same": med[k] / med["same"], "ratio_to_cross_ce": med[k] / med["cross_ce"]}
        for k in runs
    }
    result = {"coverage": coverage, "step": steps, "steps_timed": args.steps, "threads": 2, "token_ot_solver": solver}

    lines = [
        "cross-tokenizer coverage (embedded pair, whole training cache)",
        f"  sequences {len(cache)}: teacher rows {n_t}, student rows {n_s} (student longer in {longer}, "
        f"shorter in {shorter})",
        f"  student rows aligned with a teacher row: {coverage['aligned_student_rows']:.1%}",
        f"  teacher top-k probability mass on ids with an identical student token: {coverage['mapped_topk_mass']:.1%}",
        f"  teacher vocabulary that maps: {coverage['mapped_vocabulary']:.1%} of {len(teacher_tok)} tokens "
        f"(student vocabulary {len(x_tok)})",
        "",
        f"step time (median of {args.steps}, one process, interleaved)",
        "| step | seconds | ratio to same | ratio to cross_ce |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| {k} | {v['median_s']:.3f} | {v['ratio_to_same']:.2f} | {v['ratio_to_cross_ce']:.2f} |"
        for k, v in steps.items()
    ]
    lines += solver and [
        "",
        f"token-level OT solver vs POT (ot.sinkhorn, method sinkhorn_log) on {SOLVER_ROWS} rows x "
        f"{SOLVER_N} x {SOLVER_M}, cost 1 - cosine, random marginals; both at L1 marginal error {SOLVER_TOL:g}",
        "| eps | dtype | otkd s (batched) | POT s (row by row) | max |T - T_POT| | max rel. value error | "
        "otkd iterations |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['eps']:g} | {r['dtype']} | {r['otkd_s']:.3f} | {r['pot_s']:.3f} | {r['plan_err']:.1e} | "
        f"{r['value_err']:.1e} | {r['iters']} |"
        for r in solver
    ]
    text = "\n".join(lines) + "\n"
    out = ROOT / "bench/results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "crosstok_bench.json").write_text(json.dumps({**result, "versions": versions()}, indent=2))
    (out / "crosstok_bench.txt").write_text(f"{text}{versions_line()}\n")
    print(text)


SOLVER_ROWS, SOLVER_N, SOLVER_M, SOLVER_TOL = 512, 8, 16, 1e-6


def token_ot_vs_pot() -> list[dict]:
    """`entropic_ot` (the token-level OT's solver) against POT's log-domain Sinkhorn at the same marginal
    tolerance: plans, values and time, at the default eps (0.1) and sharper ones down to 0.01."""
    import numpy as np
    import ot
    import torch

    from pipeline.losses.crosstok import entropic_ot

    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(SOLVER_ROWS, SOLVER_N, 16, generator=g, dtype=torch.float64), dim=-1)
    y = torch.nn.functional.normalize(torch.randn(SOLVER_ROWS, SOLVER_M, 16, generator=g, dtype=torch.float64), dim=-1)
    C = 1 - x @ y.transpose(1, 2)  # (R, n, m) in [0, 2]
    a = (3 * torch.randn(SOLVER_ROWS, SOLVER_N, generator=g, dtype=torch.float64)).softmax(-1)  # peaked, like top-k
    b = (3 * torch.randn(SOLVER_ROWS, SOLVER_M, generator=g, dtype=torch.float64)).softmax(-1)
    rows = []
    for eps in (0.1, 0.05, 0.01):
        t = time.perf_counter()
        T_pot = np.stack(
            [
                ot.sinkhorn(
                    a[r].numpy(),
                    b[r].numpy(),
                    C[r].numpy(),
                    eps,
                    method="sinkhorn_log",
                    stopThr=SOLVER_TOL / 2,
                    numItermax=100000,
                )
                for r in range(SOLVER_ROWS)
            ]
        )
        pot_s = time.perf_counter() - t
        T_pot = torch.as_tensor(T_pot)
        v_pot = (T_pot * C).sum((1, 2)) + eps * (
            T_pot * (T_pot / (a[:, :, None] * b[:, None])).clamp_min(1e-300).log()
        ).sum((1, 2))
        for dtype in (torch.float64, torch.float32):
            args = (C.to(dtype), a.log().to(dtype), b.log().to(dtype), eps, SOLVER_TOL)
            for iters in (10, 30, 100, 300, 1000, 3000, 10000):  # the smallest cap that reaches the tolerance
                value, T, _, _ = entropic_ot(*args, iters)
                err = (T.sum(-1) - a.to(dtype)).abs().sum(-1).max().item()
                if err <= SOLVER_TOL:
                    break
            t = time.perf_counter()
            entropic_ot(*args, 10000)  # stops at the tolerance by itself: timed once
            otkd_s = time.perf_counter() - t
            rows.append(
                {
                    "eps": eps,
                    "dtype": str(dtype).split(".")[-1],
                    "otkd_s": otkd_s,
                    "pot_s": pot_s,
                    "plan_err": (T.double() - T_pot).abs().max().item(),
                    "value_err": ((value.double() - v_pot).abs() / v_pot.abs()).max().item(),
                    "iters": f"<= {iters}" if err <= SOLVER_TOL else f"> {iters} (err {err:.1e})",
                }
            )
    return rows


if __name__ == "__main__":
    main()
