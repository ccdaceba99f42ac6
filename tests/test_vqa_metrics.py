"""VQA v2 normalisation, exact match and soft accuracy on hand-made cases (lifelong_moe/evaluation/vqa_metrics.py)."""
import pytest

from lifelong_moe.evaluation.vqa_metrics import CONTRACTIONS, exact_match, normalize_answer, vqa_accuracy, vqa_scores


@pytest.mark.parametrize("raw, norm", [
    ("Yes", "yes"),
    ("  Two dogs!\n", "2 dogs"),           # lower case, number word, "!" next to nothing -> space, stripped
    ("the Red.", "red"),                     # article dropped, final period removed
    ("an apple", "apple"),
    ("none", "0"),
    ("ten", "10"),
    ("eleven", "eleven"),                    # only zero..ten (and none) become digits
    ("1.5", "1.5"),                          # a period before a digit stays
    ("3.", "3"),
    ("10,000", "10000"),                     # a digit,digit comma anywhere: marks are deleted, not spaced
    ("red,blue", "red blue"),                # a mark touching no space becomes a space
    ("red, blue", "red blue"),               # a mark touching a space is deleted
    ("t-shirt", "t shirt"),
    ("dont know", "don't know"),             # contractions get their apostrophe back
    ("couldnt've", "couldn't've"),
    ("couldn'tve", "couldn't've"),
    ("Im", "im"),                            # the official table's capitalised "Im" never matches lower case
    ("what is a b", "what is b"),
    ("tab\there", "tab here"),
    ("?", ""),
])
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


def test_contraction_table():
    assert CONTRACTIONS["dont"] == "don't" and CONTRACTIONS["ow's'at"] == "'ow's'at" and CONTRACTIONS["twas"] == "'twas"
    assert CONTRACTIONS["y'allll"] == "y'all'll" and CONTRACTIONS["somebody'd"] == "somebodyd"
    assert "im" not in CONTRACTIONS and "shes" not in CONTRACTIONS
    assert len(CONTRACTIONS) == 114  # the official entries that can match lower-case text, minus 2 identities


def test_exact_match_uses_the_target():
    assert exact_match("Two", "2") == 1.0
    assert exact_match("the dog", "dog") == 1.0
    assert exact_match("dogs", "dog") == 0.0
    assert exact_match("cat", ["cat", "dog"]) == 1.0   # a sequence: its first element is the target
    assert exact_match("dog", ["cat", "dog"]) == 0.0
    with pytest.raises(ValueError):
        exact_match("x", [])


@pytest.mark.parametrize("m, acc", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_ten_answers(m, acc):
    answers = ["red"] * m + ["blue"] * (10 - m)
    assert vqa_accuracy("Red", answers) == pytest.approx(acc)


def test_vqa_accuracy_official_leave_one_out_by_hand():
    # 5 answers, 2 match: leaving out a match leaves 1 (1/3, twice), leaving out another leaves 2 (2/3, thrice)
    assert vqa_accuracy("2", ["two", "2 ", "3", "4", "5"]) == pytest.approx((2 * (1 / 3) + 3 * (2 / 3)) / 5)
    # normalised answers match each other: "a cat", "Cat", "cat." are all "cat"
    assert vqa_accuracy("cat", ["a cat", "Cat", "cat.", "dog", "dog", "dog", "dog", "dog", "dog", "dog"]) == \
        pytest.approx(0.9)


def test_vqa_accuracy_single_answer_is_exact_match():
    assert vqa_accuracy("Four", "4") == 1.0 == vqa_accuracy("four", ["four"])
    assert vqa_accuracy("three", ["four"]) == 0.0


def test_vqa_scores_of_a_record():
    assert vqa_scores("yes", "yes") == {"exact_match": 1.0, "vqa_accuracy": 1.0}
    # the target (top label) differs from what one human said
    assert vqa_scores("white", "gray", ["gray"] * 8 + ["white"] * 2) == {"exact_match": 0.0,
                                                                       "vqa_accuracy": pytest.approx(0.6)}
