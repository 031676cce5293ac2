"""Greedy generation on held-out prompts and the task accuracy it gives: whether a model, decoding on its own,
answers right, which teacher-forced perplexity and KL do not measure."""

from collections.abc import Callable

import torch
from tqdm import tqdm

from pipeline.data.records import DataError, render


def exact_match(rec: dict, generated: str) -> bool:
    """The default rule for user data: the answer equals the reference output (surrounding spaces ignored)."""
    return generated.strip() == rec["output"].strip()


def checker(metric: str) -> Callable[[dict, str], bool]:
    """The answer rule named by `data.metric`."""
    if metric == "exact":
        return exact_match
    from pipeline.data.task import is_correct, is_valid_split

    if metric == "split":
        return lambda rec, generated: is_valid_split(rec["instruction"], generated)
    if metric == "embedded_task":
        return is_correct
    raise DataError(f"data.metric must be 'exact', 'split' or 'embedded_task', got {metric!r}")


@torch.inference_mode()
def generate(
    model,
    tokenizer,
    records: list[dict],
    template: str,
    max_new_tokens: int = 32,
    batch_size: int = 64,
    desc: str = "generate",
) -> list[str]:
    """Greedy continuations of each record's prompt, special tokens stripped."""
    dev = next(model.parameters()).device
    prompts = [render(r, tokenizer, template)[0] for r in records]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # generation appends on the right
    outs = []
    try:
        for i in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False):
            enc = tokenizer(
                prompts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
            ).to(dev)
            gen = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            outs += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return outs


def task_accuracy(
    model, tokenizer, records: list[dict], template: str, check: Callable[[dict, str], bool] = exact_match, **kwargs
) -> float:
    """Fraction of records whose greedy answer passes `check` (0.0 for no records)."""
    if not records:
        return 0.0
    answers = generate(model, tokenizer, records, template, **kwargs)
    return sum(check(r, a) for r, a in zip(records, answers)) / len(records)
