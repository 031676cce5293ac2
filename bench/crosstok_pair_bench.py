"""Chunk-level KL events (pipeline/distill/chunks.py) on a real tokenizer pair, Llama 3 and Qwen2.5, both ways.

    pip download --no-deps llama-models==0.3.0 dashscope==2.0.2 -d /tmp/tok
    unzip -o /tmp/tok/llama_models-0.3.0-py3-none-any.whl llama_models/llama3/tokenizer.model -d /tmp/tok
    unzip -o /tmp/tok/dashscope-2.0.2-py3-none-any.whl dashscope/resources/qwen.tiktoken -d /tmp/tok
    python bench/crosstok_pair_bench.py --llama /tmp/tok/llama_models/llama3/tokenizer.model \\
        --qwen /tmp/tok/dashscope/resources/qwen.tiktoken      # writes bench/results/crosstok_pair_bench.{json,md}

Nothing is downloaded and no dependency added: both files are tiktoken vocabularies ("base64_token rank" lines;
Llama 3: 128,000 ordinary tokens; Qwen: 151,643, kept by Qwen2 and Qwen2.5), encoded here with `regex`: each side's
pre-tokenizer pattern (llama_models/llama3/tokenizer.py, dashscope/tokenizers/qwen_tokenizer.py: identical but for
numbers, Llama 3 \\p{N}{1,3}, Qwen \\p{N}), then tiktoken's rank-based BPE per pre-token (merge the lowest-ranked
adjacent pair while one is a token). Ordinary tokens only; texts NFC-normalized (as Qwen's tokenizer does). Checked
before measuring: known ids, digit grouping, every text decoded back to itself.

Texts: "docs" = README.md + docs/*.md as they are at run time; "numeric" = --lines arithmetic word problems with
1-6 digit operands (random.Random(--seed)). Per direction (teacher -> student) and text, the shares of the student's
tokens (rows; token i is what row i predicts), all of them and the digit-only ones:
  aligned     its start is also a teacher token's start (`crosstok.align` on the byte offsets)
  exact L=1   aligned, the same bytes as the teacher's token there (`ChunkEvents.span` = 1)
  exact L>=2  aligned, the concatenation of L >= 2 whole teacher tokens (span = L; distribution of L given)
  finer       aligned but it ends inside a teacher token (span 0: no chunk events, CE only)
  other       its start is not a teacher boundary (no events either)
and of the teacher rows whose token has a byte-identical student token (what the identical-string map can use).
Per direction: the teacher vocabulary with a byte-identical student token (`token_map` >= 0), the event matrix
(`ChunkEvents.first_piece`: student tokens with a first piece, the vector's int64 bytes, groups = teacher tokens
that are some student token's first piece, mean/max group size) and the time to build `ChunkEvents`.
"""

import argparse
import base64
import hashlib
import json
import random
import sys
import time
import unicodedata
from collections import Counter
from pathlib import Path

import numpy as np
import regex
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline.distill.chunks import ChunkEvents  # noqa: E402
from pipeline.distill.crosstok import align, unique_index  # noqa: E402
from pipeline.versions import versions, versions_line  # noqa: E402

LLAMA3_PAT = (  # verbatim, split in two lines
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN_PAT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CATS = ("exact_L1", "exact_L2plus", "finer", "other")
NO_RANK = 1 << 62
PROBLEMS = (  # arithmetic word problems: name, item, operands a >= b
    "{n} has {a} {i} and gets {b} more. How many {i} now? Answer: {s}.",
    "{n} had {a} {i} and gave away {b}. How many are left? {a} - {b} = {d}.",
    "{a} crates hold {b} {i} each. How many {i} in total? {a} * {b} = {p}.",
    "{p} {i} are shared by {b} people. How many does each get? Answer: {a}.",
)


class Bpe:
    """A tiktoken vocabulary's encoder for ordinary text: pre-tokenize with `pattern`, rank-based BPE per pre-token."""

    def __init__(self, path: str, pattern: str):
        self.ranks = {}
        for line in Path(path).read_bytes().splitlines():
            if line:
                tok, rank = line.split()
                self.ranks[base64.b64decode(tok)] = int(rank)
        self.table = [None] * len(self.ranks)  # bytes per id (= rank)
        for b, r in self.ranks.items():
            self.table[r] = b
        assert None not in self.table, f"{path}: the ranks are not 0..n-1"
        self.pat, self.cache = regex.compile(pattern), {}

    def _bpe(self, b: bytes) -> list[int]:
        if b in self.ranks:
            return [self.ranks[b]]
        parts = [b[i : i + 1] for i in range(len(b))]
        while len(parts) > 1:  # the lowest-ranked pair, the leftmost of equal ones
            best, at = min((self.ranks.get(parts[i] + parts[i + 1], NO_RANK), i) for i in range(len(parts) - 1))
            if best == NO_RANK:
                break
            parts[at : at + 2] = [parts[at] + parts[at + 1]]
        return [self.ranks[p] for p in parts]

    def encode(self, text: str) -> list[int]:
        out = []
        for piece in self.pat.findall(text):
            if piece not in self.cache:
                self.cache[piece] = self._bpe(piece.encode())
            out += self.cache[piece]
        return out

    def decode(self, ids) -> bytes:
        return b"".join(self.table[i] for i in ids)


def check(enc: dict[str, Bpe]):
    """Known ids (tiktoken's, for "Hello world"), digit grouping, round trips."""
    for k, ids in (("llama", [9906, 1917]), ("qwen", [9707, 1879])):
        assert enc[k].encode("Hello world") == ids, (k, enc[k].encode("Hello world"))
    pieces = {k: [e.table[i] for i in e.encode("x = 1234567 + 89;")] for k, e in enc.items()}
    assert [p for p in pieces["llama"] if p.strip().isdigit()] == [b"123", b"456", b"7", b"89"], pieces["llama"]
    assert [p for p in pieces["qwen"] if p.strip().isdigit()] == [bytes([c]) for c in b"123456789"], pieces["qwen"]
    for s in ("Grüße, 世界! naïve café\n\n  tabs\tand 3.14159 ", "don't   stop\r\n'LL 12,345.67"):
        for e in enc.values():
            assert e.decode(e.encode(s)) == s.encode()


def numeric_text(lines: int, seed: int) -> str:
    rng = random.Random(seed)
    names = ("Ada", "Ben", "Chen", "Dana", "Eli", "Fatima", "Goran", "Hana", "Ivo", "June")
    items = ("apples", "bolts", "tickets", "coins", "pages", "litres", "boxes", "seeds", "stamps", "bricks")
    out = []
    for _ in range(lines):
        n, i, digits = rng.choice(names), rng.choice(items), (rng.randint(1, 6), rng.randint(1, 6))
        b, a = sorted(rng.randint(10 ** (d - 1), 10**d - 1) for d in digits)
        out.append(rng.choice(PROBLEMS).format(n=n, i=i, a=a, b=b, s=a + b, d=a - b, p=a * b))
    return "\n".join(out) + "\n"


def token_map(t_bytes: list, s_bytes: list) -> torch.Tensor:
    """(V_t,) teacher id -> student id of the identical byte string (unique on both sides), else -1."""
    s_index, out = unique_index(s_bytes), [-1] * len(t_bytes)
    for b, i in unique_index(t_bytes).items():
        out[i] = s_index.get(b, -1)
    return torch.tensor(out, dtype=torch.long)


def starts(ids: list[int], table: list) -> np.ndarray:
    return np.cumsum([0] + [len(table[i]) for i in ids[:-1]]).astype(np.int64)


def rows(teacher: Bpe, student: Bpe, ev: ChunkEvents, tmap: np.ndarray, text: str) -> dict:
    t_ids, s_ids = teacher.encode(text), student.encode(text)
    t_starts, s_starts = starts(t_ids, teacher.table), starts(s_ids, student.table)
    t_targets, t_ok = np.array(t_ids, dtype=np.int64), np.ones(len(t_ids), dtype=bool)
    t_bounds = set(t_starts.tolist()) | {len(text.encode())}
    aligned = align(t_starts, s_starts)
    res = {k: {"rows": 0, "aligned": 0, **dict.fromkeys(CATS, 0), "L": Counter()} for k in ("all", "digits")}
    for i, (u, j) in enumerate(zip(s_ids, aligned.tolist())):
        b = student.table[u]
        L = ev.span(u, j, t_targets, t_ok) if j >= 0 else 0
        if j >= 0:  # span 0 iff the token ends inside a teacher token
            assert (L > 0) == (int(s_starts[i]) + len(b) in t_bounds), (i, b)
        cat = "other" if j < 0 else "finer" if L == 0 else "exact_L1" if L == 1 else "exact_L2plus"
        for k in ("all", "digits") if b.isdigit() else ("all",):
            r = res[k]
            r["rows"], r["aligned"], r[cat] = r["rows"] + 1, r["aligned"] + (j >= 0), r[cat] + 1
            if L:
                r["L"][L] += 1
    for r in res.values():
        r.update({k + "_share": r[k] / max(r["rows"], 1) for k in ("aligned", *CATS)})
        r["L"] = {int(L): c for L, c in sorted(r["L"].items())}
    res["all"]["teacher_rows"] = len(t_ids)
    res["all"]["teacher_rows_mapped_share"] = float((tmap[t_targets] >= 0).mean())
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama", required=True, help="llama_models/llama3/tokenizer.model of llama-models==0.3.0")
    ap.add_argument("--qwen", required=True, help="dashscope/resources/qwen.tiktoken of dashscope==2.0.2")
    ap.add_argument("--lines", type=int, default=2000, help="lines of the numeric text")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.set_num_threads(1)
    enc = {"llama": Bpe(args.llama, LLAMA3_PAT), "qwen": Bpe(args.qwen, QWEN_PAT)}
    check(enc)
    doc_files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    texts = {"docs": "\n\n".join(p.read_text() for p in doc_files), "numeric": numeric_text(args.lines, args.seed)}
    texts = {k: unicodedata.normalize("NFC", v) for k, v in texts.items()}
    assert all(e.decode(e.encode(v)) == v.encode() for v in texts.values() for e in enc.values()), "no round trip"
    names = {"llama": "Llama 3", "qwen": "Qwen2.5"}
    result = {
        "files": {
            k: {"path": p, "sha256": hashlib.sha256(Path(p).read_bytes()).hexdigest(), "tokens": len(enc[k].table)}
            for k, p in (("llama", args.llama), ("qwen", args.qwen))
        },
        "texts": {
            "docs": {"files": [str(p.relative_to(ROOT)) for p in doc_files], "bytes": len(texts["docs"].encode())},
            "numeric": {"lines": args.lines, "seed": args.seed, "bytes": len(texts["numeric"].encode())},
        },
        "pairs": {},
    }
    for t, s in (("qwen", "llama"), ("llama", "qwen")):
        teacher, student = enc[t], enc[s]
        tmap = token_map(teacher.table, student.table)
        t0 = time.perf_counter()
        ev = ChunkEvents(teacher.table, student.table, tmap)
        build_s = time.perf_counter() - t0
        first = ev.first_piece.numpy()
        sizes = np.unique(first[first >= 0], return_counts=True)[1]  # per group
        vocab = {
            "teacher_vocab": len(teacher.table),
            "student_vocab": len(student.table),
            "teacher_vocab_mapped_share": float((tmap >= 0).float().mean()),
            "student_with_first_piece": int((first >= 0).sum()),
            "first_piece_bytes": int(ev.first_piece.numel() * ev.first_piece.element_size()),
            "groups": len(sizes),
            "group_size_mean": float(sizes.mean()),
            "group_size_max": int(sizes.max()),
            "build_s": build_s,
        }
        by_text = {k: rows(teacher, student, ev, tmap.numpy(), v) for k, v in texts.items()}
        result["pairs"][f"{t}->{s}"] = {"teacher": names[t], "student": names[s], "vocab": vocab, "texts": by_text}

    lines = [
        "## Chunk-level KL events on a real pair: Llama 3 and Qwen2.5",
        "",
        f"docs = README.md + docs/*.md ({result['texts']['docs']['bytes']:,} bytes); numeric = {args.lines} "
        f"arithmetic word problems, 1-6 digit operands, seed {args.seed} ({result['texts']['numeric']['bytes']:,} "
        "bytes). Shares of the student rows; digits = student tokens made of digits only.",
        "",
        "| teacher -> student | text | rows | student rows (teacher) | aligned | exact L=1 | exact L>=2 | finer | "
        "other | L >= 2: rows by L | teacher rows mapped |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for pair in result["pairs"].values():
        for tx, res in pair["texts"].items():
            for k, r in res.items():
                dist = ", ".join(f"{L}: {c:,}" for L, c in r["L"].items() if L >= 2) or "-"
                n = f"{r['rows']:,}" + (f" ({r['teacher_rows']:,})" if k == "all" else "")
                mapped = f"{r['teacher_rows_mapped_share']:.1%}" if k == "all" else ""
                lines.append(
                    f"| {pair['teacher']} -> {pair['student']} | {tx} | {k} | {n} | "
                    + " | ".join(f"{r[c + '_share']:.1%}" for c in ("aligned", *CATS))
                    + f" | {dist} | {mapped} |"
                )
    lines += [
        "",
        "| teacher -> student | teacher vocab with an identical student token | student tokens with a first piece | "
        "first_piece (int64) | groups | group size mean / max | ChunkEvents build |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for pair in result["pairs"].values():
        v = pair["vocab"]
        lines.append(
            f"| {pair['teacher']} -> {pair['student']} | {v['teacher_vocab_mapped_share']:.1%} of "
            f"{v['teacher_vocab']:,} | {v['student_with_first_piece']:,} of {v['student_vocab']:,} | "
            f"{v['first_piece_bytes'] / 2**20:.2f} MiB | {v['groups']:,} | {v['group_size_mean']:.2f} / "
            f"{v['group_size_max']} | {v['build_s']:.2f} s |"
        )
    text = "\n".join(lines) + "\n"
    out = ROOT / "bench/results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "crosstok_pair_bench.json").write_text(json.dumps({**result, "versions": versions()}, indent=2))
    (out / "crosstok_pair_bench.md").write_text(f"{text}\n{versions_line()}\n")
    print(text)


if __name__ == "__main__":
    main()
