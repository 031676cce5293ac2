"""The embedded default: write the synthetic task as JSONL, train a tokenizer on it, build tiny Qwen2 models.

Everything downstream reads these exactly as it would read a user's data and Qwen/Qwen2.5-* checkpoints:
a JSONL file and `from_pretrained(folder)`.
"""

import json
from dataclasses import asdict
from pathlib import Path

from pipeline.config.base import save_config
from pipeline.config.prepare import PrepareParams
from pipeline.data.records import ALPACA_TEMPLATE
from pipeline.data.task import HMM_WORDS, generate_examples, word_token_ids
from pipeline.data.tiny import build_model, build_tokenizer
from pipeline.models import ModelLoadError


def run(cfg: PrepareParams) -> None:
    p = cfg.prepare
    records = generate_examples(p.n_examples, cfg.seed, p.n_digits, p.task)
    data = Path(p.out_data)
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")

    models = Path(p.out_models)
    texts = [ALPACA_TEMPLATE.format(**r) + r["output"] for r in records]
    if p.task == "hmm":  # every word twice (BPE's min_frequency), so even a rarely emitted word is one token
        texts += [" " + " ".join(HMM_WORDS)] * 2
    tokenizer = build_tokenizer(texts, models / "tokenizer", p.tokenizer_vocab)
    if p.task == "hmm" and word_token_ids(tokenizer) is None:  # KL(true || model) reads one token per word
        raise ModelLoadError(
            f"prepare.tokenizer_vocab={p.tokenizer_vocab} leaves a word of the hmm task split in pieces"
        )
    for i, (name, shape) in enumerate([("teacher", p.teacher), ("student", p.student)]):
        build_model(tokenizer, models / name, **asdict(shape), vocab_multiple=p.vocab_multiple, seed=cfg.seed + i)
    # the cross-tokenizer student: the student's shape on a tokenizer of its own (other merges, digits in pairs)
    other = build_tokenizer(texts, models / "tokenizer_x", p.other_tokenizer_vocab, digits=2)
    build_model(other, models / "student_x", **asdict(p.student), vocab_multiple=p.vocab_multiple, seed=cfg.seed + 1)
    save_config(cfg, models / "config.yaml")
    print(
        f"prepare: {len(records)} examples -> {data}; tokenizers ({len(tokenizer)} and {len(other)} tokens), "
        f"teacher, student and student_x -> {models}"
    )
