"""The benchmarks' official metrics, as plain functions of predictions and ground truth.

Scores are fractions in [0, 1] unless a name says otherwise (MME's scores are points, up to 200 per subtask).
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Sequence

from server.evaluation.normalize import normalize_short, normalize_vqa, yes_no_mme, yes_no_pope

LETTERS = "ABCDEFGHIJ"

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                  "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


# ---- VQAv2 / TextVQA --------------------------------------------------------------------------------------
def vqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """VQA accuracy: min(#humans who gave the answer / 3, 1), averaged over the leave-one-out subsets of the
    (usually 10) human answers, after the official normalization of both sides.

    With 10 answers of which k match: (k * min((k-1)/3, 1) + (10-k) * min(k/3, 1)) / 10, e.g. k=2 -> 0.6."""
    if not human_answers:
        raise ValueError("VQA accuracy needs at least one human answer")
    pred = normalize_vqa(prediction)
    matches = [normalize_vqa(a) == pred for a in human_answers]
    total = sum(matches)
    return sum(min((total - m) / 3, 1.0) for m in matches) / len(matches)


# ---- GQA / Shapes -----------------------------------------------------------------------------------------
def exact_match(prediction: str, answer: str, normalize=normalize_short) -> bool:
    return normalize(prediction) == normalize(answer)


# ---- POPE -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BinaryScores:
    accuracy: float
    precision: float
    recall: float
    f1: float
    yes_ratio: float
    n: int

    def as_dict(self) -> dict[str, float]:
        return {"accuracy": self.accuracy, "precision": self.precision, "recall": self.recall, "f1": self.f1,
                "yes_ratio": self.yes_ratio, "n": self.n}


def binary_scores(predicted_yes: Iterable[bool], label_yes: Iterable[bool]) -> BinaryScores:
    """Accuracy, precision, recall and F1 with "yes" as the positive class, and the share of "yes" answers.
    A ratio with a zero denominator is 0."""
    tp = fp = tn = fn = 0
    for p, t in zip(predicted_yes, label_yes, strict=True):
        tp += p and t
        fp += p and not t
        tn += not p and not t
        fn += not p and t
    n = tp + fp + tn + fn
    div = lambda a, b: a / b if b else 0.0  # noqa: E731
    precision, recall = div(tp, tp + fp), div(tp, tp + fn)
    return BinaryScores(div(tp + tn, n), precision, recall, div(2 * precision * recall, precision + recall),
                        div(tp + fp, n), n)


def pope_scores(predictions: Sequence[str], labels: Sequence[str]) -> BinaryScores:
    """POPE: answers reduced to yes/no by POPE's rule, labels "yes"/"no"."""
    return binary_scores((yes_no_pope(p) == "yes" for p in predictions), (lb.strip().lower() == "yes" for lb in labels))


# ---- MME --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MMEScores:
    accuracy: float       # share of questions answered right
    accuracy_plus: float  # share of images with both questions right
    score: float          # 100 * (accuracy + accuracy_plus), at most 200

    def as_dict(self) -> dict[str, float]:
        return {"accuracy": self.accuracy, "accuracy_plus": self.accuracy_plus, "score": self.score}


def mme_subtask(rows: Iterable[tuple[str, str, str]]) -> MMEScores:
    """One MME subtask from (image, prediction, "yes"/"no") rows; acc+ counts an image only if every one of its
    questions (two in MME) is right."""
    right_by_image: dict[str, list[bool]] = defaultdict(list)
    for image, pred, answer in rows:
        right_by_image[image].append(yes_no_mme(pred) == answer.strip().lower())
    flat = [r for rs in right_by_image.values() for r in rs]
    if not flat:
        return MMEScores(0.0, 0.0, 0.0)
    acc = sum(flat) / len(flat)
    acc_plus = sum(all(rs) for rs in right_by_image.values()) / len(right_by_image)
    return MMEScores(acc, acc_plus, 100 * (acc + acc_plus))


def mme_totals(subtasks: dict[str, MMEScores]) -> dict[str, float]:
    """Perception = sum of the 10 perception subtask scores (max 2000), cognition = sum of the 4 cognition ones
    (max 800). Subtasks missing from the data add 0."""
    return {"perception": sum(subtasks[s].score for s in MME_PERCEPTION if s in subtasks),
            "cognition": sum(subtasks[s].score for s in MME_COGNITION if s in subtasks)}


# ---- multiple choice (ScienceQA, MMBench) -----------------------------------------------------------------
_STANDALONE_LETTER = re.compile(r"(?<![A-Za-z0-9'])([A-J])(?![A-Za-z0-9'])")


def _words(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def extract_choice(answer: str, options: Sequence[str]) -> str | None:
    """The letter a free-text answer picks among ``options`` (A, B, ... in order), by rule, or None.

    1. the answer is exactly one option's text (ignoring case, punctuation, spacing): that option;
    2. the first standalone capital letter among the options' letters ("B", "(B) cat", "The answer is B.");
       an "A" followed by a lower-case word is read as the article ("A red circle");
    3. exactly one option's text appears in the answer as whole words: that option (if several do, the longest,
       when it contains all the others, e.g. "dark red" over "red")."""
    letters = LETTERS[:len(options)]
    texts = [_words(o) for o in options]
    said = _words(answer)
    exact = [i for i, t in enumerate(texts) if t and t == said]
    if len(exact) == 1:
        return letters[exact[0]]
    for m in _STANDALONE_LETTER.finditer(answer):
        letter = m.group(1)
        if letter not in letters:
            continue
        if letter == "A" and re.match(r" +[a-z]", answer[m.end():]):
            continue
        return letter
    padded = f" {said} "
    found = [i for i, t in enumerate(texts) if t and f" {t} " in padded]
    if len(found) == 1:
        return letters[found[0]]
    if found:
        longest = max(found, key=lambda i: len(texts[i]))
        if all(f" {texts[i]} " in f" {texts[longest]} " for i in found):
            return letters[longest]
    return None


def rotations(options: Sequence[str]) -> list[list[str]]:
    """CircularEval's option orders: the original and each circular shift (n options -> n orders)."""
    opts = list(options)
    return [opts[k:] + opts[:k] for k in range(len(opts))]


def rotated_answer(answer_letter: str, n_options: int, shift: int) -> str:
    """Where the right option lands after shifting the options left by ``shift``."""
    return LETTERS[(LETTERS.index(answer_letter) - shift) % n_options]


def circular_correct(rotation_correct: Sequence[bool]) -> bool:
    """CircularEval: a question counts only if it is answered right in every rotation."""
    return bool(rotation_correct) and all(rotation_correct)


# ---- MM-Vet -----------------------------------------------------------------------------------------------
_NUMBER = re.compile(r"(?<![\d.])(?:\d+(?:\.\d*)?|\.\d+)")


def parse_judge_score(reply: str) -> float | None:
    """The first number of a grader's reply, if it lies in [0, 1] ("0.7", "Score: 1.0", "**0.4**")."""
    for m in _NUMBER.finditer(reply):
        value = float(m.group(0))
        if 0.0 <= value <= 1.0:
            return value
    return None


def mean(values: Iterable[float]) -> float:
    vals = list(values)
    return sum(vals) / len(vals) if vals else 0.0
