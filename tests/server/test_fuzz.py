"""Schema-driven fuzzing of the HTTP API with schemathesis: no 5xx, and the server stays healthy.

Hypothesis drives schemathesis's strategies directly (not its pytest plugin), so the test does
not depend on pytest internals.
"""

import httpx
import pytest
from hypothesis import HealthCheck, given, settings

schemathesis = pytest.importorskip("schemathesis")

from model import MambaConfig  # noqa: E402
from model.factory import create_vlmamba, tiny_vision_config  # noqa: E402
from model.tokenizer import train_bpe_tokenizer  # noqa: E402
from server.settings import ServerSettings  # noqa: E402
from tests.server.live import LiveServer  # noqa: E402

# Operations without inputs (health, metrics) exhaust after one case; the rest make over 1 000.
CASES = {"POST /v1/chat/completions": 920}


@pytest.fixture(scope="module")
def fuzz_server():
    # A tiny random model keeps each generated request cheap; every limit stays small.
    tok = train_bpe_tokenizer(["What color is the circle? red blue yes no"] * 4, vocab_size=300)
    model, proc = create_vlmamba(tiny_vision_config(), MambaConfig(d_model=32, n_layer=2, vocab_size=300), tok)
    # Only a domain that does not exist may be fetched: the allowlist refuses every other host
    # before any DNS lookup, so fuzzed image URLs never leave this machine.
    s = ServerSettings(max_model_len=256, default_max_tokens=8, image_domains="images.invalid",
                       max_queue=32, max_body_bytes=1 << 20)
    with LiveServer(s, (model, proc, "fuzz")) as srv:
        yield srv


def _fuzz_operation(op, url: str, examples: int) -> int:
    sent = []

    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)
    @given(case=op.as_strategy())
    def run(case):
        body = case.body if isinstance(case.body, dict) else {}
        if isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 8:
            body["max_tokens"] = 8  # valid requests stay cheap; invalid values are still sent as generated
        response = case.call(base_url=url, timeout=30)
        sent.append(response.status_code)
        assert response.status_code < 500, (op.label, response.status_code, response.text[:500])

    run()
    return len(sent)


def test_no_server_errors_and_healthy_after(fuzz_server):
    schema = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")
    counts = {}
    for result in schema.get_all_operations():
        op = result.ok()
        counts[op.label] = _fuzz_operation(op, fuzz_server.url, CASES.get(op.label, 100))
    print(counts)
    assert sum(counts.values()) >= 1000 and "POST /v1/chat/completions" in counts
    r = httpx.get(fuzz_server.url + "/health")
    assert r.status_code == 200 and r.json()["slots_used"] == 0
