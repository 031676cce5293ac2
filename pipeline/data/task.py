"""Synthetic task: the digit sum of a 6-digit string ("385102" -> "王大丫丫的回答是--->19"), in the user's record format, chosen because a tiny teacher learns it in CPU-minutes while a smaller student on labels alone does not.

Why this task (measured on CPU when it was chosen): the task of the user's original design notes (split N into
any a + b) and multi-digit addition are too hard for a tiny from-scratch model in a few CPU-minutes (carry
alignment is learnt late), while digit reversal and sorting are too easy (a 2-layer × 64 student solves them
too). The digit sum sits in between: the answer depends on all six digits at once, so the model must aggregate
the whole input rather than copy positions. The answer is unique and checkable, it is one or two digit tokens
(Qwen's pre-tokenizer splits digits), and a teacher that is unsure puts its mass on NEIGHBOURING sums ("19" vs
"18"/"20") — structure a soft target carries and a one-hot label does not, which is what distillation can add.
Record format follows the records of the user's original design notes exactly: a digit-string instruction, empty
input, and the "王大丫丫的回答是--->" response marker.
"""
import random
import re

from cache.errors import OtkdError

MARKER = "王大丫丫的回答是--->"  # the response prefix of the records in the user's original design notes
N_DIGITS = 6  # 10**6 distinct instructions; sums range 0..54


class TaskSizeError(OtkdError, ValueError):
    """More examples asked for (prepare.n_examples) than the task has distinct instructions to give."""


_SPLIT_RE = re.compile(r"^(\d+)\s*\+\s*(\d+)")


def generate_examples(n: int, seed: int, n_digits: int = N_DIGITS) -> list[dict]:
    """`n` records with distinct instructions, deterministic for `seed`.

    Each is {"instruction": "385102", "input": "", "output": MARKER + "19"}. Take train and test from ONE
    call (e.g. the first n_train and the rest) so that they cannot share an instruction. Fewer `n_digits`
    make the task easier (tests use 4 for a pipeline that learns in a minute).
    """
    limit = 10 ** n_digits
    if not 0 <= n <= limit // 2:  # rejection sampling below stays cheap while at most half are taken
        raise TaskSizeError(f"n={n} examples must be between 0 and {limit // 2} for {n_digits}-digit instructions "
                            "(prepare.n_examples, prepare.n_digits)")
    rng = random.Random(seed)
    seen: set[str] = set()
    out = []
    while len(out) < n:
        digits = "".join(rng.choice("0123456789") for _ in range(n_digits))
        if digits in seen:
            continue
        seen.add(digits)
        out.append({"instruction": digits, "input": "", "output": f"{MARKER}{sum(map(int, digits))}"})
    return out


def _after_marker(text: str) -> str | None:
    """What follows the marker when the text starts with it (after leading whitespace), else None."""
    text = text.lstrip()
    return text[len(MARKER):] if text.startswith(MARKER) else None


def is_correct(record: dict, generated: str) -> bool:
    """Whether `generated` (the model's text after the prompt, with EOS and what follows removed) is right.

    Strictness, chosen so that the score measures the skill and nothing else:
    - leading whitespace is ignored; the response must then START with the marker (the format is learnt
      within a few dozen steps, so requiring it never hides the skill);
    - the answer is the maximal run of digits right after the marker and must equal the reference number
      EXACTLY as a string ("19"; "190" or "019" are wrong, no prefix matching);
    - anything after the first non-digit that follows the answer is ignored, so trailing junk when
      generation hit max_new_tokens without an EOS does not turn a right answer wrong.
    The user's real records in the user's original design notes ("2631" -> MARKER + "2164 + 467") are also judged:
    when the reference is an "a + b" split, ANY split whose parts sum to the instruction's number is correct
    (that task has many valid answers), so the same function can score the real data.
    """
    got, ref = _after_marker(generated), _after_marker(record["output"])
    if got is None or ref is None:
        return False
    if _SPLIT_RE.match(ref) and record["instruction"].strip().isdigit():
        m = _SPLIT_RE.match(got)
        return m is not None and int(m.group(1)) + int(m.group(2)) == int(record["instruction"].strip())
    got_num, ref_num = re.match(r"\d*", got).group(0), re.match(r"\d*", ref).group(0)
    return got_num != "" and got_num == ref_num
