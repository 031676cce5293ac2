"""Hidden-state codecs of the teacher cache: how the final hidden state h (D floats per row) is stored, and read back.

Hidden states are ~98% of a cache's bytes (7,168 B per token in bf16 for a 7B teacher, ~109 B for top-64
log-probs), so `cache.hidden_codec` chooses how much of h to keep:

  bf16, fp16   D values per row (bf16 bit patterns as uint16); |h' - h| <= 2^-8 |h| (bf16), 2^-11 |h| (fp16, normal
               range) per element.
  int8         D int8 values + one float32 scale per row (absmax / 127): |h' - h| <= absmax / 254 per element
               (~half the bytes of bf16).
  pca:r, svd:r, fisher:r
               a linear code of r coefficients per row, stored as bf16: c = (h - mean) E^T, h' = mean + c F, with
               E (encoder) and F (decoder) (r, D) and mean (D,) fitted once by Stage 1 (pipeline/teacher/codecs.py)
               and stored in the cache. h' is h projected on an r-dimensional subspace (+ bf16 rounding of c:
               |c' - c| <= 2^-8 |c|); what that loses depends on the subspace, measured in bench/hidden_bench.py.

Decoding is transparent: `decode` returns (n, D) float32 for every codec, so the hidden-state OT and the exact
teacher of Stage 2 read the same h' whatever the codec. Imports numpy and torch only (no pipeline code: the cache
package is below it).
"""

import re
from dataclasses import dataclass

import numpy as np
import torch

CODEC = re.compile(r"(bf16|fp16|int8|none|(pca|svd|fisher):([1-9][0-9]*))")
LOW_RANK = ("pca", "svd", "fisher")
INT8_MAX = 127


def parse(codec: str) -> tuple[str, int | None]:
    """ "pca:64" -> ("pca", 64); "bf16" -> ("bf16", None). ValueError for anything else."""
    m = CODEC.fullmatch(str(codec))
    if m is None:
        raise ValueError(f"hidden codec {codec!r}: use bf16, fp16, int8, pca:<r>, svd:<r>, fisher:<r> or none")
    return (m.group(2), int(m.group(3))) if m.group(2) else (m.group(1), None)


def stored_width(codec: str, hidden_size: int) -> int:
    """Values per row in the `hidden` array: D, or r for a low-rank code."""
    kind, r = parse(codec)
    if kind in LOW_RANK and r > hidden_size:
        raise ValueError(f"hidden codec {codec}: rank {r} is larger than the hidden size {hidden_size}")
    return r if kind in LOW_RANK else hidden_size


@dataclass
class Basis:
    """A low-rank code: h' = mean + ((h - mean) @ encoder.T) @ decoder. float32 numpy arrays."""

    mean: np.ndarray  # (D,)
    encoder: np.ndarray  # (r, D)
    decoder: np.ndarray  # (r, D)

    def __post_init__(self):
        self.mean, self.encoder, self.decoder = (
            np.ascontiguousarray(a, dtype=np.float32) for a in (self.mean, self.encoder, self.decoder)
        )
        D = self.mean.shape[0]
        if self.mean.ndim != 1 or self.encoder.shape != self.decoder.shape or self.encoder.shape[1:] != (D,):
            raise ValueError(
                f"basis shapes mean {self.mean.shape}, encoder {self.encoder.shape}, decoder "
                f"{self.decoder.shape}: expected (D,), (r, D), (r, D)"
            )
        if not all(np.isfinite(a).all() for a in (self.mean, self.encoder, self.decoder)):
            raise ValueError("basis holds non-finite values")

    @property
    def rank(self) -> int:
        return self.encoder.shape[0]

    def arrays(self) -> dict[str, np.ndarray]:
        return {"hidden_mean": self.mean, "hidden_encoder": self.encoder, "hidden_decoder": self.decoder}


def _bf16_bits(x: torch.Tensor) -> np.ndarray:
    """float tensor (any device) -> bf16 bit patterns (uint16), rounded to nearest even as torch does."""
    return x.detach().to(torch.bfloat16).cpu().contiguous().view(torch.int16).numpy().view(np.uint16)


def _from_bf16_bits(a: np.ndarray) -> np.ndarray:
    return (a.astype(np.uint32) << 16).view(np.float32)


def encode(h, codec: str, basis: Basis | None = None) -> dict[str, np.ndarray]:
    """(n, D) hidden states (torch tensor on any device, or array) -> the stored arrays of this codec.

    bf16/fp16: {"hidden": (n, D)}; int8: {"hidden": (n, D) int8, "hidden_scale": (n,) float32};
    low rank: {"hidden": (n, r) bf16 bits}. A bf16 tensor stored as bf16 is taken bit for bit.
    """
    kind, _ = parse(codec)
    if not isinstance(h, torch.Tensor):
        h = torch.from_numpy(np.asarray(h))
    if kind == "bf16":
        return {"hidden": _bf16_bits(h)}
    if kind == "fp16":
        return {"hidden": h.detach().to(torch.float16).cpu().numpy()}
    x = h.detach().float()  # (n, D) on h's device: the encoding matmul runs where the teacher ran
    if kind == "int8":
        absmax = x.abs().amax(-1, keepdim=True)  # (n, 1)
        scale = absmax / INT8_MAX
        q = torch.round(x / scale.clamp_min(torch.finfo(torch.float32).tiny)).clamp_(-INT8_MAX, INT8_MAX)  # (n, D)
        return {"hidden": q.to(torch.int8).cpu().numpy(), "hidden_scale": scale[:, 0].cpu().numpy()}
    if kind in LOW_RANK:
        if basis is None:
            raise ValueError(f"hidden codec {codec} needs its basis")
        mean = torch.as_tensor(basis.mean, device=x.device)
        enc = torch.as_tensor(basis.encoder, device=x.device)
        return {"hidden": _bf16_bits((x - mean) @ enc.T)}  # (n, r)
    raise ValueError(f"hidden codec {codec!r} stores no hidden states")


def decode(stored: dict[str, np.ndarray], codec: str, basis: Basis | None = None) -> np.ndarray:
    """The arrays `encode` returned (or read back) -> (n, D) float32 hidden states."""
    kind, _ = parse(codec)
    a = stored["hidden"]
    if kind == "bf16":
        return _from_bf16_bits(a)
    if kind == "fp16":
        return a.astype(np.float32)
    if kind == "int8":
        return a.astype(np.float32) * stored["hidden_scale"][:, None].astype(np.float32)
    if kind in LOW_RANK:
        if basis is None:
            raise ValueError(f"hidden codec {codec} needs its basis")
        return basis.mean + _from_bf16_bits(a) @ basis.decoder  # (n, r) @ (r, D)
    raise ValueError(f"hidden codec {codec!r} stores no hidden states")


def coefficients(stored: np.ndarray) -> np.ndarray:
    """The stored coefficients of a low-rank code (bf16 bits) -> (n, r) float32, without decoding to D."""
    return _from_bf16_bits(stored)


def fold(weight: torch.Tensor, bias: torch.Tensor | None, basis: Basis) -> tuple[torch.Tensor, torch.Tensor]:
    """lm_head (V, D) (+ bias) folded into a low-rank code: W h' + b = (W F^T) c + (b + W mean) for h' = mean + c F,
    so the teacher's logits come from the r stored coefficients: a (V, r) weight in W's dtype (the product taken in
    float32 and rounded once, like W itself) and a (V,) float32 bias. r/D of the memory and of the FLOPs of W."""
    w = weight.float()
    folded = (w @ torch.as_tensor(basis.decoder, device=w.device).T).to(weight.dtype)  # (V, r)
    b = w @ torch.as_tensor(basis.mean, device=w.device)  # (V,)
    return folded.contiguous(), b if bias is None else b + bias.float()


def bound(h: np.ndarray, codec: str, basis: Basis | None = None) -> np.ndarray:
    """(n, D) elementwise bound on |decode(encode(h)) - target|, where the target is h itself (bf16, fp16, int8)
    or its exact projection mean + ((h - mean) E^T) F (low rank: the rounding of the stored coefficients only)."""
    kind, _ = parse(codec)
    h = np.asarray(h, dtype=np.float64)
    ulp = {"bf16": 2.0**-8, "fp16": 2.0**-11}
    if kind in ulp:
        return ulp[kind] * np.abs(h) + (6e-8 if kind == "fp16" else 0.0)  # fp16 subnormals: absolute 2^-24
    if kind == "int8":
        return np.abs(h).max(-1, keepdims=True) / (2 * INT8_MAX) * (1 + 1e-6) + 1e-7 * np.abs(h)
    c = (h - basis.mean) @ basis.encoder.T.astype(np.float64)  # (n, r)
    F = np.abs(basis.decoder.astype(np.float64))
    c_abs = np.abs(h - basis.mean) @ np.abs(basis.encoder.T.astype(np.float64))  # (n, r) float32 rounding scale
    # bf16 rounding of the coefficients, plus float32 rounding in the encoding and decoding matmuls
    return 2.0**-8 * np.abs(c) @ F + 1e-5 * (c_abs @ F + np.abs(basis.mean)) + 1e-30


def project(h: np.ndarray, basis: Basis) -> np.ndarray:
    """The exact (float64) low-rank reconstruction mean + ((h - mean) E^T) F, without coefficient rounding."""
    h = np.asarray(h, dtype=np.float64)
    return basis.mean + ((h - basis.mean) @ basis.encoder.T.astype(np.float64)) @ basis.decoder.astype(np.float64)
