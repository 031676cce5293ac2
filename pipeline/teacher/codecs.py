"""Fitting the low-rank hidden-state codes of Stage 1 (cache/codecs.py stores them and decodes every read).

A code of rank r keeps h' = mean + ((h - mean) E^T) F: an r-dimensional subspace of the D-dimensional hidden
states. Which subspace decides what the cache loses. Three choices, all the best rank-r linear code for some
quadratic error E[(h - h')^T G (h - h')]:
  pca     G = I: the principal directions of h (a calibration sample of the teacher's own hidden states).
  svd     the top right singular vectors of lm_head W, no data (h' = its projection on them): keeps what W
          amplifies most, blind to where h actually lies.
  fisher  G = the mean Fisher information of the teacher's distribution, W^T (diag p - p p^T) W averaged over the
          calibration rows: KL(p || p') = 1/2 dh^T F dh + O(dh^3), so this is the code that loses the least KL to
          second order - it weighs a direction by how much moving h along it changes softmax(W h).
For a metric G = L^2 (L symmetric), the best code whitens, takes principal directions E_w there and maps back:
E = E_w^T L, F = E_w^T L^-1 (pca: L = I). bench/hidden_bench.py measures what each keeps of the teacher's
distribution and of the OT-hidden loss.

All sums in float64; W is read in row chunks, so no float64 copy of a (V, D) matrix exists.
"""

import numpy as np
import torch

from cache.codecs import Basis, parse

V_CHUNK = 4096  # vocabulary rows per float64 block of W (117 MB at D = 3584)
# Fisher eigenvalues below this share of the mean are raised to it: such directions barely change the teacher's
# distribution, and an exact 0 would make L singular (F = E_w^T L^-1 needs its inverse).
FISHER_FLOOR = 1e-4


def top_eigh(m: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The r largest eigenvalues (r,) and eigenvectors (D, r) of a symmetric matrix, in descending order."""
    vals, vecs = torch.linalg.eigh(m)  # ascending
    return vals.flip(0)[:r], vecs.flip(1)[:, :r]


def pca_basis(h: torch.Tensor, r: int) -> Basis:
    """h: (n, D) calibration hidden states."""
    x = h.double()
    mean = x.mean(0)  # (D,)
    xc = x - mean
    _, e = top_eigh(xc.T @ xc / len(x), r)  # (D, r)
    return _basis(mean, e.T, e.T)


def svd_basis(weight: torch.Tensor, r: int) -> Basis:
    """weight: (V, D) lm_head rows of real tokens; the right singular vectors are the eigenvectors of W^T W."""
    _, e = top_eigh(gram(weight), r)
    return _basis(torch.zeros(weight.shape[1], dtype=torch.float64), e.T, e.T)


def fisher_basis(
    h: torch.Tensor, weight: torch.Tensor, r: int, bias: torch.Tensor | None = None, chunk_rows: int = 1024
) -> Basis:
    """h: (n, D) calibration hidden states (any device: the whitening runs there); weight (V, D) and bias (V,) of
    the lm_head, real tokens only (their device runs the softmax passes)."""
    n, D = h.shape
    dev = weight.device
    p_sum = torch.zeros(weight.shape[0], dtype=torch.float64, device=dev)  # (V,)
    outer = torch.zeros(D, D, dtype=torch.float64, device=dev)  # sum over rows of E_p[w] E_p[w]^T
    for r0 in range(0, n, chunk_rows):
        hc = h[r0 : r0 + chunk_rows].to(dev, weight.dtype)
        logits = (hc @ weight.T).float()  # (C, V)
        if bias is not None:
            logits += bias.float()
        p = logits.softmax(-1)  # (C, V)
        p_sum += p.sum(0, dtype=torch.float64)
        ew = (p @ weight.float()).double()  # (C, D) E_p[w] per row
        outer += ew.T @ ew
    fisher = (gram(weight, p_sum) - outer) / n  # (D, D) = mean of W^T (diag p - p p^T) W
    vals, q = torch.linalg.eigh(fisher)
    vals = vals.clamp_min(FISHER_FLOOR * vals.clamp_min(0).mean())
    q, vals = q.to(h.device), vals.to(h.device)
    L, L_inv = (q * vals.sqrt()) @ q.T, (q / vals.sqrt()) @ q.T  # (D, D) symmetric
    x = h.double()
    mean = x.mean(0)
    xw = (x - mean) @ L  # (n, D) whitened
    _, e = top_eigh(xw.T @ xw / n, r)  # (D, r)
    return _basis(mean, e.T @ L, e.T @ L_inv)


def gram(weight: torch.Tensor, row_weights: torch.Tensor | None = None) -> torch.Tensor:
    """W^T diag(row_weights) W in float64, V_CHUNK rows of W at a time. (D, D)"""
    D = weight.shape[1]
    out = torch.zeros(D, D, dtype=torch.float64, device=weight.device)
    for v0 in range(0, weight.shape[0], V_CHUNK):
        w = weight[v0 : v0 + V_CHUNK].double()  # (Vc, D)
        out += (w if row_weights is None else w * row_weights[v0 : v0 + V_CHUNK, None]).T @ w
    return out


def fit_basis(
    codec: str, hidden: torch.Tensor | None, weight: torch.Tensor | None, bias: torch.Tensor | None = None
) -> Basis:
    """The basis of a low-rank `codec` ("pca:64", "svd:64", "fisher:64"); hidden (n, D) for pca/fisher, weight
    (V, D) (+ bias) of the lm_head's real-token rows for svd/fisher."""
    kind, r = parse(codec)
    if kind == "pca":
        return pca_basis(hidden, r)
    if kind == "svd":
        return svd_basis(weight, r)
    if kind == "fisher":
        return fisher_basis(hidden, weight, r, bias)
    raise ValueError(f"hidden codec {codec!r} has no basis")


def needs_calibration(codec: str) -> bool:
    """pca and fisher are fitted on hidden states of the teacher; svd needs lm_head only."""
    return parse(codec)[0] in ("pca", "fisher")


def _basis(mean: torch.Tensor, enc: torch.Tensor, dec: torch.Tensor) -> Basis:
    return Basis(*(np.asarray(t.detach().cpu().double().numpy(), dtype=np.float32) for t in (mean, enc, dec)))
