"""The embedded default's synthetic tasks, as the JSONL records data.path reads, and their answer checkers.

- "split" (the default): split the number N into two positive parts ("8604" -> "王大丫丫的回答是--->5302 + 3302").
  Every split is right; the training labels are random splits, so
  the teacher keeps a spread distribution over the digits of a and its soft targets say "all of these are
  right", which one sampled label cannot.
- "digit_sum": the digit sum of an n-digit string ("385102" -> "王大丫丫的回答是--->19"); one right answer, so the
  teacher is almost one-hot on every answer token.
- "hmm" (the positive control): a stochastic language whose next-word distribution is known exactly. A fixed random
  hidden Markov source (HMM_STATES states, each emitting its own few of HMM_WORDS two-letter words) writes a prompt of
  HMM_PROMPT words and a continuation of HMM_ANSWER words ("mo ta ri" -> "王大丫丫的回答是---> ke ta du mo ke ri"). A
  label is one sample of the continuation, a teacher's soft target the whole distribution, so distillation must beat
  CE here; `answer_distributions` gives the exact conditional distribution of every answer word (forward filtering),
  the ground truth of KL(true || model).

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

import numpy as np

from cache.errors import OtkdError

# Every output starts with this fixed response prefix, the answer right after it: the checkers read the answer there,
# so real records of this format are scored by the same code (data.metric split)
MARKER = "王大丫丫的回答是--->"
TASKS = ("digit_sum", "split", "hmm")

# The positive control's source: fixed by these constants (not by the pipeline's seed, which only draws records), so
# every seed of an ablation samples the same language.
HMM_SEED, HMM_STATES, HMM_SUCCESSORS, HMM_PROMPT, HMM_ANSWER = 2026, 6, 2, 3, 6
HMM_WORDS = tuple(c + v for c in "bdgkmnprst" for v in "aeiou")[:24]  # 24 two-letter words, one token each


class TaskSizeError(OtkdError, ValueError):
    """More examples asked for (prepare.n_examples) than the task has distinct records to give."""


def hmm_source(seed: int = HMM_SEED) -> tuple[np.ndarray, np.ndarray]:
    """(transition (H, H), emission (H, W)) of the positive control's source, float64 rows summing to 1.

    Each state owns HMM_EMITS of the words (Dirichlet(0.5) weights over them) and moves to one of HMM_SUCCESSORS
    states (Dirichlet(1) weights): next-word distributions of ~1.5 nats that a label samples once and a soft target
    gives whole, and continuations that the source cannot write (probability 0: the task's accuracy)."""
    rng = np.random.default_rng(seed)
    H, W = HMM_STATES, len(HMM_WORDS)
    owner = rng.permutation(W).reshape(H, W // H)  # state h emits the words owner[h] only
    emit, trans = np.zeros((H, W)), np.zeros((H, H))
    for h in range(H):
        emit[h, owner[h]] = rng.dirichlet(np.full(W // H, 0.5))
        trans[h, rng.choice(H, size=HMM_SUCCESSORS, replace=False)] = rng.dirichlet(np.ones(HMM_SUCCESSORS))
    return trans, emit


def answer_distributions(prompt: list[str], answer: list[str], source=None) -> np.ndarray:
    """(len(answer), W) float64: row t is the source's exact p(answer word t = w | prompt, answer[:t]), columns in
    HMM_WORDS order. Forward filtering from a uniform initial state: the belief over the hidden state is updated by
    each observed word (emission, then normalised), and the next word's distribution is belief @ trans @ emit."""
    trans, emit = hmm_source() if source is None else source
    index = {w: i for i, w in enumerate(HMM_WORDS)}
    belief = np.full(trans.shape[0], 1.0 / trans.shape[0])  # p(state of the first word)
    out = []
    for t, word in enumerate([*prompt, *answer]):
        if t >= len(prompt):
            out.append(belief @ emit)  # (W,) p(this word | everything before it)
        belief = belief * emit[:, index[word]]  # p(state, words so far), unnormalised
        if belief.sum() <= 0:
            raise ValueError(f"the word sequence {[*prompt, *answer][: t + 1]} has probability 0 under the source")
        belief = (belief / belief.sum()) @ trans  # p(state of the next word | words so far)
    return np.array(out).reshape(len(answer), emit.shape[1])


def hmm_words(record: dict) -> tuple[list[str], list[str]] | None:
    """(prompt words, answer words) of a positive-control record, or None for a record of another task."""
    answer = _after_marker(record["output"])
    prompt = record["instruction"].split()
    if answer is None or not prompt or any(w not in HMM_WORDS for w in prompt):
        return None
    words = answer.split()
    return (prompt, words) if words and all(w in HMM_WORDS for w in words) else None


def word_token_ids(tokenizer) -> list[int] | None:
    """The token id of each answer word " w" (HMM_WORDS order), or None if a word is not one token of `tokenizer`."""
    ids = [tokenizer.encode(" " + w, add_special_tokens=False) for w in HMM_WORDS]
    return [i[0] for i in ids] if all(len(i) == 1 for i in ids) else None


def _draw_hmm(rng: random.Random, source) -> dict:
    trans, emit = source
    H, W = emit.shape
    h = rng.randrange(H)
    words = []
    for _ in range(HMM_PROMPT + HMM_ANSWER):
        words.append(HMM_WORDS[rng.choices(range(W), weights=emit[h].tolist())[0]])
        h = rng.choices(range(H), weights=trans[h].tolist())[0]
    prompt, answer = words[:HMM_PROMPT], words[HMM_PROMPT:]
    # the space after the marker: every answer word is then the pre-token " w", one token of the tokenizer
    return {"instruction": " ".join(prompt), "input": "", "output": f"{MARKER} {' '.join(answer)}"}


def _n_distinct(task: str, n_digits: int) -> int:
    if task == "hmm":
        return len(HMM_WORDS) ** (HMM_PROMPT + HMM_ANSWER)  # an upper bound: plenty for any n asked
    if task == "digit_sum":
        return 10**n_digits
    return 36 * 55 ** (n_digits - 1)  # split: sum over N's leading digit (n - 1 choices) and the others (n + 1)


def _draw(task: str, n_digits: int, rng: random.Random, source=None) -> dict:
    if task == "hmm":
        return _draw_hmm(rng, source)
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
    hmm: {"instruction": "mo ta ri", "input": "", "output": MARKER + " ke ta du mo ke ri"}, sampled from
    `hmm_source()` (n_digits is not used); distinct records, prompts repeat.
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
    source = hmm_source() if task == "hmm" else None
    seen: set[str] = set()
    out = []
    while len(out) < n:
        rec = _draw(task, n_digits, rng, source)
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
    is right (`is_valid_split`), so the same function scores real records of that format. Otherwise the
    answer is the maximal run of digits right after the marker and must equal the reference's EXACTLY as a
    string ("19"; "190" or "019" are wrong); leading whitespace is ignored, the response must start with the
    marker (the format is learnt within a few dozen steps, so requiring it never hides the skill), and anything
    after the answer's digits is ignored (trailing junk when generation hit max_new_tokens without an EOS).
    """
    got, ref = _after_marker(generated), _after_marker(record["output"])
    if got is None or ref is None:
        return False
    words = hmm_words(record)
    if words is not None:  # the positive control: any continuation the source can write is right
        return is_valid_continuation(words[0], got)
    if _SPLIT_RE.match(ref) and record["instruction"].strip().isdigit():
        return is_valid_split(record["instruction"], generated)
    got_num, ref_num = re.match(r"\d*", got).group(0), re.match(r"\d*", ref).group(0)
    return got_num != "" and got_num == ref_num


def is_valid_continuation(prompt: list[str], generated: str) -> bool:
    """Whether `generated` (after the marker) is HMM_ANSWER words the source writes after `prompt` with probability
    > 0; what follows them (junk when generation hit max_new_tokens) is ignored, as for the other tasks."""
    words = generated.split()[:HMM_ANSWER]
    if len(words) < HMM_ANSWER or any(w not in HMM_WORDS for w in words):
        return False
    try:
        answer_distributions(prompt, words)  # raises on a word the source cannot write there
    except ValueError:
        return False
    return True
