"""Cross-tokenizer Stage 2: the student's own tokens for each cached sequence, the alignment of its rows with the
teacher's, and the map from teacher to student token ids. Imports no loss code.

What the cache provides (pipeline/teacher/cache_teacher.py): the teacher's rows keyed by sample_id, and beside the
stores the teacher's tokenizer. The student reads the records again (data.path, joined by sample_id, a content hash
that no tokenizer enters), renders them with its own template and tokenizes them; the teacher's response is
re-tokenized with the saved teacher tokenizer to get character offsets, and checked token by token against the
cached ids (so a changed tokenizer library or data file fails loudly instead of misaligning).

ALIGNMENT RULE. Positions are byte offsets into the record's answer (`output`, UTF-8); every token that ends the
answer (end of sequence, a template's end-of-turn) sits at its length. A row predicts the token after its position,
so a row is placed at the offset where its predicted token starts. Student row i and teacher row j are aligned iff
both start their predicted token at the same byte offset (and it is the first token placed there). Aligned rows
condition on the same answer bytes and predict the same next bytes, even inside a multi-byte character. Each side's
rows are kept for the sequence-level terms only up to the text both sides cover (one side may be truncated at
data.max_length).

CHUNKS (`alm_chunks`, for the chunk likelihood matching): the spans between consecutive aligned rows, i.e. between
byte offsets where both tokenizations start a token; each side's rows of a chunk spell the same bytes.

TOKEN MAP. Teacher id -> student id whose token is the identical byte string (byte-level BPE symbols and
SentencePiece's "▁" / <0xNN> decoded to bytes first); strings that are not unique in either vocabulary are left out,
and special tokens map only to a student special token, of the same spelling or the same role (eos, pad, bos,
unk), never to an ordinary token. -1 = unmapped.
"""

import tempfile
from pathlib import Path

import numpy as np
import torch

from cache import location
from cache.errors import CacheMismatchError, OtkdError
from cache.location import is_url, join, loc
from cache.reader import CacheBlocks
from cache.schema import TOKENIZER_DIR
from pipeline.data.records import load_splits, render, tokenizer_hash

ROLES = ("eos_token", "pad_token", "bos_token", "unk_token")


class CrossTokenizerError(OtkdError, ValueError):
    """The records or tokenizers cannot be aligned (the message says which and why)."""


def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable-symbol -> byte table (the inverse of its bytes_to_unicode)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_bytes(tokenizer) -> list[bytes | None]:
    """Per id, the bytes its token stands for in text; None for special tokens and unknown encodings."""
    vocab = tokenizer.get_vocab()
    out: list[bytes | None] = [None] * len(tokenizer)
    special = set(tokenizer.all_special_ids)
    decoder = str(tokenizer.backend_tokenizer.decoder.__getstate__()) if hasattr(tokenizer, "backend_tokenizer") else ""
    byte_level = "ByteLevel" in decoder
    table = _byte_decoder()
    for tok, i in vocab.items():
        if i >= len(out) or i in special:
            continue
        if byte_level:
            try:
                out[i] = bytes(table[c] for c in tok)
            except KeyError:  # an added token written in plain text
                out[i] = tok.encode()
        elif tok.startswith("<0x") and tok.endswith(">") and len(tok) == 6:  # SentencePiece byte fallback
            out[i] = bytes([int(tok[3:5], 16)])
        else:
            out[i] = tok.replace("▁", " ").encode()
    return out


def unique_index(table: list[bytes | None]) -> dict[bytes, int]:
    """bytes -> id for the byte strings exactly one id of `table` (`token_bytes`) spells."""
    seen: dict[bytes, int] = {}
    dup = set()
    for i, b in enumerate(table):
        if b is not None:
            if b in seen:
                dup.add(b)
            seen[b] = i
    return {b: i for b, i in seen.items() if b not in dup}


def token_map(teacher_tok, student_tok) -> torch.Tensor:
    """(V_teacher,) long: the student id of the identical token string, or -1 (see the module docstring)."""
    t_bytes, s_bytes = token_bytes(teacher_tok), token_bytes(student_tok)
    s_index = unique_index(s_bytes)
    out = torch.full((len(teacher_tok),), -1, dtype=torch.long)
    for b, i in unique_index(t_bytes).items():
        if b in s_index:
            out[i] = s_index[b]
    s_special = dict(zip(student_tok.all_special_tokens, student_tok.all_special_ids))
    for tok, i in zip(teacher_tok.all_special_tokens, teacher_tok.all_special_ids):  # special to special only
        if tok in s_special and i < len(out):
            out[i] = s_special[tok]
    for role in ROLES:  # and by role (an end of sequence is one whatever its spelling)
        t_id, s_id = getattr(teacher_tok, role + "_id", None), getattr(student_tok, role + "_id", None)
        if t_id is not None and s_id is not None and t_id < len(out):
            out[t_id] = s_id
    return out


def response_positions(tokenizer, table: list[bytes | None], rec: dict, template: str) -> tuple[list[int], np.ndarray]:
    """(ids of the response tokens, their start offsets in bytes of `output`): tokens that start at or after the end
    of the answer (end of sequence, end of turn) are placed at its length.

    Offsets are exact bytes from the tokens' own byte strings (`table`, `token_bytes`) when they spell the response
    exactly; otherwise from the tokenizer's character offsets, where a token inside a multi-byte character cannot be
    placed (-1). Bytes matter: a byte-level token may start in the middle of a character (回 = e5 9b 9e, split as
    "e5 9b" + "9e ..."), and only byte offsets tell that context apart from the character's start.
    """
    _, response = render(rec, tokenizer, template)
    answer = rec["output"] if rec["output"] in response else rec["output"].strip()  # chat templates may trim it
    base = response.find(answer)
    if base < 0:
        raise CrossTokenizerError(
            f"sample {rec.get('sample_id', '?')}: the template {template!r} changes the answer "
            "text, so the two tokenizations cannot be aligned by it"
        )
    enc = tokenizer(response, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    pieces = [
        table[i] if i < len(table) and table[i] is not None else response[a:b].encode()
        for i, (a, b) in zip(ids, offsets)
    ]
    if b"".join(pieces) == response.encode():
        starts = np.cumsum([0] + [len(p) for p in pieces[:-1]])
    else:  # character offsets in bytes; a token sharing its start with the previous one is inside a character
        starts = np.array([len(response[:a].encode()) for a, _ in offsets])
        starts = np.where(starts > np.r_[-1, starts[:-1]], starts, -1 - len(response.encode()))
    starts = starts - len(response[:base].encode())
    return ids, np.clip(starts, -1, len(answer.encode())).astype(np.int64)


def clean(starts: np.ndarray) -> np.ndarray:
    """A start is a clean boundary iff it is >= 0 and strictly after the previous token's start."""
    prev = np.r_[-1, starts[:-1]]
    return (starts >= 0) & (starts > prev)


def align(t_starts: np.ndarray, s_starts: np.ndarray) -> np.ndarray:
    """(N,) for each student row the teacher row with the same clean start, or -1 (both sides' starts increase)."""
    t_ok, s_ok = clean(t_starts), clean(s_starts)
    where = {int(p): j for j, p in enumerate(t_starts) if t_ok[j]}
    return np.array([where.get(int(p), -1) if s_ok[i] else -1 for i, p in enumerate(s_starts)], dtype=np.int64)


def alm_chunks(t_starts: np.ndarray, s_starts: np.ndarray, aligned: np.ndarray, complete: bool):
    """(chunk id per student row (N,), per teacher row (M,)), -1 outside a chunk: a chunk runs from one aligned
    pair of rows to the next; the last one only when both sides hold every row to the end (`complete`).

    t_starts: (M,) / s_starts: (N,) byte offsets of the rows' tokens; aligned: (N,) teacher row or -1."""
    pairs = [(i, int(j)) for i, j in enumerate(aligned) if j >= 0]
    s_chunk, t_chunk = np.full(len(s_starts), -1), np.full(len(t_starts), -1)
    ends = pairs[1:] + ([(len(s_starts), len(t_starts))] if complete else [])
    for c, ((i0, j0), (i1, j1)) in enumerate(zip(pairs, ends)):
        s_chunk[i0:i1], t_chunk[j0:j1] = c, c
    return s_chunk, t_chunk


def covered(starts: np.ndarray, n_rows: int, end: int) -> int:
    """Text offset up to which `n_rows` of a side's response tokens reach (the start of the first missing token)."""
    return int(starts[n_rows]) if n_rows < len(starts) else end + 1


class StudentSide:
    """The student's tokens, rows and alignment for every cached sequence, by sample_id."""

    def __init__(self, data_cfg, student_tok, teacher_tok, log=print, events=None):
        """events: a `chunks.ChunkEvents` when the chunk-level KL is on (its per-row events join each read)."""
        splits = load_splits(data_cfg, student_tok, log=lambda *_: None)
        self.template = data_cfg.template
        self.by_sid: dict[str, dict] = {}
        for name in ("train", "validation", "test"):
            for ex in splits[name]:
                self.by_sid[ex["sample_id"]] = ex
        self.student_tok, self.teacher_tok = student_tok, teacher_tok
        self.student_bytes, self.teacher_bytes = token_bytes(student_tok), token_bytes(teacher_tok)
        self._positions: dict[str, tuple] = {}
        self.events = events
        log(
            f"cross-tokenizer: {len(self.by_sid)} records tokenized by the student ({len(student_tok)} tokens), "
            f"teacher tokenizer {len(teacher_tok)} tokens"
        )

    def example(self, read: dict) -> dict:
        """Student fields for one cache read (needs its input_ids and supervised): checked, aligned."""
        sid = read["sample_id"]
        ex = self.by_sid.get(sid)
        if ex is None:
            raise CrossTokenizerError(
                f"sample {sid} of the teacher cache is not among the records of data.path (the "
                "data file changed since Stage 1?); the cross-tokenizer student needs its text"
            )
        rec = {k: ex[k] for k in ("instruction", "input", "output")}
        if sid not in self._positions:  # tokenized once per record, not once per epoch
            self._positions[sid] = (
                response_positions(self.teacher_tok, self.teacher_bytes, rec, self.template),
                response_positions(self.student_tok, self.student_bytes, rec, self.template)[1],
            )
        (t_ids, t_starts), s_starts = self._positions[sid]
        pos = np.flatnonzero(read["supervised"])  # teacher rows
        M = len(pos)
        cached = np.asarray(read["input_ids"])[pos + 1]
        if M > len(t_ids) or not np.array_equal(cached, np.asarray(t_ids[:M])):
            raise CacheMismatchError(
                f"sample {sid}: the cached teacher tokens differ from the saved teacher "
                "tokenizer's tokens of the record's answer (another tokenizer, template or data "
                "since Stage 1); recreate the cache"
            )
        labels = np.asarray(ex["labels"])
        s_rows = np.flatnonzero(labels[1:] != -100)  # student positions whose next token is supervised
        N = len(s_rows)
        end = max(t_starts.max(initial=0), s_starts.max(initial=0))  # the answer's length in bytes
        cov = min(covered(t_starts, M, end), covered(s_starts, N, end))
        aligned = align(t_starts[:M], s_starts[:N])
        out = {
            "student_ids": np.asarray(ex["input_ids"]),
            "student_rows": s_rows,
            "aligned": aligned,
            "student_keep": s_starts[:N] < cov,
            "teacher_keep": t_starts[:M] < cov,
        }
        complete = M == len(t_ids) and N == len(s_starts)  # neither side truncated: the last chunk is whole
        out["alm_student"], out["alm_teacher"] = alm_chunks(t_starts[:M], s_starts[:N], aligned, complete)
        if self.events is not None and "topk_ids" in read:
            s_targets = np.asarray(ex["input_ids"])[s_rows + 1]
            out.update(self.events.rows(s_targets, aligned, cached, np.asarray(read["topk_ids"]), out["teacher_keep"]))
        return out


class CrossBlocks(torch.utils.data.Dataset):
    """`CacheBlocks` whose reads carry the student's fields too (see `StudentSide.example`)."""

    def __init__(self, blocks: CacheBlocks, side: StudentSide):
        self.blocks, self.side = blocks, side

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> list[dict]:
        return [{**r, **self.side.example(r)} for r in self.blocks[i]]


def load_teacher_tokenizer(cache_dir: str | Path, want_hash: str):
    """The teacher tokenizer Stage 1 saved beside the stores, checked against the stores' tokenizer_hash."""
    from transformers import AutoTokenizer

    path = join(loc(cache_dir), TOKENIZER_DIR)
    if not location.exists(join(path, "tokenizer_config.json")):
        raise CacheMismatchError(
            f"the teacher cache at {cache_dir} has no saved teacher tokenizer ({path}); it was "
            "made before cross-tokenizer support: rerun Stage 1 (python -m stages.cache_teacher)"
        )
    if is_url(path):  # a remote cache: the few tokenizer files are copied here first
        with tempfile.TemporaryDirectory() as tmp:
            tok = AutoTokenizer.from_pretrained(str(location.download(path, Path(tmp) / TOKENIZER_DIR)))
    else:
        tok = AutoTokenizer.from_pretrained(str(path))
    if tokenizer_hash(tok) != want_hash:
        raise CacheMismatchError(
            f"the teacher tokenizer saved in {path} (hash {tokenizer_hash(tok)}) is not the one the "
            f"cache was made with (hash {want_hash}); rerun Stage 1"
        )
    return tok
