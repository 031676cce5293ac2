"""Argument checks shared by the loss functions: what they cannot survive is refused with a clear error
instead of turning into a wrong value or a NaN. Imports only torch."""

import torch


def check_mask(mask: torch.Tensor, name: str) -> torch.Tensor:
    """`mask` itself if it is a bool tensor, else TypeError.

    Masks are refused rather than converted: `x[mask]` with a 0/1 integer mask is an *index* (rows 0 and 1,
    over and over), a silent wrong value, and a float mask might be meant as weights, which no loss here
    supports. One rule for every loss, so a caller learns it once.
    """
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(
            f"{name} must be a bool tensor (True = counts), got {got}; use {name}.bool() or {name} != 0 if it holds 0/1"
        )
    return mask


def check_positive(value: float, name: str) -> float:
    """`value` if it is > 0 (NaN is not), else ValueError: temperature and eps divide logits and costs, and
    0 or a negative value gives inf / NaN losses or a maximised instead of minimised objective."""
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return value
