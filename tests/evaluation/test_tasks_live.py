"""Every task end to end: a fixture in the benchmark's format, scored against the demo model on a real server.

The expected numbers are worked out by hand in the comments of tests/evaluation/fixtures.py."""

import json

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.evaluation import fixtures as F
from tests.evaluation.conftest import run_eval
from tests.evaluation.fake_openai import FakeOpenAI


def evaluate(live, task, data, tmp_path, *extra, code=0, name="preds") -> dict:
    out = tmp_path / f"{name}.jsonl"
    argv = ["--server", live.url, "--task", task, "--out", str(out), "--prompt-suffix", "", "--concurrency", "8",
            *extra]
    if data is not None:
        argv += ["--data", str(data)]
    assert run_eval(argv) == code
    return json.loads((tmp_path / f"{name}.summary.json").read_text())


def finished_requests(live) -> float:
    text = httpx.get(live.url + "/metrics").text
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == "vlmamba_requests_finished_total")


def test_vqav2_official_format(live, tmp_path, capsys):
    s = evaluate(live, "vqav2", F.vqav2(tmp_path / "vqa"), tmp_path)
    assert s["metrics"]["accuracy"] == F.VQAV2_ACCURACY and s["questions"] == 4 and s["failed"] == 0
    assert s["breakdown"] == {"number": {"accuracy": 95.0, "n": 2}, "other": {"accuracy": 60.0, "n": 1},
                              "yes/no": {"accuracy": 0.0, "n": 1}}
    assert s["headline"] == {"metric": "accuracy", "measured": 62.5, "paper": 76.6} and s["model"] == "shapes-demo"
    table = capsys.readouterr().out
    assert "| accuracy | 62.50 | 76.6 |" in table and "| number | 95.00 | 2 |" in table


def test_resuming_sends_no_request_for_answered_questions(live, tmp_path):
    data = F.vqav2(tmp_path / "vqa")
    before = finished_requests(live)
    first = evaluate(live, "vqav2", data, tmp_path)
    assert finished_requests(live) - before == 4
    second = evaluate(live, "vqav2", data, tmp_path)
    assert finished_requests(live) - before == 4  # nothing asked again
    assert second["metrics"] == first["metrics"]
    preds = tmp_path / "preds.jsonl"
    lines = preds.read_text().splitlines()
    preds.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:10])  # as if killed while writing the last answer
    third = evaluate(live, "vqav2", data, tmp_path)
    assert finished_requests(live) - before == 5  # only the lost answer
    assert third["metrics"] == first["metrics"]


def test_vqav2_llava_jsonl_without_then_with_annotations(live, tmp_path):
    data = F.vqav2(tmp_path / "vqa")
    jsonl = data / "llava" / "llava_vqav2_mscoco_val2014.jsonl"
    s = evaluate(live, "vqav2", jsonl, tmp_path, "--images", str(data / "val2014"))
    assert s["metrics"] == {} and "predictions only" in s["notes"][0]
    submission = json.loads((tmp_path / "preds.evalai.json").read_text())
    assert [a["question_id"] for a in submission] == [500, 501, 502, 503]
    assert [a["answer"] for a in submission] == ["3", "purple", "yes", "2"]
    prompts = [json.loads(line)["prompt"] for line in (tmp_path / "preds.jsonl").read_text().splitlines()]
    assert sorted(prompts) == sorted(F.qa(i, t).question for i, t, _, _ in F.VQAV2)  # LLaVA's suffix replaced
    before = finished_requests(live)
    s = evaluate(live, "vqav2", jsonl, tmp_path, "--images", str(data / "val2014"),
                 "--annotations", str(data / "v2_mscoco_val2014_annotations.json"))
    assert s["metrics"]["accuracy"] == F.VQAV2_ACCURACY and finished_requests(live) == before


def test_textvqa(live, tmp_path):
    s = evaluate(live, "textvqa", F.textvqa(tmp_path / "textvqa"), tmp_path)
    assert s["metrics"] == {"accuracy": F.TEXTVQA_ACCURACY} and s["paper"] == 48.9


def test_gqa(live, tmp_path):
    s = evaluate(live, "gqa", F.gqa(tmp_path / "gqa"), tmp_path)
    assert s["metrics"] == {"accuracy": 75.0}
    assert s["breakdown"] == {"query": {"accuracy": 66.67, "n": 3}, "verify": {"accuracy": 100.0, "n": 1}}


def test_scienceqa_img_extracts_the_option_by_its_text(live, tmp_path):
    s = evaluate(live, "scienceqa_img", F.scienceqa(tmp_path / "sqa"), tmp_path, "--prompt-template", "{question}")
    assert s["questions"] == 3  # the question without an image and the train question are left out
    assert s["metrics"] == {"accuracy": 66.67}
    assert s["breakdown"] == {"natural science": {"accuracy": 100.0, "n": 2},
                              "social science": {"accuracy": 0.0, "n": 1}}


def test_pope_per_split(live, tmp_path):
    s = evaluate(live, "pope", F.pope(tmp_path / "pope"), tmp_path)
    b = s["breakdown"]
    assert b["random"] == {"accuracy": 66.67, "precision": 50.0, "recall": 100.0, "f1": 66.67, "yes_ratio": 66.67,
                           "n": 3}
    assert b["popular"] == {"accuracy": 50.0, "precision": 100.0, "recall": 50.0, "f1": 66.67, "yes_ratio": 50.0,
                            "n": 2}
    assert b["adversarial"] == {"accuracy": 100.0, "precision": 100.0, "recall": 100.0, "f1": 100.0,
                                "yes_ratio": 50.0, "n": 2}
    assert s["metrics"] == {"f1": 77.78, "accuracy": 72.22, "precision": 83.33, "recall": 83.33, "yes_ratio": 55.56}
    one = evaluate(live, "pope", tmp_path / "pope", tmp_path, "--split", "popular", "--limit", "1", name="one")
    assert one["questions"] == 1 and list(one["breakdown"]) == ["popular"]


def test_mme_both_folder_layouts(live, tmp_path):
    s = evaluate(live, "mme", F.mme(tmp_path / "mme"), tmp_path)
    assert s["breakdown"] == {
        "existence": {"accuracy": 75.0, "accuracy_plus": 50.0, "score": 125.0},
        "count": {"accuracy": 50.0, "accuracy_plus": 0.0, "score": 50.0},
        "commonsense_reasoning": {"accuracy": 100.0, "accuracy_plus": 100.0, "score": 200.0}}
    assert s["metrics"] == {"perception": 175.0, "cognition": 200.0} and s["paper"] == 1369.6
    assert "not in the data" in s["notes"][0]


def test_mmbench_circular(live, tmp_path):
    s = evaluate(live, "mmbench", F.mmbench(tmp_path / "mmb"), tmp_path, "--prompt-template", "{question}")
    assert s["questions"] == 3 + 4 + 2 + 2  # one request per rotation
    assert s["metrics"] == {"circular_accuracy": 75.0, "single_pass_accuracy": 75.0}
    assert s["breakdown"] == {"color": {"circular_accuracy": 100.0, "n": 1},
                              "count": {"circular_accuracy": 100.0, "n": 2},
                              "exists": {"circular_accuracy": 0.0, "n": 1}}


def test_shapes(live, tmp_path):
    s = evaluate(live, "shapes", None, tmp_path, "--limit", "3")
    assert s["questions"] == 15 and s["metrics"] == {"accuracy": 100.0}
    assert set(s["breakdown"]) == {"color", "count", "exists", "where", "describe"}


def test_mmvet_without_a_judge_is_skipped(tmp_path, capsys):
    argv = ["--server", "http://127.0.0.1:9", "--task", "mmvet", "--data", str(tmp_path / "nothing"),
            "--out", str(tmp_path / "m.jsonl")]
    assert run_eval(argv) == 0
    assert "skipped: needs --judge-url" in capsys.readouterr().out
    assert json.loads((tmp_path / "m.summary.json").read_text())["skipped"].startswith("skipped: needs --judge-url")
    assert not (tmp_path / "m.jsonl").exists()


def _last_row(prompt: str) -> list[str]:
    return [c.strip() for c in prompt.rstrip().splitlines()[-1].split("|")]


def test_mmvet_with_a_fake_judge(live, tmp_path):
    def judge(body):
        question, truth, pred, _ = _last_row(body["messages"][0]["content"])
        if question.startswith("Where") and body["temperature"] == 0:
            return 200, "I cannot tell.", {}  # no score: asked again
        return 200, ("Score: 1.0" if truth == pred else "0.0"), {}

    with FakeOpenAI(judge) as fake:
        s = evaluate(live, "mmvet", F.mmvet(tmp_path / "mmvet"), tmp_path, "--judge-url", fake.url)
        assert len(fake.calls) == 4 and {c[1]["model"] for c in fake.calls} == {"fake-judge"}
        assert s["metrics"] == {"total": 66.67} and s["paper"] == 32.6
        assert s["breakdown"] == {"ocr": {"score": 100.0, "n": 1}, "rec": {"score": 50.0, "n": 2},
                                  "spat": {"score": 0.0, "n": 1}}
        evaluate(live, "mmvet", tmp_path / "mmvet", tmp_path, "--judge-url", fake.url)
        assert len(fake.calls) == 4  # grades are kept in the predictions file too


def test_retries_429_and_503_honouring_retry_after(tmp_path):
    replies = iter([(429, "queue full", {"Retry-After": "0.3"}), (503, "draining", {"Retry-After": "0"})])

    with FakeOpenAI(lambda body: next(replies, (200, "3", {})), model="busy") as fake:
        s = evaluate(fake, "gqa", F.gqa(tmp_path / "gqa"), tmp_path, "--concurrency", "1")
    times = [t for t, _ in fake.calls]
    assert len(times) == 6 and times[1] - times[0] >= 0.3
    assert s["metrics"] == {"accuracy": 25.0} and s["model"] == "busy" and s["failed"] == 0


@pytest.mark.parametrize("status,code", [(401, 1), (400, 1)])
def test_refusals(tmp_path, status, code):
    with FakeOpenAI(lambda body: (status, "no", {})) as fake:
        assert run_eval(["--server", fake.url, "--task", "gqa", "--data", str(F.gqa(tmp_path / "gqa")),
                         "--out", str(tmp_path / "p.jsonl"), "--concurrency", "1"]) == code
    lines = (tmp_path / "p.jsonl").read_text().splitlines() if (tmp_path / "p.jsonl").exists() else []
    assert len(fake.calls) == (1 if status == 401 else 4)  # a bad key stops the run; a 400 fails one question
    assert len(lines) == (0 if status == 401 else 4) and all("error" in json.loads(x) for x in lines)


def test_bad_data_and_unreachable_server(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert run_eval(["--server", "http://127.0.0.1:9", "--task", "gqa", "--data", str(tmp_path / "empty")]) == 2
    assert "no GQA question found" in capsys.readouterr().err
    assert run_eval(["--server", "http://127.0.0.1:9", "--task", "gqa", "--data", str(F.gqa(tmp_path / "g")),
                     "--out", str(tmp_path / "p.jsonl")]) == 1
    assert "cannot reach" in capsys.readouterr().err
