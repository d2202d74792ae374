"""The chat page at ``/`` in a real browser (Debian's chromium driven by Selenium) against a live server.

Needs ``apt-get install chromium chromium-driver`` and ``pip install selenium``; skipped without them
(set ``VLMAMBA_REQUIRE_BROWSER=1`` to fail instead). Set ``VLMAMBA_WEBUI_SCREENSHOT=docs/chat-page.png``
to refresh the README's screenshot of a two-turn conversation.
"""

from __future__ import annotations

import os

import pytest

from model.data.shapes import make_sample
from server.settings import ServerSettings
from server.webui import mount_webui
from tests.server.live import ImageServer, LiveServer

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
WAIT_S = 45  # generous: CI has two cores and other tests may run alongside


def _missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} is missing (apt-get install chromium chromium-driver)"
    return None


class WebServer(LiveServer):
    """A LiveServer with the chat page mounted (unless create_app already did)."""

    def __init__(self, settings: ServerSettings, loaded):
        super().__init__(settings, loaded)
        if not any(getattr(r, "path", None) == "/" for r in self.app.routes):
            mount_webui(self.app)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    reason = _missing()
    if reason:
        if os.environ.get("VLMAMBA_REQUIRE_BROWSER"):
            pytest.fail(reason)
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--disable-extensions", "--window-size=1000,780", "--lang=en-US",
                # Every host but 127.0.0.1 fails to resolve: nothing else can be reached.
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(arg)
    # An explicit driver path: Selenium Manager (which downloads drivers) is never run.
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(WAIT_S)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def live(demo):
    model, proc = demo
    with WebServer(ServerSettings(allow_private_image_urls=True), (model, proc, "shapes-demo")) as srv:
        yield srv


@pytest.fixture(scope="module")
def keyed(demo):
    model, proc = demo
    with WebServer(ServerSettings(api_key="k"), (model, proc, "shapes-demo")) as srv:
        yield srv


@pytest.fixture(scope="module")
def image_server():
    srv = ImageServer({"s2": make_sample("test", 2).image()})
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def sample_png(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")

    def save(i: int):
        path = folder / f"shapes-{i}.png"
        if not path.exists():
            make_sample("test", i).image().save(path)
        return path

    return save


def qa(i: int, qtype: str):
    return next(q for q in make_sample("test", i).qas if q.qtype == qtype)


# ---- page helpers --------------------------------------------------------------------------

def wait(driver, condition, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S, poll_frequency=0.05).until(condition, message=f"timed out: {what}")


def by_id(driver, id_: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, id_)


def turns(driver):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, "#transcript .turn")


# Records each request body the page sends, to check what goes over the wire.
RECORD_FETCH = """
window.sentBodies = [];
const realFetch = window.fetch;
window.fetch = (url, opts) => {
  if (opts && opts.body) window.sentBodies.push(JSON.parse(opts.body));
  return realFetch(url, opts);
};
"""


def open_page(driver, url: str, model: str | None = "shapes-demo") -> None:
    driver.get(url + "/")
    if model:
        wait(driver, lambda d: by_id(d, "model-name").text == model, "the model name from /v1/models")
    driver.execute_script(RECORD_FETCH)


def attach(driver, path) -> None:
    by_id(driver, "image-file").send_keys(str(path))
    wait(driver, lambda d: by_id(d, "attachment").is_displayed(), "the image preview")


def ask(driver, question: str, image=None) -> None:
    if image is not None:
        attach(driver, image)
    box = by_id(driver, "question")
    box.clear()
    box.send_keys(question)
    by_id(driver, "send").click()


def answer_of(driver, n: int) -> dict:
    """Waits for turn ``n`` (1-based) to finish; returns its answer text and its numbers."""

    def done(d):
        t = turns(d)
        return len(t) >= n and t[n - 1].find_element("css selector", ".assistant").get_attribute("data-state") == "done"

    wait(driver, done, f"the answer of turn {n}")
    t = turns(driver)[n - 1]
    meta = t.find_element("css selector", ".meta")
    return {"text": t.find_element("css selector", ".answer").get_attribute("textContent"),
            "chunks": int(t.find_element("css selector", ".answer").get_attribute("data-chunks")),
            "cached": int(meta.get_attribute("data-cached-tokens")),
            "prompt": int(meta.get_attribute("data-prompt-tokens")),
            "ttft_ms": int(meta.get_attribute("data-ttft-ms")),
            "meta_text": meta.text}


def error_text(driver) -> str:
    wait(driver, lambda d: by_id(d, "error").is_displayed() and by_id(d, "error").text, "an error message")
    return by_id(driver, "error").text


# ---- tests ---------------------------------------------------------------------------------

def test_the_page_and_its_assets_are_served_with_no_external_references(live):
    import re

    import httpx

    page = httpx.get(live.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "connect-src 'self'" in page.headers["content-security-policy"]
    assert "://" not in page.text
    refs = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert refs and all(r.startswith("/static/") or r == "data:," for r in refs), refs
    for path, kind in (("/static/chat.js", "javascript"), ("/static/chat.css", "text/css")):
        r = httpx.get(live.url + path)
        assert r.status_code == 200 and kind in r.headers["content-type"], path
        assert "://" not in r.text, path  # no absolute URLs: everything comes from this server

def test_two_turn_conversation_streams_and_reuses_the_session_cache(browser, live, sample_png, tmp_path):
    open_page(browser, live.url)
    q1, q2 = qa(1, "describe"), qa(1, "count")
    ask(browser, q1.question, sample_png(1))
    first = answer_of(browser, 1)
    assert first["text"] == q1.answer
    assert first["chunks"] > 1  # arrived token by token, not in one piece
    assert first["prompt"] > 64 and first["ttft_ms"] >= 0

    ask(browser, q2.question)  # a follow-up: no new image
    second = answer_of(browser, 2)
    assert second["text"] == q2.answer
    assert second["cached"] > 64  # the image and the first turn came from the session cache
    assert f"{second['cached']} of {second['prompt']} prompt tokens from the session cache" in second["meta_text"]

    sent = browser.execute_script("return window.sentBodies")
    assert len(sent) == 2 and sent[0]["session_id"] == sent[1]["session_id"]
    for body in sent:
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
        assert body["temperature"] == 0 and body["model"] == "shapes-demo"
    assert sent[0]["messages"][0]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert [m["role"] for m in sent[1]["messages"]] == ["user", "assistant", "user"]
    assert sent[1]["messages"][1]["content"] == q1.answer

    # Everything the page loaded came from this server.
    loaded = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert loaded and all(u.startswith(live.url + "/") for u in loaded), loaded

    # The README's picture: a fixed, sharp (2x) viewport, no focus ring.
    browser.execute_script("document.activeElement.blur()")
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": 960, "height": 800, "deviceScaleFactor": 2, "mobile": False})
    try:
        shot = os.environ.get("VLMAMBA_WEBUI_SCREENSHOT") or str(tmp_path / "chat-page.png")
        assert browser.save_screenshot(shot)
        with open(shot, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def test_new_conversation_clears_the_transcript_and_starts_a_new_session(browser, live, sample_png, image_server):
    open_page(browser, live.url)
    q = qa(2, "count")
    ask(browser, q.question, sample_png(2))
    assert answer_of(browser, 1)["text"] == q.answer

    by_id(browser, "new-chat").click()
    assert turns(browser) == [] and by_id(browser, "empty").is_displayed()

    # This time the image comes as a URL (fetched by the server from a loopback image server).
    q, url = qa(2, "color"), f"{image_server.url}/s2.png"
    by_id(browser, "image-url").send_keys(url)
    ask(browser, q.question)
    assert answer_of(browser, 1)["text"] == q.answer and len(turns(browser)) == 1
    first, second = browser.execute_script("return window.sentBodies")
    assert len(second["messages"]) == 1 and second["session_id"] != first["session_id"]
    assert second["messages"][0]["content"][0] == {"type": "image_url", "image_url": {"url": url}}


def test_errors_are_shown_in_plain_words(browser, live, tmp_path):
    open_page(browser, live.url)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not a PNG file")
    ask(browser, "What is this?", broken)
    msg = error_text(browser)
    assert msg.startswith("The server could not answer this:") and "not a decodable image" in msg
    # The failed turn is gone and the question and image are back in the composer, ready to fix.
    assert turns(browser) == []
    assert by_id(browser, "question").get_attribute("value") == "What is this?"
    assert by_id(browser, "attachment").is_displayed()

    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    by_id(browser, "image-file").send_keys(str(notes))
    wait(browser, lambda d: "is not an image file" in by_id(d, "error").text, "the not-an-image message")

    browser.execute_script("window.fetch = () => Promise.reject(new TypeError('Failed to fetch'))")
    by_id(browser, "send").click()
    wait(browser, lambda d: "Could not reach the server" in by_id(d, "error").text, "the network error")
    assert turns(browser) == []


def test_api_key_is_asked_for_kept_in_the_tab_and_sent(browser, keyed, sample_png):
    open_page(browser, keyed.url, model=None)
    wait(browser, lambda d: by_id(d, "key-form").is_displayed(), "the API key prompt")
    assert "needs an API key" in error_text(browser)

    key = by_id(browser, "api-key")
    key.send_keys("wrong")
    key.submit()
    wait(browser, lambda d: "did not accept" in by_id(d, "error").text, "the wrong-key message")
    assert by_id(browser, "key-form").is_displayed()

    key.clear()
    key.send_keys("k")
    key.submit()
    wait(browser, lambda d: by_id(d, "model-name").text == "shapes-demo", "the model name")
    assert not by_id(browser, "key-form").is_displayed() and not by_id(browser, "error").is_displayed()
    assert browser.execute_script("return sessionStorage.getItem('vlmamba.apiKey')") == "k"

    # A 401 on a question (the key went stale) prompts again and resends the question once a key is given.
    browser.execute_script("sessionStorage.setItem('vlmamba.apiKey', 'stale')")
    q = qa(3, "where")
    ask(browser, q.question, sample_png(3))
    wait(browser, lambda d: by_id(d, "key-form").is_displayed(), "the API key prompt after a 401")
    assert "did not accept" in error_text(browser) and turns(browser) == []
    key.clear()
    key.send_keys("k")
    key.submit()
    assert answer_of(browser, 1)["text"] == q.answer

    # Kept for the tab's life: a reload needs no new prompt.
    open_page(browser, keyed.url)
    assert not by_id(browser, "key-form").is_displayed()
