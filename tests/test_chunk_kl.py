"""Chunk-level cross-tokenizer losses (pipeline/losses/chunk.py, pipeline/distill/chunks.py).

The central check builds a known source of text, a teacher that writes it one letter per token and a student whose
vocabulary also holds "ab" and "ca" (tokenizing greedily, longest match first): the student's exact next-token
distribution is then the teacher's induced one, computed by enumerating every text. From the teacher's cached rows
alone (top-k, observed log-probs), the events must carry exactly the student's probabilities - KL 0, both sides
summing to 1 - with the full vocabulary cached and with a top-2 that misses the observed token.
"""

import itertools

import numpy as np
import pytest
import torch

from pipeline.config.base import ConfigError
from pipeline.config.distill import DistillConfig
from pipeline.distill.batches import cache_fields
from pipeline.distill.chunks import ChunkEvents
from pipeline.distill.crosstok import alm_chunks
from pipeline.losses.chunk import alm_loss, chunk_kl, chunk_teacher_events, event_index, event_logprobs
from pipeline.losses.crosstok import bucket_kl, bucket_logprobs, mapped_teacher_buckets

T_BYTES = [b"a", b"b", b"c", None]  # the teacher: one letter per token; 3 = end of sequence
S_BYTES = [b"a", b"b", b"c", b"ab", b"ca", None]  # the student: also "ab" and "ca"; 5 = end of sequence
T_MAP = torch.tensor([0, 1, 2, 5])  # identical strings (and end of sequence -> end of sequence)
T_IDS = {b"a": 0, b"b": 1, b"c": 2}
S_IDS = {b"a": 0, b"b": 1, b"c": 2, b"ab": 3, b"ca": 4}
T_EOS, S_EOS = 3, 5


def source(rare: str) -> dict[str, float]:
    """A random distribution over texts of 0-4 letters (long ones likely), texts starting with `rare` made rare."""
    rng = np.random.default_rng(0)
    texts = ["".join(w) for n in range(5) for w in itertools.product("abc", repeat=n)]
    p = rng.gamma(1.0, size=len(texts)) * np.array([1.0 if len(w) == 4 else 0.05 for w in texts])
    p *= np.array([0.02 if w.startswith(rare) else 1.0 for w in texts])
    return dict(zip(texts, p / p.sum()))


def teacher_row(P, x: str) -> np.ndarray:
    """p(next teacher token | text so far = x), over the teacher ids."""
    start = sum(p for w, p in P.items() if w.startswith(x))
    out = [sum(p for w, p in P.items() if w.startswith(x + c)) for c in "abc"] + [P.get(x, 0.0)]
    return np.array(out) / start


def greedy(text: str) -> list[int]:
    """The student's tokens of a text: longest match first, then the end of sequence."""
    out, i = [], 0
    while i < len(text):
        n = 2 if text[i : i + 2].encode() in S_IDS else 1
        out.append(S_IDS[text[i : i + n].encode()])
        i += n
    return out + [S_EOS]


def student_row(P, x: str) -> np.ndarray:
    """The student's exact next-token distribution after x (a token boundary): the teacher's, induced."""
    q = np.zeros(len(S_BYTES))
    start = sum(p for w, p in P.items() if w.startswith(x))
    for w, p in P.items():
        if w.startswith(x):
            q[greedy(w[len(x) :])[0]] += p / start
    return q


def scenario(text: str, rare: str, k: int):
    """Teacher cache rows along `text` (top-k, log-probs, observed log-probs) and the student's rows and exact
    distributions, both in float64."""
    P = source(rare)
    t_targets = np.array([T_IDS[c.encode()] for c in text] + [T_EOS])
    rows = np.log(np.stack([teacher_row(P, text[:j]) for j in range(len(t_targets))]).clip(1e-300))  # (M, V_t)
    topk = np.argsort(-rows, axis=1, kind="stable")[:, :k]  # (M, k)
    s_targets = np.array(greedy(text))
    starts = np.cumsum([0] + [len(S_BYTES[u] or b"") for u in s_targets[:-1]])
    q = np.stack([student_row(P, text[:s]) for s in starts])  # (N, V_s)
    aligned = starts.copy()  # one letter per teacher token: teacher row = byte offset
    return dict(
        t_targets=t_targets,
        topk=topk,
        lp=np.take_along_axis(rows, topk, 1),
        obs=rows[np.arange(len(t_targets)), t_targets],
        s_targets=s_targets,
        aligned=aligned,
        q=q,
    )


def teacher_events(sc, ev):
    """`chunk_teacher_events` fed as the Stage-2 model feeds it: rows gathered at each student row's first and
    last teacher rows, the observed log-probs summed over the prefix."""
    j0, j1 = ev["chunk_first"], ev["chunk_last"]
    cum = np.concatenate([[0.0], np.cumsum(sc["obs"])])
    prefix = cum[j1] - cum[j0]
    ok = torch.from_numpy(np.concatenate([ev["ev_groups"] >= 0, ev["ev_singles"] >= 0], 1))
    t = chunk_teacher_events(
        torch.from_numpy(sc["lp"][j0]),
        torch.from_numpy(sc["obs"][j0]),
        torch.from_numpy(sc["lp"][j1]),
        torch.from_numpy(prefix),
        torch.from_numpy(prefix + sc["obs"][j1]),
        torch.from_numpy(ev["ev_boundary"]),
        ok,
    )
    return t, ok


@pytest.mark.parametrize("k", [4, 2])
@pytest.mark.parametrize("text,rare", [("abca", "ab"), ("abcb", "abcb")])
def test_student_that_is_the_induced_teacher_has_loss_zero(text, rare, k):
    sc = scenario(text, rare, k)
    events = ChunkEvents(T_BYTES, S_BYTES, T_MAP)
    assert events.first_piece.tolist() == [0, 1, 2, 0, 2, 3]  # "ab" starts with "a", "ca" with "c"
    ev = events.rows(sc["s_targets"], sc["aligned"], sc["t_targets"], sc["topk"], np.ones(len(sc["topk"]), bool))
    assert (ev["chunk_first"] >= 0).all()  # every student token here is made of whole teacher tokens
    assert (ev["chunk_last"] - ev["chunk_first"]).tolist() == [
        1 if S_BYTES[u] in (b"ab", b"ca") else 0 for u in sc["s_targets"]
    ]
    if k == 2:  # the cases the observed log-probs exist for: an observed token outside the top-k
        assert (ev["ev_singles"][:, k] >= 0).any() or (ev["ev_groups"][:, k] >= 0).any()
    t, ok = teacher_events(sc, ev)
    h = torch.from_numpy(np.log(sc["q"].clip(1e-300)))  # (N, V_s): logits = the exact log-probs
    s = event_logprobs(
        h,
        torch.eye(len(S_BYTES), dtype=torch.float64),
        torch.from_numpy(ev["ev_groups"]),
        torch.from_numpy(ev["ev_singles"]),
        events.first_piece,
        n_teacher=len(T_BYTES),
    )
    full = torch.cat([ok, torch.ones_like(ok[:, :1])], -1)
    # both sides sum to one over the row's events; the student's events partition its vocabulary
    assert torch.allclose(torch.where(full, t, -torch.inf).logsumexp(-1), torch.zeros(len(t), dtype=t.dtype))
    assert torch.allclose(s.logsumexp(-1), torch.zeros(len(s), dtype=s.dtype))
    live = full & (t.exp() > 1e-12)
    assert torch.allclose(s[live], t[live], atol=1e-9)  # event by event, not only on the whole
    mask = torch.ones(len(s), dtype=torch.bool)
    assert chunk_kl(s, t, ok, mask).item() == pytest.approx(0.0, abs=1e-10)
    other = h + torch.linspace(0, 1, h.shape[1], dtype=h.dtype)  # any other student is further away
    s2 = event_logprobs(
        other,
        torch.eye(len(S_BYTES), dtype=torch.float64),
        torch.from_numpy(ev["ev_groups"]),
        torch.from_numpy(ev["ev_singles"]),
        events.first_piece,
        n_teacher=len(T_BYTES),
    )
    assert chunk_kl(s2, t, ok, mask).item() > 1e-3


def event_reference(h, W, groups, singles, first_piece):
    """float64 loop: log of the student's mass on each event, -inf for an event without ids."""
    logq = torch.log_softmax(h.double() @ W.double().T, -1)
    R, G = groups.shape
    S = singles.shape[1]
    out = torch.full((R, G + S + 1), -torch.inf, dtype=torch.float64)
    for r in range(R):
        owner = []
        for u in range(W.shape[0]):
            e = G + S
            if first_piece[u] >= 0 and (groups[r] == first_piece[u]).any():
                e = int((groups[r] == first_piece[u]).nonzero()[0])
            if (singles[r] == u).any():
                e = G + int((singles[r] == u).nonzero()[0])
            owner.append(e)
        for e in set(owner):
            out[r, e] = torch.logsumexp(logq[r, [u for u, o in enumerate(owner) if o == e]], 0)
    return out


def random_events(R, V, n_teacher, G, S, gen):
    first_piece = torch.randint(-1, n_teacher, (V,), generator=gen)
    groups = torch.stack([torch.randperm(n_teacher, generator=gen)[:G] for _ in range(R)])
    groups[torch.rand(R, G, generator=gen) < 0.3] = -1
    singles = torch.stack([torch.randperm(V, generator=gen)[:S] for _ in range(R)])
    singles[torch.rand(R, S, generator=gen) < 0.4] = -1
    singles[0] = -1  # a row without singles
    groups[1] = -1  # a row without groups
    return groups, singles, first_piece


def test_event_logprobs_values_and_gradients_match_float64():
    gen = torch.Generator().manual_seed(0)
    R, V, d, n_teacher = 41, 53, 7, 29
    groups, singles, first_piece = random_events(R, V, n_teacher, 5, 4, gen)
    h = torch.randn(R, d, generator=gen, requires_grad=True)
    W = torch.randn(V + 11, d, generator=gen, requires_grad=True)  # padded logits beyond the vocabulary
    s = event_logprobs(h, W, groups, singles, first_piece, n_teacher=n_teacher, vocab_size=V, chunk_rows=8)
    ref_h, ref_W = h.detach().double().requires_grad_(), W.detach().double().requires_grad_()
    ref = event_reference(ref_h, ref_W[:V], groups, singles, first_piece)
    assert torch.equal(s.isfinite(), ref.isfinite())  # the same events are empty
    fin = ref.isfinite()
    assert torch.allclose(s[fin].double(), ref[fin], atol=1e-5)
    g = torch.randn(R, s.shape[1], generator=gen)
    (torch.where(fin, s, 0.0) * g).sum().backward()
    (torch.where(fin, ref, 0.0) * g.double()).sum().backward()
    assert torch.allclose(h.grad.double(), ref_h.grad, atol=1e-5)
    assert torch.allclose(W.grad.double(), ref_W.grad, atol=1e-5)
    assert W.grad[V:].abs().max() == 0
    # the index itself, against the loop's owners
    ev = event_index(groups, singles, first_piece, n_teacher)
    for r in (0, 1, 7):
        for u in range(V):
            e = ev[r, u].item()
            if e < groups.shape[1]:
                assert groups[r, e] == first_piece[u] and not (singles[r] == u).any()
            elif e < groups.shape[1] + singles.shape[1]:
                assert singles[r, e - groups.shape[1]] == u


def test_event_of_tiny_mass_keeps_its_log_probability():
    h = torch.tensor([[0.0, -150.0, -160.0, 0.0]], dtype=torch.float32)  # two ids far below the others
    s = event_logprobs(
        h, torch.eye(4), torch.tensor([[1]]), torch.tensor([[0]]), torch.tensor([-1, 1, 1, -1]), n_teacher=2
    )
    want = torch.logsumexp(torch.tensor([-150.0, -160.0], dtype=torch.float64), 0) - np.log(2)
    assert s[0, 0].item() == pytest.approx(want.item(), rel=1e-6)  # not -inf: the event's own max shifts it


def test_chunk_kl_matches_float64_reference_and_masks():
    gen = torch.Generator().manual_seed(1)
    R, E = 23, 9
    s = torch.randn(R, E, generator=gen).log_softmax(-1).requires_grad_()
    t = torch.randn(R, E, generator=gen).log_softmax(-1)
    ok = torch.rand(R, E - 1, generator=gen) < 0.7
    mask = torch.rand(R, generator=gen) < 0.8
    loss = chunk_kl(s, t, ok, mask)
    loss.backward()
    sd = s.detach().double().requires_grad_()
    full = torch.cat([ok, torch.ones(R, 1, dtype=torch.bool)], -1)
    # the teacher's masses of non-events are not in the loss; its events renormalised
    tt = torch.where(full, t.double(), -torch.inf).log_softmax(-1)
    kl = torch.where(full, tt.exp() * (tt - sd), 0.0).sum(-1)
    ref = kl[mask].sum() / mask.sum()
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(s.grad.double(), sd.grad, atol=1e-6)
    none = s.detach().clone().requires_grad_()
    zero = chunk_kl(none, t, ok, torch.zeros(R, dtype=torch.bool))
    zero.backward()
    assert zero.item() == 0 and none.grad.abs().max() == 0


def test_chunk_kl_moves_mass_of_events_the_student_cannot_hold_to_the_rest():
    t = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    s = torch.tensor([[np.log(0.5), -np.inf, np.log(0.5)]])  # the middle event has no student id
    loss = chunk_kl(s, t, torch.ones(1, 2, dtype=torch.bool), torch.ones(1, dtype=torch.bool))
    assert loss.item() == pytest.approx(0.0, abs=1e-6)  # teacher 0.5 / 0.5 once 0.3 joins the rest


def test_rows_with_agreeing_boundaries_reduce_to_the_mapped_kl():
    """Same vocabulary on both sides: each group is one id, the chunk KL is the mapped top-k + tail KL."""
    gen = torch.Generator().manual_seed(2)
    R, V, k, d = 17, 31, 5, 6
    vocab = [bytes([65 + i]) for i in range(V)]
    events = ChunkEvents(vocab, vocab, torch.arange(V))
    logits = torch.randn(R, V, generator=gen) * 2
    lp, top = logits.log_softmax(-1).topk(k)  # (R, k)
    tail = torch.log1p(-lp.exp().sum(-1))
    ev = events.rows(top[:, 0].numpy(), np.arange(R), top[:, 0].numpy(), top.numpy(), np.ones(R, bool))
    assert (ev["chunk_last"] == ev["chunk_first"]).all() and (ev["ev_singles"] < 0).all()
    ok = torch.from_numpy(np.concatenate([ev["ev_groups"] >= 0, ev["ev_singles"] >= 0], 1))
    zeros = torch.zeros(R)
    t = chunk_teacher_events(lp, lp[:, 0], lp, zeros, lp[:, 0], torch.zeros(R, k, dtype=torch.bool), ok)
    h, W = torch.randn(R, d, generator=gen), torch.randn(V, d, generator=gen)
    s = event_logprobs(
        h, W, torch.from_numpy(ev["ev_groups"]), torch.from_numpy(ev["ev_singles"]), events.first_piece, n_teacher=V
    )
    mask = torch.ones(R, dtype=torch.bool)
    got = chunk_kl(s, t, ok, mask)
    mapped = torch.ones(R, k, dtype=torch.bool)
    want = bucket_kl(bucket_logprobs(h, W, top, mapped), mapped_teacher_buckets(lp, tail, mapped), mapped, mask)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_student_token_ending_inside_a_teacher_token_gets_no_events():
    """Teacher "ab" as one token, student "a" + "b": the student is finer there; only CE trains those rows."""
    events = ChunkEvents([b"ab", b"a", b"b", None], [b"a", b"b", None], torch.tensor([-1, 0, 1, 2]))
    ev = events.rows(
        np.array([0, 1, 2]), np.array([0, -1, 1]), np.array([0, 3]), np.array([[0, 1], [3, 0]]), np.ones(2, bool)
    )
    assert ev["chunk_first"].tolist() == [-1, -1, 1]  # "a" ends inside "ab"; "b" starts inside it; eos agrees


def test_alm_loss_is_zero_at_agreement_and_matches_float64():
    gen = torch.Generator().manual_seed(3)
    t = -torch.rand(13, generator=gen) * 5
    s = (-torch.rand(13, generator=gen) * 5).requires_grad_()
    mask = torch.rand(13, generator=gen) < 0.7
    assert alm_loss(t, t, mask).item() == pytest.approx(0.0, abs=1e-6)
    loss = alm_loss(s, t, mask)
    loss.backward()
    sd = s.detach().double().requires_grad_()
    p, q = t.double().exp(), sd.exp()
    ref = torch.where(mask, p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q)), 0.0).sum() / mask.sum()
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(s.grad.double(), sd.grad, atol=1e-5)


def test_alm_chunks_run_between_shared_starts():
    t_starts, s_starts = np.array([0, 1, 2, 3, 4]), np.array([0, 2, 4])  # teacher letters, student pairs + eos
    aligned = np.array([0, 2, 4])
    s, t = alm_chunks(t_starts, s_starts, aligned, complete=True)
    assert s.tolist() == [0, 1, 2] and t.tolist() == [0, 0, 1, 1, 2]
    s, t = alm_chunks(t_starts, s_starts, aligned, complete=False)  # a side truncated: no last chunk
    assert s.tolist() == [0, 1, -1] and t.tolist() == [0, 0, 1, 1, -1]


def test_chunk_losses_need_two_tokenizers_and_observed_logprobs():
    with pytest.raises(ConfigError, match="cross_tokenizer=true"):
        DistillConfig(w_chunk_kl=1.0)
    d = DistillConfig(cross_tokenizer=True, w_kl=0.0, w_ot=0.0, w_ot_logits=0.0, w_alm=1.0)
    assert "observed_logprob" in cache_fields(d) and "topk_ids" not in cache_fields(d)
    d = DistillConfig(cross_tokenizer=True, w_kl=0.0, w_ot=0.0, w_ot_logits=0.0, w_chunk_kl=1.0)
    assert {"observed_logprob", "topk_ids", "topk_logprobs"} <= set(cache_fields(d))
