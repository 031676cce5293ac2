"""KL(true || model) on the positive control (prepare.task: hmm), where the true next-word distribution is known.

The source's exact p(word | prompt, earlier answer words) comes from pipeline/data/task.py; the model's is read at the
one token each word " w" is in the model's tokenizer, teacher-forced on the record's own answer. The same number for
the teacher is the floor a student can reach through it.
"""

import math

import torch

from pipeline.data.records import IGNORE, pad_collate
from pipeline.data.task import HMM_WORDS, answer_distributions, hmm_words, word_token_ids


def kl_true_terms(logits: torch.Tensor, p: torch.Tensor, word_ids: list[int], vocab_size: int) -> torch.Tensor:
    """KL(p || q) per row: logits (L, V_logits) at the positions that predict the answer words, p (L, W) the true
    distributions over HMM_WORDS; q = softmax over the first vocab_size columns, read at word_ids. Words with p = 0
    contribute 0 (p log p -> 0), whatever q gives them."""
    logq = logits[:, :vocab_size].double().log_softmax(-1)[:, word_ids]  # (L, W)
    p = p.double()
    terms = torch.where(p > 0, p * (p.clamp_min(1e-300).log() - logq), torch.zeros_like(p))
    return terms.sum(-1)  # (L,)


@torch.inference_mode()
def true_kl(model, records: list[dict], tokenizer, batch_size: int) -> float:
    """Mean KL(true || model) in nats per answer word over positive-control `records` (tokenised with `tokenizer`:
    input_ids, labels); NaN when the records are of another task or a word is not one token of the tokenizer."""
    word_ids = word_token_ids(tokenizer)
    if word_ids is None or not records or any(hmm_words(r) is None for r in records):
        return math.nan
    device = next(model.parameters()).device
    total, n = 0.0, 0
    for i in range(0, len(records), batch_size):
        chunk = records[i : i + batch_size]
        batch = pad_collate(chunk, tokenizer.pad_token_id)
        logits = model(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device), use_cache=False
        ).logits  # (B, T, V_logits)
        for b, rec in enumerate(chunk):
            prompt, answer = hmm_words(rec)
            supervised = (batch["labels"][b] != IGNORE).nonzero()[:, 0]  # token positions of the answer (+ EOS)
            pos = supervised[-len(answer) - 1 : -1]  # the answer words, one token each, before the end-of-sequence
            index = [HMM_WORDS.index(w) for w in answer]
            if len(pos) < len(answer) or batch["input_ids"][b, pos].tolist() != [word_ids[j] for j in index]:
                raise ValueError(f"record {rec.get('sample_id')}: its answer words are not one token each here")
            p = torch.from_numpy(answer_distributions(prompt, answer))  # (L, W) float64
            total += float(kl_true_terms(logits[b, pos - 1], p, word_ids, len(tokenizer)).sum())
            n += len(answer)
    return total / n
