"""Stage-2 training-step benchmark at the real vocabulary size: fused (default) vs naive loss path.

    python bench/train_step_bench.py [--steps 3]      # writes bench/results/train_step_bench.json

What is measured. One Stage-2 optimizer step = `DistillModel.forward` (pipeline/distill/model.py, the
production step: CE + top-k KL + OT on hidden states + OT on logits, default weights) +
backward + AdamW step, on a tiny-hidden Qwen2 student (2 layers x 64 wide, tied embeddings) with the real
Qwen2.5 vocabulary V = 151,936, batch 2 x 1024 tokens of which the last 768 of each are supervised (1,536
teacher rows, k = 64, teacher hidden D = 128). The tiny hidden size makes the loss path - not the decoder -
the dominant cost, which is exactly what the fused path changes:
  fused   DistillModel: decoder hidden states -> `fused_ce_kl` (row chunks, no (B, L, V) logits)
          and `ot_logits_loss_from_hidden` (lm_head only at the teacher's top-k ids)
  naive   bench/reference.py `reference_loss`: the model's full logits (B, L, V) -> plain losses
Each path runs in a FRESH subprocess: build model and inputs, one warm-up step (allocates AdamW state,
thread pools), reset the kernel's peak-RSS mark, then --steps timed steps. Reported: steps/s and the step's
peak = VmHWM - RSS before the timed steps (memory the step itself adds over model + optimizer + inputs),
plus the absolute process peak. 2 threads; ratios fused/naive within one run are the meaningful numbers.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from memtools import proc_status, reset_peak  # noqa: E402

from pipeline.versions import versions  # noqa: E402

V, HIDDEN, LAYERS, B, L, SUP, K, D_TEACHER = 151_936, 64, 2, 2, 1024, 768, 64, 128
THREADS = 2


def make_batch(g):
    """A Stage-2 batch from synthetic cache reads (random tokens, peaked random teacher top-k)."""
    import numpy as np
    import torch

    from pipeline.distill.batches import collate

    reads = []
    for _ in range(B):
        ids = torch.randint(0, V, (L,), generator=g).numpy()
        sup = np.zeros(L, dtype=bool)
        sup[L - SUP - 1 : L - 1] = True  # rows predict tokens L-SUP .. L-1 (the response)
        lp = torch.randn(SUP, K, generator=g).mul(3).log_softmax(-1) - 0.05  # (rows, k) ~0.95 of the mass
        reads.append(
            {
                "input_ids": ids,
                "supervised": sup,
                "topk_ids": torch.randint(0, V, (SUP, K), generator=g).numpy(),
                "topk_logprobs": lp.sort(-1, descending=True).values.numpy(),
                "tail_logmass": np.full(SUP, np.log(1 - np.exp(-0.05)), dtype=np.float32),
                "hidden": torch.randn(SUP, D_TEACHER, generator=g).numpy(),
            }
        )
    return collate(reads, pad_id=0)


def worker(fused: bool, steps: int):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from bench.reference import reference_loss
    from pipeline.config.distill import DistillConfig
    from pipeline.distill.model import DistillModel
    from pipeline.losses.ot import init_projection

    torch.set_num_threads(THREADS)
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=V,
        hidden_size=HIDDEN,
        intermediate_size=4 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=L,
        use_sliding_window=False,
    )
    model = Qwen2ForCausalLM(cfg)
    model.train()
    model = DistillModel(model, DistillConfig(), V, init_projection(D_TEACHER, HIDDEN, generator=g))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = make_batch(g)

    def step():
        loss, logs = model(batch) if fused else reference_loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach()), {k: float(v) for k, v in logs.items()}

    step()  # warm-up: AdamW state, thread pools
    reset_peak()
    base = proc_status()["VmRSS"]
    t0 = time.perf_counter()
    for _ in range(steps):
        loss, logs = step()
    dt = time.perf_counter() - t0
    st = proc_status()
    print(
        "RESULT "
        + json.dumps(
            {
                "path": "fused" if fused else "naive",
                "steps": steps,
                "step_s": dt / steps,
                "steps_per_s": steps / dt,
                "step_peak_B": st["VmHWM"] - base,
                "abs_peak_B": st["VmHWM"],
                "baseline_B": base,
                "last_loss": loss,
                "last_logs": logs,
            }
        ),
        flush=True,
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per path (after one warm-up step)")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/train_step_bench.json)")
    ap.add_argument("--worker", choices=("fused", "naive"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker == "fused", args.steps)
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS))
    rows = []
    for path in ("naive", "fused"):
        p = subprocess.run(
            [sys.executable, __file__, "--worker", path, "--steps", str(args.steps)],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
        )
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        if p.returncode or not line:
            sys.exit(f"{path} worker failed (rc={p.returncode}):\n{p.stderr[-3000:]}")
        rows.append(json.loads(line[-1][7:]))
        r = rows[-1]
        print(
            f"  {path}: {r['step_s']:.2f} s/step, step peak {r['step_peak_B'] / 2**20:,.0f} MB, "
            f"abs peak {r['abs_peak_B'] / 2**20:,.0f} MB, loss {r['last_loss']:.3f}",
            flush=True,
        )
    naive, fused = rows
    ratio = {
        "speedup": naive["step_s"] / fused["step_s"],
        "step_peak_ratio": fused["step_peak_B"] / naive["step_peak_B"],
        "abs_peak_ratio": fused["abs_peak_B"] / naive["abs_peak_B"],
    }
    print(f"\n{'path':<7}{'steps/s':>9}{'s/step':>8}{'step peak MB':>14}{'abs peak MB':>13}")
    for r in rows:
        print(
            f"{r['path']:<7}{r['steps_per_s']:>9.3f}{r['step_s']:>8.2f}{r['step_peak_B'] / 2**20:>14,.0f}"
            f"{r['abs_peak_B'] / 2**20:>13,.0f}"
        )
    print(
        f"fused vs naive: {ratio['speedup']:.2f}x steps/s, step peak x{ratio['step_peak_ratio']:.3f}, "
        f"absolute peak x{ratio['abs_peak_ratio']:.3f}"
    )
    out = Path(args.out or ROOT / "bench/results/train_step_bench.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "config": {
                    "V": V,
                    "hidden": HIDDEN,
                    "layers": LAYERS,
                    "batch": B,
                    "seq": L,
                    "supervised_per_seq": SUP,
                    "k": K,
                    "teacher_hidden": D_TEACHER,
                    "threads": THREADS,
                    "steps": args.steps,
                },
                "rows": rows,
                "ratios": ratio,
                "versions": versions(),
            },
            indent=1,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
