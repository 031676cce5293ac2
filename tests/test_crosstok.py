"""Cross-tokenizer distillation: byte alignment of two tokenizations, the token map, the losses against float64
references (bucket log-probs, mapped KL, ULD, token-level OT, hidden-state OT with N != M), the identity case
(cross mode with the teacher's own tokenizer = the same-tokenizer losses), the real entry points end to end, and
the refusals."""

import copy
import json
import math
import shutil
from pathlib import Path

import numpy as np
import ot
import pytest
import torch

from cache.reader import CacheBlocks, open_cache
from pipeline.data.records import ALPACA_TEMPLATE, render, tokenizer_hash
from pipeline.data.tiny import build_tokenizer
from pipeline.distill import train as distill
from pipeline.distill.batches import BlockCollator, cache_fields
from pipeline.distill.chunks import ChunkEvents
from pipeline.distill.crosstok import (
    StudentSide,
    align,
    load_teacher_tokenizer,
    response_positions,
    token_bytes,
    token_map,
)
from pipeline.losses.crosstok import (
    bucket_kl,
    bucket_logprobs,
    entropic_ot,
    mapped_teacher_buckets,
    student_topk,
    token_ot_loss,
    uld_loss,
)
from pipeline.losses.kl import LOG_FLOOR
from pipeline.losses.ot import OTSolver, ot_hidden_loss
from tests.conftest import distill_cfg, make_cache, read_tsv, rel_err, stage
from tests.test_losses import make_hidden, ref_ot_from_similarity

TEXTS = ["王大丫丫的回答是--->5302 + 3302", "the answer is 123456 or 7890", "été → 42 ü 17"] * 20


@pytest.fixture(scope="module")
def two_tokenizers(tmp_path_factory):
    """Two byte-level BPE tokenizers on the same text with other merges: digits one by one / in pairs."""
    tmp = tmp_path_factory.mktemp("toks")
    texts = [ALPACA_TEMPLATE.format(instruction="x", input="") + t for t in TEXTS]
    return build_tokenizer(texts, tmp / "a", 300), build_tokenizer(texts, tmp / "b", 420, digits=2)


def positions(tok, output):
    rec = {"instruction": "x", "input": "", "output": output}
    return response_positions(tok, token_bytes(tok), rec, "alpaca")


# ---------------------------------------------------------------------------------------------------------
# Alignment and the token map
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("output", TEXTS[:3] + ["x9", "丫"])
def test_positions_are_the_byte_offsets_of_the_tokens_in_the_answer(two_tokenizers, output):
    for tok in two_tokenizers:
        ids, starts = positions(tok, output)
        raw = output.encode()
        table = token_bytes(tok)
        body = [i for i in ids if table[i] is not None]
        assert b"".join(table[i] for i in body) == raw  # the answer's bytes, token by token
        assert list(starts[: len(body)]) == list(np.cumsum([0] + [len(table[i]) for i in body[:-1]]))
        assert starts[-1] == len(raw) and ids[-1] == tok.eos_token_id  # the end sits at the answer's length


def test_alignment_pairs_exactly_the_rows_whose_context_bytes_are_equal(two_tokenizers):
    a, b = two_tokenizers
    for output in TEXTS[:3]:
        ta, sa = positions(a, output)
        tb, sb = positions(b, output)
        al = align(sa, sb)
        assert len(al) == len(sb) and (al >= 0).any()
        for i, j in enumerate(al):
            if j >= 0:
                assert sa[j] == sb[i]  # the same answer prefix on both sides
            else:
                assert sb[i] not in set(sa.tolist()) or i > 0 and sb[i] == sb[i - 1]
        assert al[0] == 0 and al[-1] == len(sa) - 1  # the first token and the end always align


def test_a_position_where_boundaries_never_coincide_is_not_aligned():
    """Hand-made starts: the student's token at 2 has no teacher token starting at 2."""
    t = np.array([0, 1, 3, 4])  # teacher tokens "a" "bc" "d" + end
    s = np.array([0, 2, 4])  # student "ab" "cd" + end
    assert align(t, s).tolist() == [0, -1, 3]
    assert align(np.array([0, 0, 5]), np.array([0, 5])).tolist() == [0, 2]  # a repeated start is not a boundary


def test_multi_byte_characters_split_mid_character_align_by_bytes(two_tokenizers):
    """回 is e5 9b 9e: a token that starts at 9e must not align with one that starts at e5."""
    a, _ = two_tokenizers
    ids, starts = positions(a, "回答")
    table = token_bytes(a)
    mid = [s for i, s in zip(ids, starts) if table[i] is not None and s % 3]  # starts inside a character
    # the byte offsets are exact whether or not this tokenizer splits inside a character here
    assert all(0 < s < 6 for s in mid)
    assert align(np.array([0, 2, 6]), np.array([0, 3, 6])).tolist() == [0, -1, 2]


def test_a_model_folder_tokenizes_as_its_tokenizer_json_says(two_tokenizers, tmp_path):
    """transformers 5 loads a qwen2 model folder's tokenizer as Qwen2Tokenizer, which rebuilds Qwen's one-digit
    pre-tokenizer: load_tokenizer must keep the saved one (here digits in pairs), or the cross-tokenizer student
    would silently tokenize like its teacher."""
    from transformers import AutoTokenizer

    from pipeline.data.tiny import build_model
    from pipeline.models import load_tokenizer

    _, b = two_tokenizers
    build_model(b, tmp_path / "m", hidden_size=8, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=16)
    text = "the answer is 123456"
    want = b(text)["input_ids"]
    assert len(want) < len(AutoTokenizer.from_pretrained(tmp_path / "m")(text)["input_ids"])  # the trap is real
    assert load_tokenizer(str(tmp_path / "m"))(text)["input_ids"] == want


def test_token_map_is_exact_and_never_maps_specials_to_ordinary_tokens(two_tokenizers):
    a, b = two_tokenizers
    m = token_map(a, b)
    ta, tb = token_bytes(a), token_bytes(b)
    assert len(m) == len(a) and (m >= 0).sum() > 100
    special_a, special_b = set(a.all_special_ids), set(b.all_special_ids)
    for i, j in enumerate(m.tolist()):
        if j < 0:
            assert ta[i] is None or ta[i] not in set(tb)
            continue
        if i in special_a:
            assert j in special_b
        else:
            assert j not in special_b and ta[i] == tb[j]
    assert m[a.eos_token_id] == b.eos_token_id
    assert (token_map(a, a) == torch.arange(len(a))).all()  # a tokenizer maps onto itself exactly


# ---------------------------------------------------------------------------------------------------------
# Losses against float64 references
# ---------------------------------------------------------------------------------------------------------

R, V, V_LOGITS, Dm, K = 41, 401, 448, 24, 7


def bucket_data(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(R, Dm, generator=g, dtype=dtype)
    W = torch.randn(V_LOGITS, Dm, generator=g, dtype=dtype) / 2
    bias = torch.randn(V_LOGITS, generator=g, dtype=dtype)
    ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(R)])  # distinct per row
    valid = torch.rand(R, K, generator=g) < 0.7
    valid[3] = False  # a row without a mapped slot
    valid[4] = True
    return h, W, bias, ids, valid


def ref_buckets(h, W, bias, ids, valid, scale):
    z = (h @ W.T + bias)[:, :V] / scale[:, None]  # (R, V)
    lp = z.log_softmax(-1)
    s = torch.where(valid, lp.gather(-1, ids), 0.0)
    rest = lp.masked_fill(torch.zeros_like(lp, dtype=torch.bool).scatter(-1, ids, valid), float("-inf"))
    return torch.cat([s, rest.logsumexp(-1, keepdim=True)], -1)


@pytest.mark.parametrize("chunk_rows", [None, 8])
def test_bucket_logprobs_match_the_full_logits_reference(chunk_rows):
    h64, W64, b64, ids, valid = bucket_data()
    for t in (h64, W64, b64):
        t.requires_grad_()
    scale64 = 0.5 + torch.rand(R, dtype=torch.float64)
    h, W, b = (t.detach().float().requires_grad_() for t in (h64, W64, b64))
    got = bucket_logprobs(h, W, ids, valid, vocab_size=V, bias=b, scale=scale64.float(), chunk_rows=chunk_rows)
    want = ref_buckets(h64, W64, b64, ids, valid, scale64)
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-5)
    g = torch.randn(R, K + 1, dtype=torch.float64)
    (got * g.float()).sum().backward()
    (want * torch.where(torch.cat([valid, torch.ones(R, 1, dtype=torch.bool)], -1), g, 0.0)).sum().backward()
    for x, ref in [(h.grad, h64.grad), (W.grad, W64.grad), (b.grad, b64.grad)]:
        assert rel_err(x, ref) < 1e-5
    assert (W.grad[V:] == 0).all()  # padded logit rows are no tokens


def test_student_topk_is_the_full_logits_topk():
    h, W, b, _, _ = bucket_data(dtype=torch.float32)
    ids, std = student_topk(h, W, 5, vocab_size=V, bias=b, chunk_rows=8)
    z = (h @ W.T + b)[:, :V]
    assert (ids == z.topk(5, -1).indices).all()
    torch.testing.assert_close(std, z.std(-1))


def test_mapped_kl_matches_the_bucket_reference_and_is_zero_for_the_teacher_itself():
    h64, W64, b64, ids, valid = bucket_data(1)
    tau = 2.0
    g = torch.Generator().manual_seed(5)
    t_lp = torch.randn(R, K, generator=g, dtype=torch.float64).log_softmax(-1) - 0.3  # top-k + a tail of ~26%
    t_tail = torch.log1p(-t_lp.exp().sum(-1))
    mask = torch.rand(R, generator=g) < 0.8
    h = h64.detach().float().requires_grad_()
    h64.requires_grad_()
    s = bucket_logprobs(h, W64.float(), ids, valid, vocab_size=V, bias=b64.float(), scale=tau)
    t = mapped_teacher_buckets(t_lp.float(), t_tail.float(), valid)
    got = bucket_kl(s, t, valid, mask, temperature=tau)
    # reference: unmapped teacher mass joins its tail; buckets = mapped ids + everything else
    s64 = ref_buckets(h64, W64, b64, ids, valid, torch.full((R,), tau, dtype=torch.float64))
    P_t = torch.cat(
        [torch.where(valid, t_lp.exp(), 0.0), (t_tail.exp() + torch.where(valid, 0.0, t_lp.exp()).sum(-1))[:, None]], -1
    )
    ok = torch.cat([valid, torch.ones(R, 1, dtype=torch.bool)], -1)
    lt = torch.where(ok, P_t.log() / tau, float("-inf")).log_softmax(-1)
    kl = torch.where(ok, lt.exp() * (lt - torch.where(ok, s64, 0.0)), 0.0).sum(-1)
    want = tau**2 * kl[mask].sum() / mask.sum()
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-6)
    got.backward()
    want.backward()
    assert rel_err(h.grad, h64.grad) < 1e-4
    assert (h.grad[~mask] == 0).all()
    # the student's own buckets as the teacher: zero
    s0 = s.detach()
    assert bucket_kl(s0, s0, valid, mask).abs() < 1e-6
    assert bucket_kl(s0, t, valid, torch.zeros(R, dtype=torch.bool)) == 0  # nothing counts


def test_uld_matches_the_sorted_probability_reference():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(R, K + 1, generator=g, dtype=torch.float64).log_softmax(-1).requires_grad_()
    t = torch.randn(R, K + 1, generator=g, dtype=torch.float64).log_softmax(-1)
    t = torch.cat([t[:, :K].sort(-1, descending=True).values, t[:, K:]], -1)
    mask = torch.rand(R, generator=g) < 0.6
    got = uld_loss(s, t, mask)
    q = s.detach().exp()
    want = (
        sum(
            (
                np.abs(np.sort(q[r, :K].numpy())[::-1] - t[r, :K].exp().numpy()).sum()
                + abs(q[r, K].item() - t[r, K].exp().item())
            )
            for r in range(R)
            if mask[r]
        )
        / mask.sum().item()
    )
    assert abs(got.item() - want) < 1e-12
    got.backward()
    assert (s.grad[~mask] == 0).all() and s.grad[mask].abs().sum() > 0
    assert uld_loss(t, t, mask) == 0


def test_entropic_ot_with_weighted_marginals_matches_pot():
    g = torch.Generator().manual_seed(3)
    n, m, eps = 7, 9, 0.1
    C = torch.rand(4, n, m, generator=g, dtype=torch.float64) * 2
    a = torch.rand(4, n, generator=g, dtype=torch.float64).softmax(-1)
    b = torch.rand(4, m, generator=g, dtype=torch.float64).softmax(-1)
    value, T, f, gg = entropic_ot(C, a.log(), b.log(), eps, tol=1e-12, max_iter=5000)
    for r in range(4):
        T_pot = ot.sinkhorn(
            a[r].numpy(), b[r].numpy(), C[r].numpy(), eps, method="sinkhorn_log", stopThr=1e-13, numItermax=100000
        )
        np.testing.assert_allclose(T[r].numpy(), T_pot, atol=1e-10)
        Tp = torch.as_tensor(T_pot)
        primal = (Tp * C[r]).sum() + eps * (Tp * (Tp / (a[r][:, None] * b[r][None])).log()).sum()
        assert abs(value[r].item() - primal.item()) < 1e-9  # dual value = primal value at the optimum


def test_token_ot_gradient_is_the_envelope_gradient():
    """Value against POT's plan; gradients against finite differences of the converged value (float64)."""
    g = torch.Generator().manual_seed(4)
    Rr, n, m, d, D = 5, 4, 6, 8, 10
    log_a = torch.randn(Rr, n, generator=g, dtype=torch.float64).log_softmax(-1).requires_grad_()
    xs = torch.randn(Rr, n, d, generator=g, dtype=torch.float64).requires_grad_()
    log_b = torch.randn(Rr, m, generator=g, dtype=torch.float64)
    log_b[1, -2:] = float("-inf")  # unused teacher slots
    yt = torch.randn(Rr, m, D, generator=g, dtype=torch.float64)
    proj = torch.randn(D, d, generator=g, dtype=torch.float64).requires_grad_()
    mask = torch.tensor([True, True, False, True, True])

    def f(la, x, p):
        return token_ot_loss(la, x, log_b, yt, p, mask, eps=0.2, tol=1e-13, max_iter=20000)

    loss = f(log_a, xs, proj)
    loss.backward()
    args = [log_a.detach(), xs.detach(), proj.detach()]
    for which, grad in enumerate([log_a.grad, xs.grad, proj.grad]):
        t = args[which]
        for i in range(0, t.numel(), max(1, t.numel() // 25)):  # a spread of coordinates
            e = torch.zeros_like(t).view(-1)
            e[i] = 1e-6
            up, down = list(args), list(args)
            up[which], down[which] = t + e.view_as(t), t - e.view_as(t)
            num = (f(*up) - f(*down)).item() / 2e-6
            assert abs(num - grad.view(-1)[i].item()) < 1e-6 * max(1.0, abs(num)), (which, i)
        assert grad.abs().sum() > 0
    assert (xs.grad[~mask] == 0).all()


@pytest.mark.parametrize("N_, M_", [(23, 37), (41, 37), (37, 1), (1, 37)])
def test_ot_hidden_with_n_not_m_matches_reference(N_, M_):
    """The seed's loss between sequences of different lengths, both ways, in a batch that mixes lengths."""
    x64, y64, p64 = make_hidden(7)
    x64, y64 = x64[:, :N_].clone().requires_grad_(), y64[:, :M_].clone()
    p64.requires_grad_()
    x_mask = torch.ones(3, N_, dtype=torch.bool)
    y_mask = torch.ones(3, M_, dtype=torch.bool)
    x_mask[1, N_ // 2 + 1 :] = False  # another length per sequence on each side
    y_mask[2, M_ // 3 + 1 :] = False
    x, proj = x64.detach().float().requires_grad_(), p64.detach().float().requires_grad_()
    loss, _ = ot_hidden_loss(x, x_mask, y64.float(), y_mask, proj, solver=OTSolver(eps=0.05, tol=1e-6))
    ref = ref_ot_from_similarity(x64 @ (y64 @ p64).transpose(1, 2) / math.sqrt(x64.shape[-1]), x_mask, y_mask, 0.05)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-7)
    if 1 in (N_, M_):  # one token on a side: <T, C> = 1 - 1/M whatever the states (rows of C sum to M - 1)
        assert x.grad.abs().max() < 1e-6 and proj.grad.abs().max() < 1e-6
    else:
        assert rel_err(x.grad, x64.grad) < 1e-4 and rel_err(proj.grad, p64.grad) < 1e-4


# ---------------------------------------------------------------------------------------------------------
# Stage 2 across tokenizers
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cached(tiny, tmp_path_factory):
    return make_cache(tiny, tmp_path_factory.mktemp("crosstok") / "cache")


def cross_cfg(cached, out, **kw):
    cfg = distill_cfg(cached, out, cross_tokenizer=True, **kw)
    cfg.distill.student = str(Path(cached.prepare.out_models) / "student_x")
    return cfg


def test_stage1_saves_the_teacher_tokenizer_and_embedding_rows(cached):
    out = Path(cached.cache.out)
    store = open_cache(out / "train.zarr")
    tok = load_teacher_tokenizer(out, store.provenance["tokenizer_hash"])
    assert len(tok) == store.provenance["tokenizer_size"]
    emb = distill.load_teacher_embeddings(str(out))
    ids = np.unique(
        np.concatenate(
            [
                open_cache(out / f"{s}.zarr")
                .read_many(range(len(open_cache(out / f"{s}.zarr"))), ["topk_ids"])[i]["topk_ids"]
                .ravel()
                for s in ("train", "validation")
                for i in range(3)
            ]
        )
    )
    assert set(ids) <= set(emb[0].tolist())
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(cached.cache.teacher)
    torch.testing.assert_close(emb[1], teacher.get_input_embeddings().weight[emb[0]].detach().float())


def test_cross_mode_with_the_teachers_own_tokenizer_equals_the_same_tokenizer_losses(cached, tmp_path):
    """The identity case: every row aligned with itself, the map the identity - CE, KL, both OT and ULD must equal
    the same-tokenizer path's (which tests/test_distill.py checks against full-logits references)."""
    cfg = distill_cfg(cached, tmp_path / "s", w_uld=0.1, w_tok_ot=0.1)
    d = cfg.distill
    d.w_chunk_kl = d.w_alm = 0.1  # set after validation: the same-tokenizer run ignores them, the cross one adds them
    d = cfg.distill
    cache = open_cache(Path(d.cache) / "train.zarr")
    tok = load_teacher_tokenizer(d.cache, cache.provenance["tokenizer_hash"])
    reads = CacheBlocks(cache, 8, cache_fields(d))[0]
    same = BlockCollator(tok.pad_token_id)([reads])
    tmap = token_map(tok, tok)
    events = ChunkEvents(token_bytes(tok), token_bytes(tok), tmap)
    side = StudentSide(cfg.data, tok, tok, events=events)
    cross = BlockCollator(tok.pad_token_id, tmap)([[{**r, **side.example(r)} for r in reads]])
    for k in ("input_ids", "row_pos", "row_mask", "teacher_ids"):
        assert torch.equal(same[k], cross[k]), k
    assert (
        cross["aligned"][cross["row_mask"]]
        == torch.arange(cross["row_mask"].shape[1]).expand_as(cross["row_mask"])[cross["row_mask"]]
    ).all()
    model = distill.build_model(d, cache.provenance["hidden_size"], len(tok), 0, None, (events.first_piece, len(tok)))
    _, a = model(same)
    d.cross_tokenizer = True
    _, b = model(cross)
    for k in ("ce", "kl", "ot_hidden", "ot_logits", "uld", "tok_ot"):
        torch.testing.assert_close(b[k], a[k], rtol=2e-5, atol=1e-6, msg=k)
    assert b["kl_aligned_rows"] == 1 and b["mapped_mass"] == 1
    # one tokenizer: every row is its own chunk and every first piece its own id, so the chunk KL is the mapped KL
    # over the cached top-k plus, where the observed token is outside it, that token as one more bucket
    assert b["chunk_rows"] == 1
    r = cross["row_mask"]
    target = cross["input_ids"].gather(1, cross["row_pos"] + 1)[r]  # (R,)
    ids, lp, obs = cross["teacher_ids"][r], cross["teacher_logprobs"][r], cross["teacher_observed"][r]
    outside = ~(ids == target[:, None]).any(-1)
    assert outside.any()  # the random tiny teacher copies its input: the observed token is mostly outside
    ids = torch.cat([ids, target[:, None]], -1)  # (R, k+1)
    lp = torch.cat([lp, torch.where(outside, obs, LOG_FLOOR)[:, None]], -1)
    valid = torch.cat([torch.ones_like(ids[:, :-1], dtype=torch.bool), outside[:, None]], -1)
    tail = torch.log1p(-torch.where(valid, lp, -torch.inf).exp().sum(-1).clamp_max(1 - 1e-7))
    with torch.no_grad():
        h = model.student.get_decoder()(input_ids=cross["input_ids"], attention_mask=cross["attention_mask"])
        rows = h.last_hidden_state.gather(1, cross["row_pos"][..., None].expand(-1, -1, h.last_hidden_state.shape[-1]))
        W = model.student.get_output_embeddings().weight
        s = bucket_logprobs(rows[r], W, torch.where(valid, ids, 0), valid, vocab_size=len(tok))
        want = bucket_kl(s, mapped_teacher_buckets(lp, tail, valid), valid, torch.ones_like(outside))
    torch.testing.assert_close(b["chunk_kl"], want, rtol=1e-4, atol=1e-5)
    assert b["alm"] > 0


def test_cross_tokenizer_stage2_end_to_end(cached, tmp_path):
    """Stage 2 through `python -m stages.distill_student` with the other tokenizer: every term finite, the loss goes
    down, most rows align, the student's own tokenizer is saved."""
    cfg = cross_cfg(cached, tmp_path / "sx", w_uld=0.1, w_tok_ot=0.1, w_chunk_kl=0.5, w_alm=0.1, max_steps=12, lr=2e-2)
    from pipeline.config.base import save_config

    save_config(cfg, tmp_path / "params.yaml")
    p = stage("distill_student", "--params", str(tmp_path / "params.yaml"))
    assert "cross-tokenizer:" in p.stdout
    rows = read_tsv(Path(cfg.distill.plots) / "train_sx.tsv")
    loss = [float(r["loss"]) for r in rows]
    assert np.isfinite(loss).all() and np.mean(loss[-3:]) < loss[0] - 0.1
    for k in (
        "ce",
        "kl",
        "ot_hidden",
        "ot_logits",
        "uld",
        "tok_ot",
        "kl_aligned_rows",
        "mapped_mass",
        "chunk_kl",
        "alm",
    ):
        v = [float(r[k]) for r in rows]
        assert np.isfinite(v).all(), k
    assert 0.2 < float(rows[0]["kl_aligned_rows"]) <= 1 and 0.5 < float(rows[0]["mapped_mass"]) <= 1
    # digits in pairs: most student rows are whole teacher tokens or pairs of them, so they carry events
    assert 0.5 < float(rows[0]["chunk_rows"]) <= float(rows[0]["kl_aligned_rows"])
    out = Path(cfg.distill.out)
    assert (out / "tok_projection.pt").exists() and (out / "projection.pt").exists()
    from pipeline.models import load_tokenizer

    assert tokenizer_hash(load_tokenizer(str(out))) == tokenizer_hash(load_tokenizer(cfg.distill.student))


def test_student_sequences_differ_in_length_from_the_teachers(cached):
    """The embedded pair really differs: N != M for most sequences."""
    cfg = cross_cfg(cached, Path("unused"))
    cache = open_cache(Path(cfg.distill.cache) / "train.zarr")
    tok_t = load_teacher_tokenizer(cfg.distill.cache, cache.provenance["tokenizer_hash"])
    from pipeline.models import load_tokenizer

    side = StudentSide(cfg.data, load_tokenizer(cfg.distill.student), tok_t)
    reads = cache.read_many(range(40), ["input_ids", "supervised"])
    diff = [len(side.example(r)["student_rows"]) < int(r["supervised"].sum()) for r in reads]
    assert np.mean(diff) > 0.5  # digits in pairs: shorter answers


def test_truncated_student_keeps_only_the_text_both_sides_cover(cached, tmp_path):
    """A student max length shorter than its sequences: the teacher rows beyond what the student saw leave the
    sequence-level terms; the kept rows of both sides cover the same answer bytes."""
    cfg = cross_cfg(cached, tmp_path / "t")
    cache = open_cache(Path(cfg.distill.cache) / "train.zarr")
    tok_t = load_teacher_tokenizer(cfg.distill.cache, cache.provenance["tokenizer_hash"])
    from pipeline.models import load_tokenizer

    tok_s = load_tokenizer(cfg.distill.student)
    data = copy.deepcopy(cfg.data)
    r = cache.read(0, ["input_ids", "supervised"])
    rec = StudentSide(data, tok_s, tok_t).by_sid[r["sample_id"]]
    prompt_len = len(tok_s(render(rec, tok_s, "alpaca")[0], add_special_tokens=False)["input_ids"])
    data.max_length = prompt_len + 2  # the student sees 2 answer tokens only
    ex = StudentSide(data, tok_s, tok_t).example(r)
    assert len(ex["student_rows"]) == 2 and ex["student_keep"].all()
    assert 0 < ex["teacher_keep"].sum() < r["supervised"].sum()


def test_teacher_truncated_before_the_student_keeps_only_the_text_both_sides_cover(cached):
    """The student's tokenization is longer than what the teacher cached (the teacher cut at its max length): the
    student rows beyond the teacher's text leave the sequence-level terms and are never aligned."""
    cfg = cross_cfg(cached, Path("unused"))
    cache = open_cache(Path(cfg.distill.cache) / "train.zarr")
    tok_t = load_teacher_tokenizer(cfg.distill.cache, cache.provenance["tokenizer_hash"])
    from pipeline.models import load_tokenizer

    side = StudentSide(cfg.data, load_tokenizer(cfg.distill.student), tok_t)
    r = cache.read(5, ["input_ids", "supervised"])
    full = side.example(r)
    first = int(np.flatnonzero(r["supervised"])[0])
    cut = {**r, "input_ids": r["input_ids"][: first + 4], "supervised": r["supervised"][: first + 4].copy()}
    cut["supervised"][-1] = False  # the teacher saw 4 answer tokens: 3 rows predict within them
    ex = side.example(cut)
    assert ex["teacher_keep"].all() and len(ex["teacher_keep"]) == 3
    assert 0 < ex["student_keep"].sum() < len(full["student_rows"])
    assert (ex["aligned"][~ex["student_keep"]] == -1).all()
    kept = full["aligned"][: len(ex["aligned"])][ex["student_keep"]]
    assert (ex["aligned"][ex["student_keep"]] == np.where(kept < 3, kept, -1)).all()


def test_refusals(cached, tmp_path):
    # another tokenizer without cross_tokenizer: refused, naming the option
    cfg = cross_cfg(cached, tmp_path / "a")
    cfg.distill.cross_tokenizer = False
    from pipeline.config.base import save_config

    save_config(cfg, tmp_path / "p.yaml")
    p = stage("distill_student", "--params", str(tmp_path / "p.yaml"), check=False)
    assert p.returncode != 0 and "distill.cross_tokenizer=true" in p.stderr and "Traceback" not in p.stderr
    # a cache from before cross-tokenizer support (no saved tokenizer): a clear error
    old = tmp_path / "old_cache"
    shutil.copytree(cached.cache.out, old)
    shutil.rmtree(old / "tokenizer")
    cfg = cross_cfg(cached, tmp_path / "b")
    cfg.distill.cache = str(old)
    save_config(cfg, tmp_path / "q.yaml")
    p = stage("distill_student", "--params", str(tmp_path / "q.yaml"), check=False)
    assert p.returncode != 0 and "no saved teacher tokenizer" in p.stderr and "Traceback" not in p.stderr


def test_student_tokenizer_without_pad_token_is_handled(cached, tmp_path):
    student = tmp_path / "student_nopad"
    shutil.copytree(Path(cached.prepare.out_models) / "student_x", student)
    conf = json.loads((student / "tokenizer_config.json").read_text())
    conf["pad_token"] = None  # (a missing key would get Qwen2Tokenizer's default, <|endoftext|>)
    (student / "tokenizer_config.json").write_text(json.dumps(conf))
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(student)).pad_token_id is None  # as Llama-3 ships
    cfg = cross_cfg(cached, tmp_path / "c", max_steps=2)
    cfg.distill.student = str(student)
    distill.run(cfg)
    assert (Path(cfg.distill.out) / "model.safetensors").exists()


def test_mapped_teacher_buckets_move_unmapped_mass_to_the_tail():
    t_lp = torch.tensor([[math.log(0.5), math.log(0.3), math.log(0.1)]])
    tail = torch.tensor([math.log(0.1)])
    got = mapped_teacher_buckets(t_lp, tail, torch.tensor([[True, False, True]])).exp()
    torch.testing.assert_close(got, torch.tensor([[0.5, math.exp(LOG_FLOOR), 0.1, 0.4]]))
