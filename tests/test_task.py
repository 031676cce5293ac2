"""The answer checker behind the headline accuracy (pipeline/data/task.py is_correct), case by case."""

import pytest

from pipeline.data.task import MARKER, TaskSizeError, generate_examples, is_correct, is_valid_split
from pipeline.evaluation.generate import checker

DIGIT_SUM = {"instruction": "385102", "input": "", "output": MARKER + "19"}
SPLIT = {"instruction": "2631", "input": "", "output": MARKER + "2164 + 467"}  # a split record as data.path holds it


@pytest.mark.parametrize(
    "generated",
    [
        MARKER + "19",
        "  \n\t" + MARKER + "19",  # leading whitespace is ignored
        MARKER + "19\n### Instruction:\n123",  # what follows the answer's digits is ignored (no EOS generated)
        MARKER + "19 + 0",
        MARKER + "19.",
    ],
)
def test_right_answers(generated):
    assert is_correct(DIGIT_SUM, generated)


@pytest.mark.parametrize(
    "generated",
    [
        MARKER + "18",  # wrong number
        MARKER + "190",  # exact digits: no prefix matching
        MARKER + "1",
        MARKER + "019",  # no leading zeros
        MARKER + " 19",  # the digits must follow the marker directly
        MARKER,  # no answer
        MARKER + "nineteen",
        "19",  # no marker
        "the answer: " + MARKER + "19",  # the response must start with the marker
        MARKER[:-1] + "19",  # a truncated marker
        "",
    ],
)
def test_wrong_or_malformed_answers(generated):
    assert not is_correct(DIGIT_SUM, generated)


def test_a_reference_without_the_marker_judges_everything_wrong():
    record = {**DIGIT_SUM, "output": "19"}
    assert not is_correct(record, "19") and not is_correct(record, MARKER + "19")


@pytest.mark.parametrize(
    "generated, right",
    [
        (MARKER + "2164 + 467", True),  # the reference split
        (MARKER + "2000 + 631", True),  # any split that sums to the instruction's number
        (MARKER + "1 + 2630", True),
        (MARKER + "2630 + 1", True),
        (MARKER + "2164+467", True),  # spaces around "+" are optional
        (MARKER + "2164  +  467", True),
        ("  \n" + MARKER + "2164 + 467", True),  # leading whitespace is ignored
        (MARKER + "2164 + 467\n### Instruction:", True),  # what follows b's digits is ignored (no EOS generated)
        (MARKER + "2164 + 467 and more", True),
        (MARKER + "2000 + 630", False),  # sums to 2630
        (MARKER + "2000 + 632", False),  # sums to 2632
        (MARKER + "2631 + 0", False),  # both parts positive
        (MARKER + "0 + 2631", False),
        (MARKER + "02164 + 467", False),  # no leading zeros
        (MARKER + "2164 + 0467", False),
        (MARKER + "-1 + 2632", False),  # malformed
        (MARKER + "2164 - 467", False),
        (MARKER + "2164 +", False),
        (MARKER + "2164 467", False),
        (MARKER + "2631", False),  # not a split
        (MARKER + " 2164 + 467", False),  # the answer follows the marker directly
        (MARKER + "2164\n+ 467", False),  # no line break inside the answer
        ("2164 + 467", False),  # no marker
        (MARKER[:-1] + "2164 + 467", False),  # a truncated marker
        ("", False),
    ],
)
def test_split_tasks_accept_any_valid_split(generated, right):
    assert is_correct(SPLIT, generated) is right
    assert is_valid_split(SPLIT["instruction"], generated) is right  # data.metric: split, for real data
    assert checker("split")(SPLIT, generated) is right


def test_a_split_instruction_that_is_not_a_number_is_never_right():
    assert not is_valid_split("twenty", MARKER + "10 + 10")
    assert not is_valid_split(" 20 ", MARKER + "10 + 9") and is_valid_split(" 20 ", MARKER + "10 + 10")


def test_generated_split_records_are_valid_distinct_and_spread():
    """Every record's own output is valid; the same N gets many different splits; no borrow in any digit."""
    records = generate_examples(3000, seed=0, n_digits=4, task="split")
    assert all(is_correct(r, r["output"]) for r in records)
    assert len({r["instruction"] + r["output"] for r in records}) == 3000
    by_n = {}
    for r in records:
        n = r["instruction"]
        a, b = r["output"][len(MARKER) :].split(" + ")
        assert len(n) == len(a) == len(b) == 4 and n[0] >= "2"
        assert all(int(x) + int(y) == int(d) for x, y, d in zip(a, b, n))  # digit by digit: no carry
        by_n.setdefault(n, set()).add(a)
    assert max(len(v) for v in by_n.values()) > 1  # the labels of one prompt disagree: soft targets matter
    firsts = {r["output"][len(MARKER)] for r in records if r["instruction"][0] == "9"}
    assert firsts == set("12345678")  # a's first digit takes every allowed value


def test_task_size_is_checked():
    with pytest.raises(TaskSizeError, match="prepare.n_examples"):
        generate_examples(10**6, seed=0, n_digits=2, task="split")
    with pytest.raises(TaskSizeError, match="prepare.task"):
        generate_examples(10, seed=0, task="sum")


def test_every_generated_record_accepts_its_own_output_and_no_other_sum():
    for r in generate_examples(200, seed=0, n_digits=6, task="digit_sum"):
        total = sum(map(int, r["instruction"]))
        assert r["output"] == f"{MARKER}{total}"
        assert is_correct(r, r["output"])
        assert not any(is_correct(r, f"{MARKER}{wrong}") for wrong in (total - 1, total + 1, 10 * total + 1))
