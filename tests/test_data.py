"""Data reading, label masking, sample ids, splits and config loading."""

import json

import pytest
from transformers import AutoTokenizer

from pipeline.config.base import apply_overrides, save_config
from pipeline.config.data import DataConfig
from pipeline.config.params import Config, load_config
from pipeline.data.records import (
    IGNORE,
    DataError,
    load_splits,
    read_records,
    render,
    sample_id,
    split_of,
    tokenize,
    tokenizer_hash,
)

REC = {"instruction": "2631", "input": "", "output": "2164 + 467"}


@pytest.fixture(scope="module")
def tok(tiny):
    return AutoTokenizer.from_pretrained(f"{tiny.prepare.out_models}/tokenizer")


def write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_malformed_line_names_file_and_line(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [json.dumps(REC), "{not json", json.dumps(REC)])
    with pytest.raises(DataError, match=r"d\.jsonl:2: not valid JSON"):
        read_records(p)


def test_missing_field_and_wrong_type(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [json.dumps(REC), json.dumps({"instruction": "x"})])
    with pytest.raises(DataError, match=r"d\.jsonl:2: missing field 'output'"):
        read_records(p)
    p = write_jsonl(tmp_path / "e.jsonl", [json.dumps({**REC, "output": 3})])
    with pytest.raises(DataError, match=r"e\.jsonl:1: field 'output' must be a string"):
        read_records(p)


def test_empty_and_missing_file(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", ["", "  "])
    with pytest.raises(DataError, match="empty"):
        read_records(p)
    with pytest.raises(DataError, match="does not exist"):
        read_records(tmp_path / "nope.jsonl")


def test_parquet_and_json_through_datasets(tmp_path):
    import datasets

    recs = [REC, {"instruction": "a", "input": "b", "output": "c"}]
    datasets.Dataset.from_list(recs).to_parquet(str(tmp_path / "d.parquet"))
    (tmp_path / "d.json").write_text(json.dumps(recs))
    assert read_records(tmp_path / "d.parquet") == recs
    assert read_records(tmp_path / "d.json") == recs


def test_sample_id_is_content_hash_and_split_is_order_free():
    other = {**REC, "output": "2163 + 468"}
    assert sample_id(REC) == sample_id(dict(reversed(list(REC.items()))))
    assert sample_id(REC) != sample_id(other) and len(sample_id(REC)) == 16
    ids = [sample_id({**REC, "instruction": str(i)}) for i in range(2000)]
    splits = [split_of(s, 0.1, 0.2) for s in ids]
    assert abs(splits.count("test") / 2000 - 0.2) < 0.04 and abs(splits.count("validation") / 2000 - 0.1) < 0.03
    assert [split_of(s, 0.1, 0.2) for s in reversed(ids)] == splits[::-1]


def test_records_sharing_a_prompt_share_a_split(tmp_path, tok):
    """Several answers to one prompt (the split task's random splits) never straddle train and test."""
    recs = [
        {"instruction": str(n), "input": "", "output": f"{a} + {n - a}"} for n in range(100, 160) for a in (1, 2, 3, 4)
    ]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    splits = load_splits(
        DataConfig(path=str(tmp_path / "d.jsonl"), val_fraction=0.2, test_fraction=0.3), tok, log=lambda _: None
    )
    where = {name: {r["instruction"] for r in splits[name]} for name in ("train", "validation", "test")}
    assert all(where[name] for name in where)  # every split got prompts...
    assert not (
        where["train"] & where["test"]
        or where["train"] & where["validation"]  # ...and none is shared
        or where["validation"] & where["test"]
    )
    assert sum(len(splits[name]) for name in where) == len(recs)


def test_labels_mask_the_prompt(tok):
    ex, truncated = tokenize(REC, tok, "alpaca", 512)
    prompt, response = render(REC, tok, "alpaca")
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert not truncated and response.endswith(tok.eos_token)
    assert ex["labels"][:n_prompt] == [IGNORE] * n_prompt
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]
    assert tok.decode(ex["input_ids"][n_prompt:]) == response


def test_chat_template_supervises_only_the_answer(tok):
    ex, _ = tokenize(REC, tok, "chat", 512)
    supervised = tok.decode([i for i, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE])
    assert supervised.startswith(REC["output"]) and "<|im_end|>" in supervised
    assert "user" not in supervised


def test_truncation_counted_and_empty_responses_dropped(tiny, tok, tmp_path):
    cfg = Config().data
    cfg.path = tiny.data.path
    full = load_splits(cfg, tok, log=lambda *_: None)
    names = ("train", "validation", "test")
    n = sum(len(full[s]) for s in names)
    cfg.max_length = min(len(x) for s in names for x in full[s]["input_ids"]) - 1  # every example too long
    cut = load_splits(cfg, tok, log=lambda *_: None)
    assert cut.n_truncated == n
    assert all(len(x) <= cfg.max_length for x in cut["train"]["input_ids"])
    cfg.max_length = 4  # shorter than any prompt: nothing to supervise anywhere
    with pytest.raises(DataError, match="no example keeps a response token"):
        load_splits(cfg, tok, log=lambda *_: None)


def test_duplicates_removed(tok, tmp_path):
    recs = [REC, REC, {**REC, "instruction": "7"}]
    cfg = Config().data
    cfg.path = str(write_jsonl(tmp_path / "d.jsonl", [json.dumps(r) for r in recs]))
    s = load_splits(cfg, tok, log=lambda *_: None)
    assert s.n_duplicates == 1 and sum(len(s[k]) for k in ("train", "validation", "test")) == 2


def test_tokenizer_hash_tracks_vocab_not_size(tok):
    h = tokenizer_hash(tok)
    assert h == tokenizer_hash(AutoTokenizer.from_pretrained(tok.name_or_path))
    tok2 = AutoTokenizer.from_pretrained(tok.name_or_path)
    tok2.add_tokens(["<extra>"])
    assert tokenizer_hash(tok2) != h


def test_config_overrides_and_round_trip(tmp_path):
    cfg = apply_overrides(
        Config(), ["cache.k=32", "finetune.lr=1e-4", "cache.teacher=Qwen/Qwen2.5-7B", "data.max_length=64"]
    )
    assert (cfg.cache.k, cfg.finetune.lr, cfg.cache.teacher, cfg.data.max_length) == (32, 1e-4, "Qwen/Qwen2.5-7B", 64)
    save_config(cfg, tmp_path / "p.yaml")
    assert load_config(tmp_path / "p.yaml") == cfg
    with pytest.raises(ValueError, match="unknown parameter cache.kk"):
        apply_overrides(Config(), ["cache.kk=3"])
    with pytest.raises(ValueError, match="cache.k"):
        apply_overrides(Config(), ["cache.k=many"])
    (tmp_path / "bad.yaml").write_text("cache:\n  topk: 3\n")
    with pytest.raises(ValueError, match="unknown parameter cache.topk"):
        load_config(tmp_path / "bad.yaml")
