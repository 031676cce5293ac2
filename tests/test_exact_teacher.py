"""The exact teacher of Stage 2 (distill.teacher_head): the teacher rebuilt from its cached hidden state and its
lm_head equals the teacher model's own log-softmax, the training step's exact KL equals a float64 full-vocabulary
reference, and Stage 2 runs with it (and refuses what cannot work) through `python -m stages.distill_student`."""

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from cache.errors import CacheMismatchError
from cache.reader import open_cache
from pipeline.config.base import save_config
from pipeline.distill import train as distill
from pipeline.distill.batches import cache_fields, collate
from pipeline.distill.head import load_teacher_head
from pipeline.distill.model import DistillModel
from pipeline.distill.student import load_student
from pipeline.losses.kl import topk_kl_loss
from pipeline.models import load_causal_lm, load_tokenizer
from tests.conftest import distill_cfg, make_cache, read_tsv, stage

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cached(tiny, tmp_path_factory):
    return make_cache(tiny, tmp_path_factory.mktemp("exact") / "cache")


def teacher_logprobs(cfg, c, indices):
    """The teacher model's own log-softmax over the real vocabulary at each cached row (R, V) float64, and its
    final hidden state there (R, D): a full forward, the reference."""
    model = load_causal_lm(cfg.cache.teacher, "fp32").eval()
    V = c.provenance["tokenizer_size"]
    lps, hs = [], []
    with torch.no_grad():
        for x in c.read_many(indices, ["input_ids", "supervised"]):
            out = model(input_ids=torch.as_tensor(x["input_ids"])[None], output_hidden_states=True)
            pos = torch.as_tensor(np.flatnonzero(x["supervised"]))  # row r sits at position pos[r]
            lps.append(out.logits[0, pos, :V].double().log_softmax(-1))
            hs.append(out.hidden_states[-1][0, pos].double())
    return torch.cat(lps), torch.cat(hs)


def test_rebuilt_teacher_equals_the_teachers_own_log_softmax(cached):
    """log_softmax(W h) from the teacher's lm_head alone: equal to the model's own log-softmax to float32 rounding
    from the exact h, and within the bf16 bound from the cached (bf16) h.

    bf16 bound: each cached element has |dh_d| <= 2^-8 |h_d|, so each logit moves by at most
    e_v = 2^-8 sum_d |W_vd| |h_d|, the log-normaliser by at most max_u e_u, and log p_v by at most e_v + max_u e_u."""
    c = open_cache(Path(cached.cache.out) / "validation.zarr")
    idx = list(range(len(c)))[:12]
    ref, h_exact = teacher_logprobs(cached, c, idx)  # (R, V)
    W, b = load_teacher_head(cached.cache.teacher, c.provenance)  # (V, D), sliced to the tokenizer
    assert b is None and W.shape == (c.provenance["tokenizer_size"], c.provenance["hidden_size"])
    exact = (h_exact.float() @ W.T).double().log_softmax(-1)
    torch.testing.assert_close(exact, ref, rtol=0, atol=2e-5)  # float32 rounding of the logits
    h = torch.as_tensor(np.concatenate([x["hidden"] for x in c.read_many(idx, ["hidden"])])).double()  # (R, D)
    rebuilt = (h @ W.double().T).log_softmax(-1)
    e = 2.0**-8 * h.abs() @ W.double().abs().T  # (R, V) per-logit bound
    bound = e + e.max(-1, keepdim=True).values + 1e-5
    err = (rebuilt - ref).abs()
    assert (err <= bound).all()
    assert err.max() > 0  # the cache is bf16: the bound is not checked against nothing
    # and the cached top-k are the same distribution's top-k (bf16 log-probs)
    top = torch.cat([torch.as_tensor(x["topk_logprobs"]) for x in c.read_many(idx, ["topk_logprobs"])]).double()
    torch.testing.assert_close(top, ref.topk(top.shape[1], -1).values, rtol=2**-8, atol=1e-6)


def test_exact_kl_step_equals_a_float64_reference(cached, tmp_path):
    """DistillModel with teacher_head: its KL equals the float64 full-vocabulary KL(teacher || student) from the
    cached hidden states, with the gradients of the student's weights; and with the top-k covering the whole
    vocabulary, the top-k path gives the same value (no tail left to approximate)."""
    cfg = distill_cfg(
        cached,
        tmp_path / "s",
        w_ce=0.0,
        w_kl=1.0,
        w_ot=0.0,
        w_ot_logits=0.0,
        temperature=2.0,
        teacher_head=cached.cache.teacher,
    )
    c = open_cache(Path(cached.cache.out) / "train.zarr")
    tok = load_tokenizer(cfg.distill.student)
    assert cache_fields(cfg.distill) == ["input_ids", "supervised", "hidden"]  # no top-k read
    batch = collate(c.read_many(range(0, len(c), len(c) // 6), cache_fields(cfg.distill)), tok.pad_token_id)
    head = load_teacher_head(cfg.distill.teacher_head, c.provenance)
    model = DistillModel(load_student(cfg.distill), cfg.distill, len(tok), None, teacher_head=head)
    loss, parts = model(batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.zero_grad()
    V, tau, m = len(tok), 2.0, batch["row_mask"]
    h = model.student.get_decoder()(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state
    rows = h.gather(1, batch["row_pos"][..., None].expand(-1, -1, h.shape[-1]))[m].double()  # (R, d)
    Ws = model.student.get_output_embeddings().weight
    q = (rows @ Ws.double()[:V].T / tau).log_softmax(-1)  # (R, V)
    p = (batch["teacher_hidden"][m].double() @ head[0].double().T / tau).log_softmax(-1)
    ref = tau**2 * (p.exp() * (p - q)).sum(-1).mean()
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(parts["kl"].double(), ref.detach(), rtol=1e-5, atol=1e-7)
    for n, g in grads.items():
        ref_g = dict(model.named_parameters())[n].grad
        torch.testing.assert_close(g, ref_g.to(g.dtype), rtol=1e-4, atol=1e-6)
    # top-k over the whole vocabulary (no tail): the top-k KL is the same number
    ids = p.argsort(-1, descending=True)
    topk = topk_kl_loss(
        rows @ Ws.double()[:V].T,
        ids,
        p.gather(-1, ids) * tau,
        None,
        torch.ones(len(ids), dtype=bool),
        temperature=tau,
        tail="none",
    )
    torch.testing.assert_close(topk, ref.detach(), rtol=1e-9, atol=1e-12)


def test_stage2_with_the_exact_teacher_and_its_refusals(cached, tmp_path):
    """The real entry point trains with the exact teacher (JSD) from an int8 cache; Stage 2 refuses a checkpoint that
    is not the cache's teacher and a cache without hidden states, naming what to change (the one-line CLI form of
    these errors is tests/test_errors.py's)."""
    cfg = copy.deepcopy(cached)
    cfg.cache.hidden_codec = "int8"
    cfg = make_cache(cfg, tmp_path / "cache_int8")
    d = distill_cfg(cfg, tmp_path / "s", teacher_head=cfg.cache.teacher, w_ot=0.1, jsd_beta=0.5, max_steps=3)
    save_config(d, tmp_path / "p.yaml")
    p = stage("distill_student", "--params", str(tmp_path / "p.yaml"))
    assert "exact teacher: lm_head" in p.stdout and "int8" in p.stdout
    rows = read_tsv(Path(d.distill.plots) / "train_s.tsv")
    assert len(rows) >= 3 and all(np.isfinite(float(r["kl"])) and float(r["kl"]) > 0 for r in rows)

    wrong = distill_cfg(cfg, tmp_path / "w", teacher_head=d.distill.student, max_steps=1)  # the student
    with pytest.raises(CacheMismatchError, match="distill.teacher_head=.* is not the teacher .*teacher_hash"):
        distill.run(wrong)
    none = copy.deepcopy(cached)
    none.cache.hidden_codec = "none"
    none = make_cache(none, tmp_path / "cache_none")
    with pytest.raises(CacheMismatchError, match="has none \\(cache.hidden_codec=none\\)"):
        distill.run(distill_cfg(none, tmp_path / "n", teacher_head=cached.cache.teacher, w_ot=0.0, max_steps=1))


def test_low_rank_cache_folds_the_basis_into_the_head(cached, tmp_path):
    """From a low-rank cache the exact teacher multiplies the r stored coefficients by lm_head folded into the basis
    (W F^T, bias b + W mean): the same loss and gradients as decoding h to D first."""
    from cache.codecs import fold

    cfg = copy.deepcopy(cached)
    cfg.cache.hidden_codec, cfg.cache.hidden_calibration_rows = "fisher:16", 400
    cfg = make_cache(cfg, tmp_path / "cache_fisher")
    c = open_cache(Path(cfg.cache.out) / "train.zarr")
    d = distill_cfg(cfg, tmp_path / "s", w_ot=0.0, w_ot_logits=0.0, teacher_head=cfg.cache.teacher).distill
    assert cache_fields(d, folded=True) == ["input_ids", "supervised", "hidden_code"]
    tok = load_tokenizer(d.student)
    idx = range(0, len(c), len(c) // 5)
    head = load_teacher_head(d.teacher_head, c.provenance)
    student = load_student(d)
    got = {}
    for name, fields, t_head in (
        ("decoded", cache_fields(d), head),
        ("folded", cache_fields(d, folded=True), fold(*head, c.basis)),
    ):
        batch = collate(c.read_many(idx, fields), tok.pad_token_id)
        model = DistillModel(student, d, len(tok), None, teacher_head=t_head)
        model.zero_grad()
        loss, parts = model(batch)
        loss.backward()
        got[name] = loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert "teacher_code" in batch and "teacher_hidden" not in batch and batch["teacher_code"].shape[-1] == 16
    torch.testing.assert_close(got["folded"][0], got["decoded"][0], rtol=1e-5, atol=1e-6)
    for n, g in got["decoded"][1].items():
        torch.testing.assert_close(got["folded"][1][n], g, rtol=1e-4, atol=1e-6)
