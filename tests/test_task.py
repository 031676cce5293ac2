"""The answer checker behind the headline accuracy (pipeline/data/task.py is_correct), case by case."""
import pytest

from pipeline.data.task import MARKER, generate_examples, is_correct

DIGIT_SUM = {"instruction": "385102", "input": "", "output": MARKER + "19"}
SPLIT = {"instruction": "2631", "input": "", "output": MARKER + "2164 + 467"}  # the user's own record format


@pytest.mark.parametrize("generated", [
    MARKER + "19",
    "  \n\t" + MARKER + "19",  # leading whitespace is ignored
    MARKER + "19\n### Instruction:\n123",  # what follows the answer's digits is ignored (no EOS generated)
    MARKER + "19 + 0",
    MARKER + "19.",
])
def test_right_answers(generated):
    assert is_correct(DIGIT_SUM, generated)


@pytest.mark.parametrize("generated", [
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
])
def test_wrong_or_malformed_answers(generated):
    assert not is_correct(DIGIT_SUM, generated)


def test_a_reference_without_the_marker_judges_everything_wrong():
    record = {**DIGIT_SUM, "output": "19"}
    assert not is_correct(record, "19") and not is_correct(record, MARKER + "19")


@pytest.mark.parametrize("generated, right", [
    (MARKER + "2164 + 467", True),  # the reference split
    (MARKER + "2000 + 631", True),  # any split that sums to the instruction's number
    (MARKER + "2631+0", True),  # spaces around "+" are optional
    ("  " + MARKER + "1 + 2630 and more", True),
    (MARKER + "2000 + 630", False),  # sums to 2630
    (MARKER + "2631", False),  # not a split
    (MARKER + " 2164 + 467", False),
    ("2164 + 467", False),
])
def test_split_tasks_accept_any_correct_split(generated, right):
    assert is_correct(SPLIT, generated) is right


def test_every_generated_record_accepts_its_own_output_and_no_other_sum():
    for r in generate_examples(200, seed=0):
        total = sum(map(int, r["instruction"]))
        assert r["output"] == f"{MARKER}{total}"
        assert is_correct(r, r["output"])
        assert not any(is_correct(r, f"{MARKER}{wrong}") for wrong in (total - 1, total + 1, 10 * total + 1))
