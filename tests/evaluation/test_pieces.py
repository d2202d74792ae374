"""Prompts, --limit, predictions-file merging, the client's URL and Retry-After handling, and the CLI."""

import email.utils
import json

import pytest

from server.evaluation.client import ChatClient, api_base, retry_after
from server.evaluation.data import Item, Source, limit_items, strip_llava_prompt
from server.evaluation.runner import build_prompts, paths, read_records
from server.evaluation.tasks import get_task
from server.evaluation.tasks_choice import format_options, judge_prompt, load_mmbench, load_scienceqa
from tests.evaluation import fixtures as F
from tests.evaluation.conftest import parse


def test_default_prompts_follow_llava(tmp_path):
    vqa = Item("1", {"question": "What is it?"}, None)
    spec = get_task("vqav2")
    build_prompts([vqa], spec.template, spec.suffix)
    assert vqa.prompt == "What is it?\nAnswer the question using a single word or phrase."
    sqa = get_task("scienceqa_img")
    items = load_scienceqa(Source(F.scienceqa(tmp_path / "sqa")))
    items[0].fields["context"] = "Context: Look closely.\n"
    build_prompts(items, sqa.template, sqa.suffix)
    assert items[0].prompt == ("Context: Look closely.\nWhat color is the circle?\nA. red\nB. blue\n"
                               "Answer with the option's letter from the given choices directly.")
    mmb = load_mmbench(Source(F.mmbench(tmp_path / "mmb")))
    build_prompts(mmb, sqa.template, "")
    assert [it.prompt for it in mmb[:3]] == ["What color is the square?\n" + format_options(o) for o in
                                             (["red", "blue", "green"], ["blue", "green", "red"],
                                              ["green", "red", "blue"])]
    assert [it.truth for it in mmb[:3]] == ["A", "C", "B"]
    assert mmb[-1].image.b64 == mmb[0].image.b64  # a row whose image names another row's index


def test_llava_question_text_loses_its_marker_and_suffix():
    assert strip_llava_prompt("<image>\nWhat?\nAnswer the question using a single word or phrase.") == "What?"
    assert strip_llava_prompt("What?\nReference OCR token: a, b") == "What?\nReference OCR token: a, b"


def test_limit_counts_groups_per_part():
    items = [Item(f"{p}/{g}/{k}", {}, None, group=f"{p}/{g}", part=p) for p in "xy" for g in range(3)
             for k in range(2)]
    kept = limit_items(items, 2)
    assert [it.qid for it in kept] == ["x/0/0", "x/0/1", "x/1/0", "x/1/1", "y/0/0", "y/0/1", "y/1/0", "y/1/1"]
    assert limit_items(items, None) == items


def test_records_merge_and_skip_broken_lines(tmp_path):
    path = tmp_path / "p.jsonl"
    lines = [{"qid": "1", "error": "503"}, {"qid": "1", "prediction": "yes"}, {"qid": "2", "prediction": "no"},
             {"qid": "2", "judge_score": 0.5}]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"qid": "3", "predic')
    assert read_records(path) == {"1": {"qid": "1", "prediction": "yes"},
                                  "2": {"qid": "2", "prediction": "no", "judge_score": 0.5}}


def test_paths_and_urls():
    args = parse(["--server", "x", "--task", "pope", "--out", "r/p.jsonl"])
    assert [str(p) for p in paths(args, "pope")] == ["r/p.jsonl", "r/p.summary.json"]
    args = parse(["--server", "x", "--task", "pope"])
    assert [str(p) for p in paths(args, "pope")] == ["eval-results/pope.jsonl", "eval-results/pope.summary.json"]
    assert api_base("127.0.0.1:8000") == "http://127.0.0.1:8000/v1"
    assert api_base("https://api.example.com/v1/") == "https://api.example.com/v1"


def test_retry_after_seconds_or_http_date():
    assert retry_after("2") == 2.0 and retry_after("0.25") == 0.25 and retry_after(None) is None
    assert retry_after("soon") is None
    date = email.utils.formatdate(1000.0 + 30, usegmt=True)
    assert retry_after(date, now=1000.0) == 30.0


def test_judge_prompt_ends_with_the_row_to_complete():
    p = judge_prompt("What is\nshown?", "cat<AND>dog", "a cat")
    assert p.endswith("What is shown? | cat <AND> dog | a cat | ")
    assert "0.0 (totally wrong)" in p


def test_help_explains_every_option():
    from server.evaluation import add_eval_parser
    import argparse

    parser = argparse.ArgumentParser(prog="vlmamba")
    add_eval_parser(parser.add_subparsers())
    text = parser._subparsers._group_actions[0].choices["eval"].format_help()
    for flag in ("--server", "--task", "--data", "--limit", "--concurrency", "--out", "--summary", "--api-key",
                 "--model", "--prompt-suffix", "--judge-url", "docs/eval.md", "mmbench", "shapes"):
        assert flag in text
    assert all(a.help for a in parser._subparsers._group_actions[0].choices["eval"]._actions)


def test_a_negative_retry_count_is_refused():
    with pytest.raises(ValueError, match="max_retries"):
        ChatClient("http://127.0.0.1:9", max_retries=-1)
    with pytest.raises(SystemExit):
        parse(["--server", "x", "--task", "pope", "--max-retries", "-1"])
