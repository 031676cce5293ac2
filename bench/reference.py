"""The plain full-logits reference of `DistillModel`'s training loss (pipeline/distill/model.py).

It builds what the fused production path never does, the student's full (B, L, V) logits, and feeds them to the
plain losses of pipeline/losses/kl.py and ot.py. Two users: bench/train_step_bench.py times it as the naive path,
and tests/test_distill.py and tests/test_presets.py check the fused path's loss, parts and gradients against it.
It lives under bench/, and the tests import it from here, because a benchmark must not depend on the test suite:
tests/conftest.py imports pytest (not in the `bench` extra) and sets test-only environment (HF_HUB_OFFLINE) on
import.
"""

import dataclasses

import torch


def reference_loss(model, batch: dict, num_items=None) -> tuple[torch.Tensor, dict]:
    """`DistillModel`'s loss the plain way: the student's full (B, L, V) logits into the plain losses of
    pipeline/losses/kl.py and ot.py (the reference for the fused production path; same (loss, parts))."""
    from pipeline.distill.batches import gather_rows
    from pipeline.losses.kl import ce_loss, topk_kl_loss
    from pipeline.losses.ot import OTSolver, ot_hidden_loss, ot_logits_loss

    d, V = model.cfg, model.vocab_size
    pos, mask = batch["row_pos"], batch["row_mask"]  # (B, M)
    n = mask.sum() if num_items is None else num_items
    out = model.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    rows = gather_rows(out.logits, pos)  # (B, M, V_logits) the logits at the teacher's rows
    ot_kw = dict(solver=OTSolver(**dataclasses.asdict(d.ot)))
    parts, weights = {}, {}
    if d.w_ce:
        parts["ce"], weights["ce"] = ce_loss(out.logits, batch["labels"], n, vocab_size=V), d.w_ce
    if d.w_kl:
        parts["kl"] = topk_kl_loss(
            rows,
            batch["teacher_ids"],
            batch["teacher_logprobs"],
            batch["teacher_tail"],
            mask,
            temperature=d.temperature,
            tail=d.kl_tail,
            reverse=d.kl_reverse,
            vocab_size=V,
            num_items=n,
        )
        weights["kl"] = d.w_kl
    if d.w_ot:
        x = gather_rows(out.hidden_states[-1], pos).float()  # (B, M, d) final (post-norm) states
        parts["ot_hidden"], _ = ot_hidden_loss(x, mask, batch["teacher_hidden"], mask, model.projection, **ot_kw)
        weights["ot_hidden"] = d.w_ot
    if d.w_ot_logits:
        parts["ot_logits"], _ = ot_logits_loss(
            rows, batch["teacher_ids"], batch["teacher_logprobs"], mask, mask, vocab_size=V, **ot_kw
        )
        weights["ot_logits"] = d.w_ot_logits
    loss = sum(weights[k] * v for k, v in parts.items())
    return loss, {k: v.detach().float() for k, v in parts.items()}
