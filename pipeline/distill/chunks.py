"""Which student tokens make which chunk-level event, per student row (the data half of pipeline/losses/chunk.py).

Built once from the two vocabularies' byte strings (`crosstok.token_bytes`), then per cached sequence from its
observed tokens and the teacher's cached top-k ids. Every lookup is by exact bytes, so a row is either an exact
event row (its student token is a concatenation of whole teacher tokens, L >= 1) or left to CE alone: a student
token that ends inside a teacher token (a student finer than the teacher there) gets no events.

FIRST PIECE of a student token: its longest prefix that is a teacher token (the teacher's next token when the
teacher writes that text greedily); special tokens: their counterpart under the token map (end of sequence ->
end of sequence). Group a = the student tokens whose first piece is a.
RUN END after a prefix P: the student emits P itself when the teacher's next token v cannot extend it, i.e. no
student token starts with P + the first byte of v (or v is a special token).
"""

import numpy as np
import torch

from pipeline.distill.crosstok import unique_index

NONE = -1


class ChunkEvents:
    """The vocabulary tables of the chunk-level events: first pieces (V_s,) and exact-bytes indexes."""

    def __init__(self, teacher_bytes: list, student_bytes: list, token_map: torch.Tensor):
        self.t_bytes, self.s_bytes = teacher_bytes, student_bytes
        self.token_map = token_map.numpy()
        self.s_index = unique_index(student_bytes)
        self.s_prefixes = {b[:n] for b in self.s_index for n in range(1, len(b) + 1)}
        t_index = unique_index(teacher_bytes)
        longest = max(map(len, t_index), default=0)
        first = np.full(len(student_bytes), NONE, dtype=np.int64)
        for u, b in enumerate(student_bytes):
            if b is not None:
                for n in range(min(len(b), longest), 0, -1):
                    if b[:n] in t_index:
                        first[u] = t_index[b[:n]]
                        break
        for t, u in enumerate(self.token_map):  # specials: the mapped counterpart (eos -> eos)
            if u >= 0 and teacher_bytes[t] is None:
                first[u] = t
        self.first_piece = torch.from_numpy(first)  # (V_s,)
        self.has_group = np.zeros(len(teacher_bytes) + 1, dtype=bool)  # last entry: ids beyond the tokenizer
        self.has_group[first[first >= 0]] = True

    def _teacher(self, t: int) -> bytes | None:
        return self.t_bytes[t] if t < len(self.t_bytes) else None

    def span(self, u: int, j: int, t_targets: np.ndarray, t_ok: np.ndarray) -> int:
        """How many teacher rows from j the student token u spans exactly (0: it ends inside a teacher token, or
        needs rows that are not there)."""
        b = self.s_bytes[u] if u < len(self.s_bytes) else None
        if b is None:  # a special token: the teacher's must be its counterpart
            return int(self.token_map[t_targets[j]] == u) if t_targets[j] < len(self.token_map) else 0
        acc, L = b"", 0
        while len(acc) < len(b) and j + L < len(t_targets) and t_ok[j + L]:
            piece = self._teacher(int(t_targets[j + L]))
            if piece is None:
                return 0
            acc, L = acc + piece, L + 1
        return L if acc == b else 0

    def rows(self, s_targets, aligned, t_targets, topk, t_ok) -> dict[str, np.ndarray]:
        """Per student row (N): its first and last teacher rows (-1: no events), group teacher ids (N, k+1),
        single student ids (N, k+2) and boundary slots (N, k), in pipeline/losses/chunk.py's layout.

        s_targets: (N,) the student token each row predicts; aligned: (N,) teacher row with the same start or -1;
        t_targets: (M,) the teacher token each teacher row predicts; topk: (M, k) cached ids; t_ok: (M,) usable."""
        N, k = len(s_targets), topk.shape[1]
        first, last = np.full(N, NONE), np.full(N, NONE)
        groups, singles = np.full((N, k + 1), NONE), np.full((N, k + 2), NONE)
        boundary = np.zeros((N, k), dtype=bool)
        has = self.has_group[np.minimum(topk, len(self.has_group) - 1)]  # (M, k)
        for i in range(N):
            j, u = int(aligned[i]), int(s_targets[i])
            L = self.span(u, j, t_targets, t_ok) if j >= 0 and t_ok[j] else 0
            if L == 0:
                continue
            first[i], last[i] = j, j + L - 1
            t1, top = int(t_targets[j]), topk[j]
            if L == 1:
                groups[i, :k] = np.where(has[j], top, NONE)
                if t1 not in top and self.has_group[min(t1, len(self.has_group) - 1)]:
                    groups[i, k] = t1
                continue
            groups[i, :k] = np.where(has[j] & (top != t1), top, NONE)  # t_1's group is refined by the singles
            prefix = b"".join(self._teacher(int(t)) for t in t_targets[j : j + L - 1])
            seen = set()
            for c, v in enumerate(topk[j + L - 1]):
                piece = self._teacher(int(v))
                if piece is None:  # an end of sequence after the prefix: the student's token ends there
                    boundary[i, c] = True
                    continue
                sid = self.s_index.get(prefix + piece)
                if sid is not None and sid not in seen:
                    singles[i, c] = sid
                    seen.add(sid)
                elif sid is None and prefix + piece[:1] not in self.s_prefixes:
                    boundary[i, c] = True
            if t_targets[j + L - 1] not in topk[j + L - 1]:  # the observed completion, outside the top-k
                singles[i, k] = u
            singles[i, k + 1] = self.s_index.get(prefix, NONE)
        return {
            "chunk_first": first,
            "chunk_last": last,
            "ev_groups": groups,
            "ev_singles": singles,
            "ev_boundary": boundary,
        }
