"""Multiple-choice tasks (ScienceQA-IMG, MMBench with CircularEval) and MM-Vet (graded by an LLM judge)."""

from __future__ import annotations

import csv
import sys
from collections import defaultdict

from server.evaluation import metrics as M
from server.evaluation.data import (DataError, Image, ImageFinder, Item, Result, Source, TaskSpec, image_of,
                                    read_json)
from server.evaluation.tasks import _no_truth, _percent, prediction

CHOICE_SUFFIX = "\nAnswer with the option's letter from the given choices directly."
CHOICE_TEMPLATE = "{context}{question}\n{options}"


def format_options(options: list[str]) -> str:
    return "\n".join(f"{letter}. {text}" for letter, text in zip(M.LETTERS, options))


def _choice_right(records: dict[str, dict], it: Item) -> bool:
    return M.extract_choice(prediction(records, it.qid), it.meta["options"]) == it.truth


# ---- ScienceQA (questions with an image) ------------------------------------------------------------------
def load_scienceqa(src: Source) -> list[Item]:
    path = src.question_file(["problems.json"], "ScienceQA problems", "problems.json")
    problems = read_json(path)
    if not isinstance(problems, dict):
        raise DataError(f"{path}: expected ScienceQA's problems.json ({{id: {{question, choices, answer, ...}}}})")
    split = src.split or "test"
    finder = ImageFinder(src.image_roots(f"images/{split}", split, "images"))
    items = []
    for pid, p in problems.items():
        if p.get("split", split) != split or not p.get("image"):
            continue
        options = [str(c) for c in p["choices"]]
        hint = (p.get("hint") or "").strip()
        items.append(Item(str(pid), {"question": p["question"], "options": format_options(options),
                                     "context": f"Context: {hint}\n" if hint else ""},
                          image_of(finder, f"{pid}/{p['image']}"), M.LETTERS[int(p["answer"])],
                          category=p.get("subject", ""),
                          meta={"options": options, "image_name": f"{pid}/{p['image']}", "needs_image": True}))
    if not items:
        raise DataError(f"{path}: no {split!r} questions with an image")
    return items


def score_choice(items: list[Item], records: dict[str, dict]) -> Result:
    scored = [(it, float(_choice_right(records, it))) for it in items]
    unparsed = sum(M.extract_choice(prediction(records, it.qid), it.meta["options"]) is None for it in items)
    groups: dict[str, list[float]] = defaultdict(list)
    for it, s in scored:
        groups[it.category].append(s)
    rows = {c: {"accuracy": _percent(M.mean(v)), "n": len(v)} for c, v in sorted(groups.items()) if c}
    return Result({"accuracy": _percent(M.mean(s for _, s in scored))}, "accuracy", rows, "subject",
                  [f"{unparsed} answers named no option (counted wrong)"] if unparsed else [], scored=len(scored))


# ---- MMBench ----------------------------------------------------------------------------------------------
def _is_none(value) -> bool:
    return value is None or str(value).strip() == "" or str(value).strip().lower() in ("nan", "none")


def load_mmbench(src: Source) -> list[Item]:
    path = src.question_file(["mmbench*.tsv", "*.tsv"], "MMBench TSV", "an MMBench .tsv such as MMBench_DEV_EN.tsv")
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    need = {"index", "question", "A", "B", "image"}
    if not rows or not need <= set(rows[0]):
        raise DataError(f"{path}: expected an MMBench TSV with columns {sorted(need)} (and hint, C, D, answer, "
                        f"category); got {sorted(rows[0]) if rows else 'no rows'}")
    images = {r["index"]: r["image"] for r in rows if len(r["image"]) > 64}
    items = []
    for r in rows:
        options = []
        for letter in M.LETTERS:
            if _is_none(r.get(letter)):
                break
            options.append(r[letter])
        b64 = r["image"] if len(r["image"]) > 64 else images.get(r["image"].strip())
        if b64 is None:
            raise DataError(f"{path}: row {r['index']} has no image (and refers to no row with one)")
        answer = None if _is_none(r.get("answer")) else r["answer"].strip()
        context = "" if _is_none(r.get("hint")) else r["hint"] + "\n"
        for k, opts in enumerate(M.rotations(options)):
            truth = M.rotated_answer(answer, len(options), k) if answer else None
            items.append(Item(f"{r['index']}/{k}", {"question": r["question"], "options": format_options(opts),
                                                    "context": context},
                              Image(b64=b64), truth, group=str(r["index"]), category=r.get("category") or "",
                              meta={"options": opts, "rotation": k}))
    return items


def score_mmbench(items: list[Item], records: dict[str, dict]) -> Result:
    known = [it for it in items if it.truth is not None]
    if not known:
        return _no_truth(items, "the TSV has no answer column")
    by_question: dict[str, list[Item]] = defaultdict(list)
    for it in known:
        by_question[it.group].append(it)
    circular, single = {}, {}
    for q, its in by_question.items():
        its.sort(key=lambda it: it.meta["rotation"])
        rights = [_choice_right(records, it) for it in its]
        circular[q], single[q] = M.circular_correct(rights), rights[0]
    cats: dict[str, list[bool]] = defaultdict(list)
    for q, its in by_question.items():
        cats[its[0].category].append(circular[q])
    rows = {c: {"circular_accuracy": _percent(M.mean(v)), "n": len(v)} for c, v in sorted(cats.items()) if c}
    return Result({"circular_accuracy": _percent(M.mean(circular.values())),
                   "single_pass_accuracy": _percent(M.mean(single.values()))}, "circular_accuracy", rows,
                  "category", ["CircularEval: a question counts only if every rotation of its options is right"],
                  scored=len(by_question))


# ---- MM-Vet -----------------------------------------------------------------------------------------------
JUDGE_PROMPT = """\
Compare the ground truth with the prediction of an AI model and rate how correct the prediction is. \
In the ground truth, <AND> means the prediction is fully right only if it contains every listed element, \
and <OR> means it is fully right if it contains any one of them. The correctness score is one of 0.0 \
(totally wrong), 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9 or 1.0 (totally right). \
Complete the last row: reply with the score only.

Question | Ground truth | Prediction | Correctness
--- | --- | --- | ---
What is x*y if x=8 and y=9? | 72 | 3 | 0.0
What is x*y if x=8 and y=9? | 72 | 72 | 1.0
What colors are the two balls? | red <AND> blue | red | 0.5
What colors are the two balls? | red <AND> blue | a red ball and a blue ball | 1.0
Which animal is larger? | elephant <OR> the elephant | The elephant is larger. | 1.0
Which animal is larger? | elephant <OR> the elephant | the mouse | 0.0
"""


def judge_prompt(question: str, truth: str, pred: str) -> str:
    flat = lambda s: " ".join(str(s).split())  # noqa: E731
    truth = flat(truth).replace("<AND>", " <AND> ").replace("<OR>", " <OR> ")
    return JUDGE_PROMPT + f"{flat(question)} | {' '.join(truth.split())} | {flat(pred)} | "


def load_mmvet(src: Source) -> list[Item]:
    path = src.question_file(["mm-vet.json", "mmvet*.json", "*.json"], "MM-Vet", "mm-vet.json")
    data = read_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected MM-Vet's mm-vet.json ({{id: {{imagename, question, answer, capability}}}})")
    finder = ImageFinder(src.image_roots("images"))
    return [Item(str(q), {"question": e["question"]}, image_of(finder, e["imagename"]), e["answer"],
                 meta={"capabilities": list(e.get("capability", [])), "image_name": e["imagename"],
                       "needs_image": True}) for q, e in data.items()]


def score_mmvet(items: list[Item], records: dict[str, dict]) -> Result:
    scores, ungraded = {}, 0
    for it in items:
        s = (records.get(it.qid) or {}).get("judge_score")
        ungraded += s is None
        scores[it.qid] = float(s or 0.0)
    caps: dict[str, list[float]] = defaultdict(list)
    for it in items:
        for c in it.meta["capabilities"]:
            caps[c].append(scores[it.qid])
    rows = {c: {"score": _percent(M.mean(v)), "n": len(v)} for c, v in sorted(caps.items())}
    notes = [f"{ungraded} answers could not be graded (counted 0)"] if ungraded else []
    return Result({"total": _percent(M.mean(scores.values()))}, "total", rows, "capability", notes,
                  scored=len(items))


SCIENCEQA_IMG = TaskSpec("scienceqa_img", "ScienceQA-IMG", load_scienceqa, score_choice, CHOICE_TEMPLATE,
                         CHOICE_SUFFIX, paper=65.4)
MMBENCH = TaskSpec("mmbench", "MMBench", load_mmbench, score_mmbench, CHOICE_TEMPLATE, CHOICE_SUFFIX, paper=57.0)
MMVET = TaskSpec("mmvet", "MM-Vet", load_mmvet, score_mmvet, suffix="", max_tokens=256, paper=32.6,
                 needs_judge=True)
