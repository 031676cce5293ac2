"""Teacher-forced exact match (pipeline/distill/model.py `answer_match`) against argmax over full float64 logits,
on awkward shapes (B=5, M=13, d=7, 41 logit columns of which 37 are tokens), with padded rows and empty sequences."""

import torch

from pipeline.distill.model import answer_match

B, M, d, VL, V = 5, 13, 7, 41, 37


def reference(rows, W, targets, row_mask, bias):
    z = rows.double() @ W[:V].double().T + bias[:V].double()  # (B, M, V)
    ok = (z.argmax(-1) == targets) | ~row_mask  # (B, M)
    live = row_mask.any(-1)
    return (ok.all(-1) & live).sum().item() / max(live.sum().item(), 1)


def test_matches_full_logits_argmax():
    g = torch.Generator().manual_seed(0)
    rows, W, bias = torch.randn(B, M, d, generator=g), torch.randn(VL, d, generator=g), torch.randn(VL, generator=g)
    W[V:] += 100  # padded logit columns would win every argmax if they were not dropped
    targets = (rows @ W[:V].T + bias[:V]).argmax(-1)  # (B, M): every row right ...
    targets[1, 3] = (targets[1, 3] + 1) % V  # ... but one row of sequence 1
    targets[2, 12] = (targets[2, 12] + 1) % V  # and a padding row of sequence 2 (ignored)
    row_mask = torch.ones(B, M, dtype=torch.bool)
    row_mask[2, 10:] = False
    row_mask[4] = False  # a sequence without supervised rows counts for neither side
    got = answer_match(rows, W, targets, row_mask, V, bias, chunk_rows=3).item()
    assert got == reference(rows, W, targets, row_mask, bias) == 3 / 4


def test_all_masked_is_zero():
    rows, W = torch.randn(B, M, d), torch.randn(VL, d)
    got = answer_match(rows, W, torch.zeros(B, M, dtype=torch.long), torch.zeros(B, M, dtype=torch.bool), V)
    assert got.item() == 0
