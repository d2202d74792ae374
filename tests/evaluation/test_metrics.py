"""The metrics on hand-made predictions; every expected number is worked out in the comments."""

import pytest

from server.evaluation import metrics as M
from server.evaluation.normalize import normalize_short, normalize_vqa, yes_no_mme, yes_no_pope


@pytest.mark.parametrize("raw,normalized", [
    ("Two", "2"), ("two dogs", "2 dogs"), ("none", "0"), ("ten", "10"),   # number words
    ("a dog", "dog"), ("The Dog", "dog"), ("an apple", "apple"),           # articles, case
    ("yes.", "yes"), ("Yes!", "yes"), (" yes\n", "yes"),                   # trailing punctuation, spaces
    ("1.5", "1.5"), ("3.", "3"),                                           # a period before a digit stays
    ("10,000", "10000"), ("1,000 people", "1000 people"),                  # comma between digits: deleted
    ("red, white", "red white"), ("red,white", "red white"),               # other commas: space or deleted
    ("t-shirt", "t shirt"), ("t - shirt", "t shirt"), ("(left)", "left"),  # hyphen/brackets
    ("dont", "don't"), ("isnt", "isn't"), ("whats up", "what's up"),       # contractions fixed
    ("it's", "it's"), ("its", "its"),                                      # apostrophes kept: two words
])
def test_vqa_normalization(raw, normalized):
    assert normalize_vqa(raw) == normalized


def test_vqa_accuracy_averages_over_the_ten_leave_one_out_subsets():
    # k of 10 humans match: the k matching subsets see k-1 matches, the 10-k others see k.
    assert M.vqa_accuracy("dog", ["dog"] * 10) == 1.0
    assert M.vqa_accuracy("cat", ["dog"] * 10) == 0.0
    assert M.vqa_accuracy("dog", ["dog"] + ["cat"] * 9) == pytest.approx(9 * (1 / 3) / 10)            # 0.3
    assert M.vqa_accuracy("dog", ["dog"] * 2 + ["cat"] * 8) == pytest.approx((2 / 3 + 8 * 2 / 3) / 10)  # 0.6
    assert M.vqa_accuracy("dog", ["dog"] * 3 + ["cat"] * 7) == pytest.approx((3 * 2 / 3 + 7) / 10)     # 0.9
    assert M.vqa_accuracy("dog", ["dog"] * 4 + ["cat"] * 6) == 1.0  # every subset keeps >= 3 matches
    assert M.vqa_accuracy("dog", ["dog"] * 2 + ["cat"] * 8) == pytest.approx(0.6)


def test_vqa_accuracy_compares_normalized_answers():
    assert M.vqa_accuracy("Two", ["2"] * 10) == 1.0
    assert M.vqa_accuracy("2", ["two"] * 2 + ["3"] * 8) == pytest.approx(0.6)
    assert M.vqa_accuracy("A dog.", ["dog"] * 10) == 1.0
    assert M.vqa_accuracy("yes.", ["yes"] * 10) == 1.0
    assert M.vqa_accuracy("10,000", ["10000"] * 10) == 1.0
    assert M.vqa_accuracy("T-shirt", ["t shirt"] * 10) == 1.0
    assert M.vqa_accuracy("tshirt", ["t-shirt"] * 10) == 0.0
    assert M.vqa_accuracy("its", ["it's"] * 10) == 0.0
    assert M.vqa_accuracy("dont know", ["don't know"] * 10) == 1.0


def test_short_normalization_and_exact_match():
    assert normalize_short(" Red. ") == "red" and normalize_short("Left  side") == "left side"
    assert M.exact_match("Yes.", "yes") and not M.exact_match("a dog", "dog")


def test_pope_yes_no_rule():
    assert [yes_no_pope(a) for a in ["Yes", "No", "no.", "Yes, there is not.", "There is not a dog.",
                                     "No, there is none", "Yes. No."]] == ["yes", "no", "no", "no", "no", "no",
                                                                           "yes"]


def test_pope_precision_recall_f1_by_hand():
    preds = ["yes", "yes", "yes", "no", "no", "yes", "no", "no"]
    labels = ["yes", "yes", "no", "yes", "no", "no", "no", "no"]
    # TP=2 FP=2 FN=1 TN=3: acc 5/8, precision 2/4, recall 2/3, F1 = 2PR/(P+R) = (2/3)/(7/6) = 4/7, yes 4/8
    s = M.pope_scores(preds, labels)
    assert s.accuracy == 5 / 8 and s.precision == 0.5 and s.recall == pytest.approx(2 / 3)
    assert s.f1 == pytest.approx(4 / 7) and s.yes_ratio == 0.5 and s.n == 8
    none_said = M.pope_scores(["no", "no"], ["yes", "no"])
    assert (none_said.precision, none_said.recall, none_said.f1, none_said.accuracy) == (0.0, 0.0, 0.0, 0.5)


def test_mme_accuracy_plus_by_hand():
    assert [yes_no_mme(a) for a in ["Yes", "no", "Yes, it is.", "Not sure", "Nope", "maybe"]] == \
        ["yes", "no", "yes", "no", "no", "other"]
    rows = [("a.jpg", "Yes", "yes"), ("a.jpg", "No", "no"),       # image a: both right
            ("b.jpg", "Yes", "yes"), ("b.jpg", "Yes", "no"),      # image b: one right
            ("c.jpg", "maybe", "yes"), ("c.jpg", "no", "no")]     # image c: "maybe" is never right
    s = M.mme_subtask(rows)
    assert s.accuracy == pytest.approx(4 / 6) and s.accuracy_plus == pytest.approx(1 / 3)
    assert s.score == pytest.approx(100 * (4 / 6 + 1 / 3))  # 100 points
    totals = M.mme_totals({"existence": s, "count": M.MMEScores(1, 1, 200), "code_reasoning": M.MMEScores(.5, 0, 50),
                           "unknown": M.MMEScores(1, 1, 200)})
    assert totals["perception"] == pytest.approx(300) and totals["cognition"] == 50


@pytest.mark.parametrize("answer,letter", [
    ("B", "B"), ("B.", "B"), ("(C) blue", "C"), ("The answer is B.", "B"), ("Option D", "D"), ("b", None),
    ("blue", "C"), ("Blue.", "C"), ("It is blue", "C"), ("A", "A"), ("A. cat", "A"),
    ("A red circle", "A"),    # the article "A" is skipped; then "red" names option A by its text
    ("dark red", "D"),         # "dark red" contains "red" too: the longer option wins
    ("E", None),               # no option E
    ("green or yellow", None), ("", None),
])
def test_choice_extraction(answer, letter):
    assert M.extract_choice(answer, ["red", "cat", "blue", "dark red"]) == letter


def test_choice_extraction_prefers_an_exact_option_text_over_letters():
    assert M.extract_choice("A", ["B", "A"]) == "B"  # options that are letters themselves
    assert M.extract_choice("2", ["1", "2", "3"]) == "B"


def test_circular_eval_needs_every_rotation_right():
    options = ["cat", "dog", "bird", "fish"]
    orders = M.rotations(options)
    assert orders == [["cat", "dog", "bird", "fish"], ["dog", "bird", "fish", "cat"],
                      ["bird", "fish", "cat", "dog"], ["fish", "cat", "dog", "bird"]]
    truth = [M.rotated_answer("B", 4, k) for k in range(4)]  # "dog" is at B, A, D, C
    assert truth == ["B", "A", "D", "C"]
    steady = ["dog", "dog", "dog", "dog"]           # the model always names the dog
    flaky = ["dog", "The answer is A", "D", "B"]    # right, right, right, then B (= cat) in the 4th
    right = lambda answers: [M.extract_choice(a, o) == t for a, o, t in zip(answers, orders, truth)]  # noqa: E731
    assert right(steady) == [True] * 4 and M.circular_correct(right(steady))
    assert right(flaky) == [True, True, True, False] and not M.circular_correct(right(flaky))
    assert not M.circular_correct([])


@pytest.mark.parametrize("reply,score", [("0.7", 0.7), ("Score: 1.0", 1.0), ("**0.4**", 0.4), ("1", 1.0),
                                         ("0", 0.0), (".5", 0.5), ("10/10", None), ("no idea", None),
                                         ("Correctness: 0.3.", 0.3)])
def test_judge_score_parsing(reply, score):
    assert M.parse_judge_score(reply) == score
