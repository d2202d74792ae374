"""``vlmamba serve --checkpoint DIR`` with a Cobra run directory: a real uvicorn, the official
OpenAI client, images fetched over HTTP from a local image server."""

import httpx
import openai
import pytest
from PIL import Image

from model.checkpoint_vlm import load_vlmamba
from model.generate import generate
from model.sampling import SamplingParams
from server.settings import ServerSettings
from tests.model.cobra_tiny import write_cobra_dir
from tests.server.live import ImageServer, LiveServer

IMAGES = {"red": Image.new("RGB", (64, 48), (220, 30, 30)), "stripes": Image.linear_gradient("L").convert("RGB")}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return write_cobra_dir(tmp_path_factory.mktemp("runs") / "cobra+3b")


@pytest.fixture(scope="module")
def images():
    srv = ImageServer(IMAGES)
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def live(run_dir):
    # The server loads the directory itself, as `vlmamba serve --checkpoint DIR` does.
    settings = ServerSettings(checkpoint=str(run_dir), device="cpu", allow_private_image_urls=True, max_num_seqs=4)
    with LiveServer(settings, None) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def local(run_dir):
    return load_vlmamba(run_dir)


def ask(url, text):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def reference(local, messages, images, max_tokens=12):
    model, proc = local
    return generate(model, proc, messages, images=images,
                    params=SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))


def test_models_lists_the_run_directory(client):
    assert [m.id for m in client.models.list().data] == ["cobra+3b"]


def test_answers_with_an_image_fetched_over_http(client, images, local):
    msgs = ask(f"{images.url}/red.png", "What is in the image?")
    r = client.chat.completions.create(model="cobra+3b", messages=msgs, temperature=0, max_tokens=12,
                                       extra_body={"ignore_eos": True})
    lib = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}]
    ref = reference(local, lib, [IMAGES["red"]])
    assert r.choices[0].message.content == ref.text and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == ref.prompt_tokens > 64  # 64 patch positions in front of the prompt
    assert r.usage.completion_tokens == 12
    chunks = client.chat.completions.create(model="cobra+3b", messages=msgs, temperature=0, max_tokens=12,
                                            stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text


def test_text_only_and_follow_up_turn_resume_from_the_session_cache(client, images, local):
    r = client.chat.completions.create(model="cobra+3b", messages=[{"role": "user", "content": "Describe a cat."}],
                                       temperature=0, max_tokens=6, extra_body={"ignore_eos": True})
    assert r.usage.prompt_tokens < 64  # no image, no patch positions
    msgs = ask(f"{images.url}/stripes.png", "Describe the picture in detail.")
    r1 = client.chat.completions.create(model="cobra+3b", messages=msgs, temperature=0, max_tokens=8,
                                        extra_body={"ignore_eos": True, "session_id": "s1"})
    msgs += [{"role": "assistant", "content": r1.choices[0].message.content},
             {"role": "user", "content": "How many shapes are there?"}]
    r2 = client.chat.completions.create(model="cobra+3b", messages=msgs, temperature=0, max_tokens=8,
                                        extra_body={"ignore_eos": True, "session_id": "s1"})
    assert r2.usage.prompt_tokens_details.cached_tokens >= r1.usage.prompt_tokens
    first = [{"type": "image"}, {"type": "text", "text": "Describe the picture in detail."}]
    lib = [{"role": "user", "content": first}, msgs[1], msgs[2]]
    assert r2.choices[0].message.content == reference(local, lib, [IMAGES["stripes"]], 8).text


def test_two_images_are_refused(live, images):
    content = [{"type": "image_url", "image_url": {"url": f"{images.url}/{n}.png"}} for n in IMAGES]
    body = {"model": "cobra+3b", "messages": [{"role": "user", "content": content + [{"type": "text", "text": "?"}]}]}
    r = httpx.post(live.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_images"
