"""Instruction data: read the user's records, render the prompt, tokenise with label masking, split.

Every example gets a `sample_id` derived from its content (not its row number): cached teacher targets are
keyed by it, so shuffling, filtering or resuming can never pair a student row with another example's targets.
"""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import datasets

from cache.errors import OtkdError
from pipeline.config.data import DataConfig

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
REQUIRED = ("instruction", "output")
IGNORE = -100  # label of positions that are not supervised (prompt, padding)


class DataError(OtkdError, ValueError):
    """Bad user data: the message names the file (and line) and what is wrong."""


def read_records(path: str | Path) -> list[dict]:
    """Read {"instruction", "input", "output"} records from JSONL, or a .json/.parquet file via `datasets`.

    "input" may be missing (it is then empty); "instruction" and "output" are required strings.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    if path.suffix == ".jsonl":
        records = []
        with path.open("rb") as f:  # bytes, so that a bad byte is reported with its line
            for lineno, raw in enumerate(f, 1):
                line = _utf8(raw, f"{path}:{lineno}")
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
                records.append(_check(rec, f"{path}:{lineno}"))
    elif path.suffix in (".json", ".parquet"):
        if path.suffix == ".json":
            _check_json(path)  # `datasets` reports bad JSON or bytes without file, line or position
        try:
            ds = datasets.load_dataset(path.suffix.lstrip("."), data_files=str(path), split="train")
        except Exception as e:
            arrow = _arrow_error(e) if path.suffix == ".parquet" else None
            if arrow is None:
                raise
            raise DataError(f"{path}: not a readable Parquet file ({arrow})") from None
        records = [_check(dict(r), f"{path}: row {i}") for i, r in enumerate(ds)]
    else:
        raise DataError(f"{path}: unsupported data format {path.suffix!r} (use .jsonl, .json or .parquet)")
    if not records:
        raise DataError(f"{path}: the dataset is empty")
    return records


def _utf8(raw: bytes, where: str) -> str:
    """`raw` decoded as UTF-8, or a DataError naming the first bad byte and its column."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); save the file as UTF-8"
        ) from None


def _check_json(path: Path) -> None:
    """A DataError naming line, column and position when `path` is not UTF-8, empty, or neither one JSON document
    nor JSON Lines (both of which `datasets` reads from a .json file)."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        start = e.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)  # offsets of utf-8-sig skip the BOM
        lineno, line_start = data.count(b"\n", 0, start) + 1, data.rfind(b"\n", 0, start) + 1
        raise DataError(
            f"{path}:{lineno}: not UTF-8 text (byte 0x{data[start]:02x} at "
            f"column {start - line_start + 1}, byte position {start}); save the file as UTF-8"
        ) from None
    if not text.strip():
        raise DataError(f"{path}: the dataset is empty")
    try:
        json.loads(text)
        return
    except json.JSONDecodeError as e:
        doc_error = e
    lines = text.split("\n")
    first = next(i for i, x in enumerate(lines) if x.strip())
    try:
        json.loads(lines[first])
    except json.JSONDecodeError:  # not JSON Lines either: report the error in the one document
        e = doc_error
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno}, position {e.pos})") from None
    offset = 0
    for lineno, line in enumerate(lines, 1):  # JSON Lines: the first line that does not parse
        if line.strip():
            try:
                json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}, position {offset + e.pos})"
                ) from None
        offset += len(line) + 1


def _arrow_error(e: BaseException) -> str | None:
    """The first line of the pyarrow error behind `e` (a corrupt or non-Parquet file), if there is one."""
    import pyarrow

    while e is not None:
        if isinstance(e, pyarrow.ArrowException):
            return (str(e).strip().splitlines() or [type(e).__name__])[0]
        e = e.__cause__ or e.__context__
    return None


def _check(rec, where: str) -> dict:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    for key in REQUIRED:
        if key not in rec:
            raise DataError(f"{where}: missing field {key!r} (need 'instruction', 'output', optional 'input')")
    out = {"instruction": rec["instruction"], "input": rec.get("input") or "", "output": rec["output"]}
    for key, value in out.items():
        if not isinstance(value, str):
            raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return out


def sample_id(rec: dict) -> str:
    """16 hex chars (64 bits) of SHA-256 over the record's content."""
    key = json.dumps([rec["instruction"], rec["input"], rec["output"]], ensure_ascii=False)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def prompt_id(rec: dict) -> str:
    """16 hex chars of SHA-256 over the prompt alone (instruction + input): what the data split is chosen by."""
    key = json.dumps([rec["instruction"], rec["input"]], ensure_ascii=False)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def split_of(pid: str, val_fraction: float, test_fraction: float) -> str:
    """Deterministic split from the prompt id alone: the same example lands in the same split in any order, and
    examples that share a prompt (several answers to one question) share a split, so no test prompt is trained on."""
    u = int(pid[8:16], 16) / 2**32  # bits not used by anything else that hashes the id
    return "test" if u < test_fraction else "validation" if u < test_fraction + val_fraction else "train"


def render(rec: dict, tokenizer, template: str) -> tuple[str, str]:
    """(prompt, response) texts; the response includes the end-of-sequence marker the model must learn."""
    if template == "alpaca":
        return ALPACA_TEMPLATE.format(**rec), rec["output"] + tokenizer.eos_token
    if template == "chat":
        if not tokenizer.chat_template:
            raise DataError("template=chat but the tokenizer has no chat template; use template=alpaca")
        user = rec["instruction"] + (f"\n\n{rec['input']}" if rec["input"] else "")
        msgs = [{"role": "user", "content": user}]
        prompt = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": rec["output"]}], tokenize=False)
        if not full.startswith(prompt):
            raise DataError("the chat template renders the prompt differently with and without the answer")
        return prompt, full[len(prompt) :]
    raise DataError(f"unknown template {template!r} (use 'alpaca' or 'chat')")


def tokenize(rec: dict, tokenizer, template: str, max_length: int) -> tuple[dict, bool]:
    """input_ids with labels = IGNORE on the prompt; returns (example, truncated)."""
    return tokenize_many([rec], tokenizer, template, max_length)[0]


def tokenize_many(records: list[dict], tokenizer, template: str, max_length: int) -> list[tuple[dict, bool]]:
    """`tokenize` of every record, with one batched tokenizer call per side (the fast tokenizers encode a list
    in one Rust call: 20,000 records take a fraction of a second instead of seconds)."""
    texts = [render(rec, tokenizer, template) for rec in records]
    if not texts:
        return []
    prompts, responses = (_encode(tokenizer, [t[i] for t in texts]) for i in (0, 1))
    out = []
    for p, r in zip(prompts, responses):
        ids, labels = p + r, [IGNORE] * len(p) + r
        out.append(({"input_ids": ids[:max_length], "labels": labels[:max_length]}, len(ids) > max_length))
    return out


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow (Python) tokenizer
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    # the Rust tokenizer directly: transformers' wrapper spends as long again converting each encoding
    return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]


@dataclass
class Splits:
    """Tokenised examples per split plus what happened on the way."""

    splits: dict[str, datasets.Dataset]
    n_truncated: int
    n_dropped: int  # no supervised token left after truncation
    n_duplicates: int

    def __getitem__(self, name: str) -> datasets.Dataset:
        return self.splits[name]


def load_splits(cfg: DataConfig, tokenizer, log=print) -> Splits:
    """Read, deduplicate, tokenise and split the data; columns: sample_id, input_ids, labels + the record."""
    records = read_records(cfg.path)
    if cfg.limit < 0:
        raise DataError(f"data.limit must be >= 0 (0 = all records), got {cfg.limit}")
    # the first `limit` records, like a train[:N] slice of a public dataset: a short run on a fixed subset
    records = records[: cfg.limit] if cfg.limit else records
    rows = {name: [] for name in ("train", "validation", "test")}
    seen, n_trunc, n_drop = set(), 0, 0
    unique = []
    for rec in records:
        sid = sample_id(rec)
        if sid not in seen:  # identical examples would collide in the id-keyed cache
            seen.add(sid)
            unique.append((sid, rec))
    encoded = tokenize_many([rec for _, rec in unique], tokenizer, cfg.template, cfg.max_length)
    for (sid, rec), (ex, truncated) in zip(unique, encoded):
        n_trunc += truncated
        if all(x == IGNORE for x in ex["labels"][1:]):  # nothing left to supervise
            n_drop += 1
            continue
        rows[split_of(prompt_id(rec), cfg.val_fraction, cfg.test_fraction)].append({"sample_id": sid, **ex, **rec})
    n_dup = len(records) - len(seen)
    log(
        f"data: {len(records)} records from {cfg.path}: "
        + ", ".join(f"{k} {len(v)}" for k, v in rows.items())
        + f"; truncated to {cfg.max_length} tokens: {n_trunc}; dropped (no response left): {n_drop}"
        + f"; duplicates removed: {n_dup}"
    )
    if n_drop == len(seen):
        raise DataError(f"{cfg.path}: no example keeps a response token within max_length={cfg.max_length}")
    cols = ["sample_id", "input_ids", "labels", "instruction", "input", "output"]
    splits = {k: datasets.Dataset.from_dict({c: [r[c] for r in v] for c in cols}) for k, v in rows.items()}
    return Splits(splits, n_trunc, n_drop, n_dup)


def tokenizer_hash(tokenizer) -> str:
    """Hash of what makes two tokenizers interchangeable: the vocabulary, special tokens and chat template.

    Compared instead of `vocab_size`: Qwen2.5 models with 151,936 and 152,064 logit columns share one
    151,665-entry tokenizer, while two tokenizers of equal size may map ids to different strings.
    """
    data = {
        "vocab": sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]),
        "special": sorted(map(str, tokenizer.all_special_tokens)),
        "chat_template": tokenizer.chat_template or "",
    }
    return hashlib.sha256(json.dumps(data, ensure_ascii=False).encode()).hexdigest()[:16]


def fingerprint(ds: datasets.Dataset, template: str) -> str:
    """Hash of the exact token sequences and labels a split holds (what the cache's rows correspond to)."""
    h = hashlib.sha256(template.encode())
    for sid, ids, labels in zip(ds["sample_id"], ds["input_ids"], ds["labels"]):
        h.update(f"{sid}:{ids}:{labels};".encode())
    return h.hexdigest()[:16]


def pad_collate(batch: list[dict], pad_id: int) -> dict:
    """Right-pad input_ids (pad_id) and labels (IGNORE) to the batch's longest sequence."""
    import torch

    L = max(len(x["input_ids"]) for x in batch)
    ids = torch.full((len(batch), L), pad_id, dtype=torch.long)  # (B, L)
    labels = torch.full((len(batch), L), IGNORE, dtype=torch.long)  # (B, L)
    att = torch.zeros((len(batch), L), dtype=torch.long)  # (B, L)
    for b, x in enumerate(batch):
        n = len(x["input_ids"])
        ids[b, :n] = torch.as_tensor(x["input_ids"])
        labels[b, :n] = torch.as_tensor(x["labels"])
        att[b, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": att}
