"""The embedded default's synthetic tasks, in the user's record format, and their answer checkers.

- "split" (the default): split the number N into two positive parts ("8604" -> "王大丫丫的回答是--->5302 + 3302"),
  the task of the user's original design notes. Every split is right; the training labels are random splits, so
  the teacher keeps a spread distribution over the digits of a and its soft targets say "all of these are
  right", which one sampled label cannot.
- "digit_sum": the digit sum of an n-digit string ("385102" -> "王大丫丫的回答是--->19"); one right answer, so the
  teacher is almost one-hot on every answer token.

How the split labels are drawn, and why (measured on CPU, 4 x 128 Qwen2 from scratch, ~4 minutes of training):
uniformly random splits a in [1, N - 1] need subtraction with borrow chains, which a tiny model learns late (2.2%
valid on 3-digit N, 0.7% on 4-digit). Drawing each digit of a below N's digit (n_i = a_i + b_i, no borrow, a and b
as long as N, so N's leading digit is >= 2) keeps every answer valid and the choice free -- a_1 in 1..n_1 - 1,
a_i in 0..n_i -- while the rule that produces b is position-aligned: the teacher reaches 100% on 4-digit N. The
checker does not care how a split was made: any a + b = N is right.
Why digit sum: the answer depends on all the digits at once, and a teacher that is unsure puts its mass on
neighbouring sums ("19" vs "18"/"20"). Multi-digit addition is too hard at this size, digit reversal too easy.
"""

import random
import re

from cache.errors import OtkdError

MARKER = "王大丫丫的回答是--->"  # the response prefix of the records in the user's original design notes
TASKS = ("digit_sum", "split")


class TaskSizeError(OtkdError, ValueError):
    """More examples asked for (prepare.n_examples) than the task has distinct records to give."""


def _n_distinct(task: str, n_digits: int) -> int:
    if task == "digit_sum":
        return 10**n_digits
    return 36 * 55 ** (n_digits - 1)  # split: sum over N's leading digit (n - 1 choices) and the others (n + 1)


def _draw(task: str, n_digits: int, rng: random.Random) -> dict:
    if task == "digit_sum":
        digits = "".join(rng.choice("0123456789") for _ in range(n_digits))
        return {"instruction": digits, "input": "", "output": f"{MARKER}{sum(map(int, digits))}"}
    n = [rng.randint(2, 9)] + [rng.randint(0, 9) for _ in range(n_digits - 1)]  # N's digits, leading >= 2
    a = [rng.randint(1, n[0] - 1)] + [rng.randint(0, d) for d in n[1:]]  # a_i <= n_i: no borrow anywhere
    b = [x - y for x, y in zip(n, a)]
    number, a_str, b_str = ("".join(map(str, x)) for x in (n, a, b))
    return {"instruction": number, "input": "", "output": f"{MARKER}{a_str} + {b_str}"}


def generate_examples(n: int, seed: int, n_digits: int = 6, task: str = "digit_sum") -> list[dict]:
    """`n` distinct records of `task`, deterministic for `seed`.

    digit_sum: {"instruction": "385102", "input": "", "output": MARKER + "19"}, every instruction distinct.
    split: {"instruction": "8604", "input": "", "output": MARKER + "5302 + 3302"}: N has n_digits digits (the
    leading one >= 2) and the split is drawn digit by digit without borrow (see the module docstring); the same N
    comes back with other splits (the records, not the prompts, are distinct), and the data splits keep all
    records of one prompt together (records.split_of).
    """
    if task not in TASKS:
        raise TaskSizeError(f"prepare.task must be one of {', '.join(TASKS)}, got {task!r}")
    limit = _n_distinct(task, n_digits)
    if not 0 <= n <= limit // 2:  # rejection sampling below stays cheap while at most half are taken
        raise TaskSizeError(
            f"n={n} examples must be between 0 and {limit // 2} for the {task} task with "
            f"{n_digits}-digit instructions (prepare.n_examples, prepare.n_digits)"
        )
    rng = random.Random(seed)
    seen: set[str] = set()
    out = []
    while len(out) < n:
        rec = _draw(task, n_digits, rng)
        key = rec["instruction"] + rec["output"]
        if key not in seen:
            seen.add(key)
            out.append(rec)
    return out


def _after_marker(text: str) -> str | None:
    """What follows the marker when the text starts with it (after leading whitespace), else None."""
    text = text.lstrip()
    return text[len(MARKER) :] if text.startswith(MARKER) else None


_SPLIT_RE = re.compile(r"(\d+) *\+ *(\d+)")


def is_valid_split(instruction: str, generated: str) -> bool:
    """Whether `generated` is MARKER + "a + b" with a + b = int(instruction), a and b positive, no leading zeros.

    Leading whitespace before the marker is ignored, the answer must follow the marker directly, spaces around
    "+" are optional, and what follows b's last digit (a newline, junk when generation hit max_new_tokens) is
    ignored, as for the digit sum.
    """
    got, number = _after_marker(generated), instruction.strip()
    if got is None or not number.isdigit():
        return False
    m = _SPLIT_RE.match(got)
    if m is None or any(p.startswith("0") for p in m.groups()):  # "0" itself is not positive either
        return False
    return int(m.group(1)) + int(m.group(2)) == int(number)


def is_correct(record: dict, generated: str) -> bool:
    """Whether `generated` (the model's text after the prompt, with EOS and what follows removed) is right.

    The rule follows the reference: when it is a split ("a + b") of the instruction's number, ANY valid split
    is right (`is_valid_split`), so the same function scores the user's real data of that format. Otherwise the
    answer is the maximal run of digits right after the marker and must equal the reference's EXACTLY as a
    string ("19"; "190" or "019" are wrong); leading whitespace is ignored, the response must start with the
    marker (the format is learnt within a few dozen steps, so requiring it never hides the skill), and anything
    after the answer's digits is ignored (trailing junk when generation hit max_new_tokens without an EOS).
    """
    got, ref = _after_marker(generated), _after_marker(record["output"])
    if got is None or ref is None:
        return False
    if _SPLIT_RE.match(ref) and record["instruction"].strip().isdigit():
        return is_valid_split(record["instruction"], generated)
    got_num, ref_num = re.match(r"\d*", got).group(0), re.match(r"\d*", ref).group(0)
    return got_num != "" and got_num == ref_num
