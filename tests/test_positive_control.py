"""The positive control (prepare.task: hmm): its exact next-word distributions against brute-force enumeration in
float64, its records and checker, and KL(true || model) read at the right tokens."""

import itertools
import math

import numpy as np
import pytest
import torch

from pipeline.data.records import ALPACA_TEMPLATE, tokenize
from pipeline.data.task import (
    HMM_ANSWER,
    HMM_PROMPT,
    HMM_WORDS,
    MARKER,
    answer_distributions,
    generate_examples,
    hmm_source,
    hmm_words,
    is_correct,
    word_token_ids,
)
from pipeline.data.tiny import build_tokenizer
from pipeline.evaluation.truth import kl_true_terms, true_kl


def brute_force(prompt, answer, trans, emit):
    """p(answer word t | everything before) by summing the joint probability over every hidden path (uniform
    initial state), the definition itself: P(w_1..w_n) = sum over h_1..h_n of pi(h_1) prod emit(h_i, w_i)
    prod trans(h_i, h_i+1)."""
    H, W = emit.shape
    index = {w: i for i, w in enumerate(HMM_WORDS)}

    def joint(words):
        total = 0.0
        for path in itertools.product(range(H), repeat=len(words)):
            p = 1.0 / H
            for i, (h, w) in enumerate(zip(path, words)):
                p *= emit[h, index[w]] * (trans[path[i - 1], h] if i else 1.0)
            total += p
        return total

    out = np.zeros((len(answer), W))
    for t in range(len(answer)):
        before = [*prompt, *answer[:t]]
        out[t] = [joint([*before, HMM_WORDS[v]]) / joint(before) for v in range(W)]
    return out


@pytest.mark.parametrize("H, W, seed", [(2, 3, 0), (3, 4, 1), (3, 5, 2)])
def test_answer_distributions_equal_brute_force_enumeration(H, W, seed):
    rng = np.random.default_rng(seed)
    trans, emit = rng.dirichlet(np.ones(H), size=H), rng.dirichlet(np.ones(W), size=H)  # dense: every word possible
    words = [HMM_WORDS[i] for i in rng.integers(0, W, size=5)]
    prompt, answer = words[:2], words[2:]
    got = answer_distributions(prompt, answer, (trans, emit))
    np.testing.assert_allclose(got, brute_force(prompt, answer, trans, emit), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(got.sum(1), 1.0, rtol=1e-12)


def test_the_source_and_its_records():
    trans, emit = hmm_source()
    np.testing.assert_allclose(trans.sum(1), 1.0)
    np.testing.assert_allclose(emit.sum(1), 1.0)
    assert ((emit > 0).sum(0) == 1).all()  # each word has one owner: some continuations are impossible
    records = generate_examples(300, seed=3, task="hmm")
    assert records == generate_examples(300, seed=3, task="hmm") != generate_examples(300, seed=4, task="hmm")
    assert len({r["instruction"] + r["output"] for r in records}) == 300
    for r in records[:50]:
        prompt, answer = hmm_words(r)
        assert len(prompt) == HMM_PROMPT and len(answer) == HMM_ANSWER
        p = answer_distributions(prompt, answer)
        assert all(p[t, HMM_WORDS.index(w)] > 0 for t, w in enumerate(answer))  # sampled from the source
        assert is_correct(r, r["output"])
    # an impossible first word makes the continuation wrong; the reference's own answer is right
    prompt, answer = hmm_words(records[0])
    p = answer_distributions(prompt, answer)
    bad = HMM_WORDS[int(np.flatnonzero(p[0] == 0)[0])]
    assert not is_correct(records[0], f"{MARKER} {bad} {' '.join(answer[1:])}")
    assert not is_correct(records[0], f"{MARKER} {' '.join(answer[:-1])}")  # one word short
    assert hmm_words({"instruction": "2631", "input": "", "output": MARKER + "2164 + 467"}) is None


def test_kl_true_terms_against_float64():
    torch.manual_seed(0)
    L, V_logits, vocab = 7, 41, 37  # padded logit columns beyond the vocabulary must be ignored
    logits = torch.randn(L, V_logits) * 3
    logits[:, vocab:] = 50.0  # would dominate the softmax if they were counted
    word_ids = torch.randperm(vocab)[: len(HMM_WORDS) // 2].tolist()
    W = len(word_ids)
    p = torch.distributions.Dirichlet(torch.full((W,), 0.5)).sample((L,)).double()
    p[0, :3] = 0
    p[0] /= p[0].sum()
    got = kl_true_terms(logits, p, word_ids, vocab)
    logq = logits[:, :vocab].double().log_softmax(-1)[:, word_ids]
    want = [
        sum(float(p[i, j]) * (math.log(float(p[i, j])) - float(logq[i, j])) for j in range(W) if p[i, j] > 0)
        for i in range(L)
    ]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    # q = p exactly (logits = log p at the word ids, -inf elsewhere): KL 0
    exact = torch.full((L, V_logits), -float("inf"), dtype=torch.float64)
    exact[:, word_ids] = p.log()
    torch.testing.assert_close(kl_true_terms(exact, p, word_ids, vocab), torch.zeros(L, dtype=torch.float64))


class TruthModel(torch.nn.Module):
    """Logits = log p_true at each answer word's predicting position (found from the input itself), uniform
    elsewhere: KL(true || model) is 0 if and only if true_kl reads the positions and tokens it should."""

    def __init__(self, tokenizer, records, word_ids):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.V, self.word_ids = len(tokenizer), word_ids
        self.by_ids = {tuple(r["input_ids"]): r for r in records}

    def forward(self, input_ids, attention_mask, use_cache=False):
        out = torch.zeros(*input_ids.shape, self.V)
        for b, row in enumerate(input_ids):
            ids = row[attention_mask[b].bool()].tolist()
            rec = self.by_ids[tuple(ids)]
            prompt, answer = hmm_words(rec)
            p = torch.from_numpy(answer_distributions(prompt, answer)).float()
            start = len(ids) - 1 - len(answer)  # the answer words, then the end-of-sequence token
            for t in range(len(answer)):
                out[b, start + t - 1] = -1e4
                out[b, start + t - 1, self.word_ids] = p[t].clamp_min(1e-30).log()
        return type("Out", (), {"logits": out})()


def test_true_kl_reads_the_answer_words(tmp_path):
    records = generate_examples(400, seed=0, task="hmm")
    texts = [ALPACA_TEMPLATE.format(**r) + r["output"] for r in records] + [" " + " ".join(HMM_WORDS)] * 2
    tokenizer = build_tokenizer(texts, tmp_path / "tok", 512)
    word_ids = word_token_ids(tokenizer)
    assert word_ids is not None and len(set(word_ids)) == len(HMM_WORDS)
    test = [{**r, **tokenize(r, tokenizer, "alpaca", 128)[0]} for r in records[:20]]
    model = TruthModel(tokenizer, test, word_ids)
    assert true_kl(model, test, tokenizer, batch_size=7) == pytest.approx(0.0, abs=1e-5)
    uniform = TruthModel(tokenizer, test, word_ids)
    uniform.forward = lambda input_ids, attention_mask, use_cache=False: type(
        "Out", (), {"logits": torch.zeros(*input_ids.shape, len(tokenizer))}
    )()
    want = np.mean(
        [
            sum(pv * (math.log(pv) + math.log(len(tokenizer))) for pv in row if pv > 0)
            for r in test
            for row in answer_distributions(*hmm_words(r))
        ]
    )
    assert true_kl(uniform, test, tokenizer, batch_size=8) == pytest.approx(want, rel=1e-9)
    assert math.isnan(true_kl(model, [{**test[0], "instruction": "2631"}], tokenizer, 4))  # another task's record
