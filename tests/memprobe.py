"""Measure the CPU memory of one pipeline step in a fresh process, for the planner's validation (test_plan.py).

    python -m tests.memprobe CASE '{"json": "arguments"}'   ->  prints {"name": bytes, ...} as JSON

Peak memory is the kernel's peak resident set (VmHWM, reset through /proc/self/clear_refs) minus the resident
set just before the step; steady memory is the growth of anonymous resident memory (RssAnon: tensors, not
mapped files). Run with MALLOC_MMAP_THRESHOLD_ set (see `run`) so glibc maps every large tensor on its own and
returns it on free: the resident set then follows the live tensors. One thread: no per-thread buffers.
"""

import gc
import json
import os
import subprocess
import sys


def status(key: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM, RssAnon)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def peak_of(fn) -> int:
    """Bytes by which fn() raises the resident set at its peak (fn's result is dropped before returning).

    fn runs twice and the second run is measured: the first one pages in the code of every kernel it calls
    (file-backed resident memory that never leaves again, ~1 MB per new op) and fills one-time caches.
    """
    fn()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    base = status("VmRSS")
    fn()
    return status("VmHWM") - base


def growth_of(fn):
    """(fn's result, growth of anonymous resident memory while it stays alive)."""
    gc.collect()
    base = status("RssAnon")
    out = fn()
    gc.collect()
    return out, status("RssAnon") - base


def fused(R, d, V, w_ce, w_kl, chunk_rows=None, seed=0):
    import torch

    from pipeline.losses.fused_ce_kl import fused_ce_kl

    g = torch.Generator().manual_seed(seed)
    h = torch.randn(R, d, generator=g).requires_grad_()
    W = torch.randn(V, d, generator=g) / d**0.5
    targets = torch.randint(0, V, (R,), generator=g)
    k = 16
    ids = torch.randint(0, V, (R, k), generator=g)
    lp = torch.randn(R, k + 1, generator=g).log_softmax(-1)
    mask = torch.ones(R, dtype=torch.bool)

    def step():
        loss, _ = fused_ce_kl(
            h, W, targets, ids, lp[:, :k], lp[:, k], mask, w_ce=w_ce, w_kl=w_kl, chunk_rows=chunk_rows
        )
        loss.backward()

    return {"peak": peak_of(step)}


def exact(R, d, D, V, w_ce, jsd_beta=0.0, teacher_dtype="float32", seed=0):
    """fused_ce_exact_kl as Stage 2 calls it with distill.teacher_head: student rows, the teacher's (R, D) hidden
    states and its (V, D) lm_head (inputs, not measured), CE + the exact KL (or JSD), forward and backward."""
    import torch

    from pipeline.losses.exact_kl import fused_ce_exact_kl

    g = torch.Generator().manual_seed(seed)
    h = torch.randn(R, d, generator=g).requires_grad_()
    W = torch.randn(V, d, generator=g) / d**0.5
    t_h = torch.randn(R, D, generator=g)
    t_W = (torch.randn(V, D, generator=g) / D**0.5).to(getattr(torch, teacher_dtype))
    targets = torch.randint(0, V, (R,), generator=g)
    mask = torch.ones(R, dtype=torch.bool)

    def step():
        loss, _ = fused_ce_exact_kl(h, W, t_h, t_W, targets, mask, w_ce=w_ce, w_kl=1.0, jsd_beta=jsd_beta)
        loss.backward()

    return {"peak": peak_of(step)}


def ot(B, N, V, d, D, k, hidden, logits, max_iter=50, seed=0):
    """student_losses' OT terms: hidden-state OT, then OT on logits from the hidden states (fused path)."""
    import torch

    from pipeline.losses.fused_ot import ot_logits_loss_from_hidden
    from pipeline.losses.ot import OTSolver, init_projection, ot_hidden_loss

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, d, generator=g).requires_grad_()
    W = torch.randn(V, d, generator=g) / d**0.5
    y = torch.randn(B, N, D, generator=g)
    P = init_projection(D, d, g).requires_grad_()
    # distinct ids within every block of teacher tokens (as long as V allows): the planner's worst case
    ids = torch.stack([torch.randperm(V, generator=g)[torch.arange(N * k) % V].view(N, k) for _ in range(B)])
    lp = torch.randn(B, N, k, generator=g).log_softmax(-1) - 0.1
    mask = torch.ones(B, N, dtype=torch.bool)

    def losses():
        loss = 0.0
        if hidden:
            loss = loss + ot_hidden_loss(x, mask, y, mask, P, solver=OTSolver(max_iter=max_iter))[0]
        if logits:
            loss = loss + ot_logits_loss_from_hidden(x, W, ids, lp, mask, mask, solver=OTSolver(max_iter=max_iter))[0]
        return loss

    return {"peak": peak_of(lambda: losses().backward())}


def tok_ot(R, n, k, d, D, V, seed=0):
    """The token-level OT as terms.tok_ot runs it: the student's n embedding rows and the teacher's k
    rows gathered by id, token_ot_loss through the learned P_e. saved: what the forward leaves alive for the
    backward; peak: forward + backward."""
    import torch

    from pipeline.losses.crosstok import token_ot_loss

    g = torch.Generator().manual_seed(seed)
    E_s, E_t = torch.randn(V, d, generator=g), torch.randn(V, D, generator=g)
    P = (torch.randn(D, d, generator=g) / D**0.5).requires_grad_()
    z = torch.randn(R, n, generator=g).requires_grad_()  # the student's logits at its own top n
    own, ids = torch.randint(0, V, (R, n), generator=g), torch.randint(0, V, (R, k), generator=g)
    lb, mask = torch.randn(R, k, generator=g), torch.ones(R, dtype=torch.bool)

    def loss():
        return token_ot_loss(z.log_softmax(-1), E_s[own], lb, E_t[ids], P, mask, max_iter=50)

    out, saved = growth_of(loss)
    del out
    return {"saved": saved, "peak": peak_of(lambda: loss().backward())}


def topk(R, D, V, V_logits, chunk_rows, seed=0):
    import torch

    from pipeline.teacher.topk import topk_from_hidden

    g = torch.Generator().manual_seed(seed)
    h = torch.randn(R, D, generator=g)
    head = torch.nn.Linear(D, V_logits, bias=False)
    with torch.inference_mode():
        return {"peak": peak_of(lambda: topk_from_hidden(h, head, 64, V, chunk_rows))}


def forward(B, L, hidden, intermediate, heads, kv_heads, seed=0):
    """Stage 1's no-grad decoder forward (teacher_cache.teacher_rows) of a 2-layer Qwen2, padded if B > 1."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=512,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=2,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
        )
    ).eval()
    ids, mask = torch.randint(0, 512, (B, L)), torch.ones(B, L, dtype=torch.long)
    mask[1:, -5:] = 0
    with torch.inference_mode():
        return {
            "peak": peak_of(
                lambda: model.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            )
        }


def student(path, r, targets, optims):
    """Stage 2's QLoRA student, step by step: NF4 weights, LoRA adapters, their gradients, optimizer states."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import Trainer, TrainingArguments

    from pipeline.distill.student import cpu_4bit_guard
    from pipeline.models import load_causal_lm

    plain, weights16 = growth_of(lambda: load_causal_lm(path, "fp32", 16))  # the checkpoint is bf16: a copy
    del plain
    model, weights = growth_of(
        lambda: prepare_model_for_kbit_training(
            cpu_4bit_guard(load_causal_lm(path, "fp32", 4)), use_gradient_checkpointing=False
        )
    )
    model, lora = growth_of(lambda: get_peft_model(model, LoraConfig(r=r, lora_alpha=r, target_modules=targets)))
    params = [p for p in model.parameters() if p.requires_grad]

    def set_grads():
        for p in params:
            p.grad = torch.zeros_like(p)

    _, grads = growth_of(set_grads)
    out = {
        "weights16": weights16,
        "weights": weights,
        "lora": lora,
        "grads": grads,
        "n_lora": sum(p.numel() for p in params),
    }
    for optim in optims:  # the optimizer transformers' Trainer builds for distill.optim, stepped once
        args = TrainingArguments(output_dir="/tmp/unused", optim=optim, report_to=[], learning_rate=1e-4)
        opt = Trainer(model=model, args=args).create_optimizer()
        _, out[optim] = growth_of(opt.step)  # the states are allocated by the first step
        del opt
    return out


def run(case: str, **kwargs) -> dict:
    """Run one case in a fresh interpreter with the allocator settings above; returns its measurements."""
    env = {
        **os.environ,
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run(
        [sys.executable, "-m", "tests.memprobe", case, json.dumps(kwargs)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if p.returncode != 0:
        raise RuntimeError(f"memprobe {case} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    case, args = sys.argv[1], json.loads(sys.argv[2])
    print(
        json.dumps(
            {
                "fused": fused,
                "exact": exact,
                "ot": ot,
                "tok_ot": tok_ot,
                "topk": topk,
                "forward": forward,
                "student": student,
            }[case](**args)
        )
    )
