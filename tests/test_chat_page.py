"""The chat page at / in a real headless browser (Debian's chromium driven by Playwright) against a live server:
streamed answers equal the API's own, Enter and Shift+Enter, Stop, the speed readout and the server's errors.
`DSV3_SCREENSHOT=docs/chat-page.png pytest tests/test_chat_page.py` also redraws the README's picture."""

import os
import re
import shutil
import time

import pytest
from infer_models import one_thread

pytest.importorskip("uvicorn")

from server_helpers import KEY, NAME, call, live_server, wait_idle  # noqa: E402

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
INSTALL_CHROMIUM = "make browser (as root: apt-get install --no-install-recommends chromium)"
TIMEOUT_MS = 20_000  # one answer of the tiny model takes well under a second; this is for a loaded machine


@pytest.fixture(scope="module")
def server():
    with one_thread(), live_server() as s:
        yield s


@pytest.fixture(scope="module")
def browser():
    # Missing tools fail rather than skip: a skipped browser test would let a broken page pass CI unseen.
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the chat page's test needs Playwright for Python: pip install -e '.[dev]' (or pip install "
                    "playwright); it drives the system chromium, so `playwright install` is not needed")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"the chat page's test needs Debian's chromium at {CHROMIUM}: run {INSTALL_CHROMIUM}")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(server, browser):
    """A fresh tab on / with its own storage; fails the test on a script error or a blocked resource (a CSP
    that forbids what the page needs shows up here)."""
    port, _ = server
    context = browser.new_context(viewport={"width": 1100, "height": 750}, base_url=f"http://127.0.0.1:{port}")
    context.set_default_timeout(TIMEOUT_MS)
    tab = context.new_page()
    problems = []
    tab.on("pageerror", lambda e: problems.append(f"script error: {e}"))
    tab.on("console", lambda m: problems.append(m.text) if "Content Security Policy" in m.text else None)
    response = tab.goto("/")
    assert response.status == 200 and response.headers["content-type"].startswith("text/html")
    assert "connect-src 'self'" in response.headers["content-security-policy"]
    yield tab
    context.close()
    assert not problems


def connect(page) -> None:
    """Enter the API key once the page has found that the server wants one."""
    page.wait_for_selector("body[data-auth=needed]")
    page.fill("#api-key", KEY)
    page.wait_for_selector("body[data-auth=ok]")
    assert page.text_content("#model") == NAME


def ask(page, prompt: str) -> None:
    page.fill("#prompt", prompt)
    page.press("#prompt", "Enter")


def last_answer(page):
    return page.locator(".msg.assistant").last


def test_streamed_answers_equal_the_api_greedy_answers(server, page, tmp_path):
    """Two turns, each compared with the API's answer to the same conversation: the page sends the history."""
    port, _ = server
    connect(page)
    system, max_tokens = "You are a helpful assistant.", 24
    page.fill("#system", system)
    page.fill("#temperature", "0")
    page.fill("#max-tokens", str(max_tokens))
    # note the lengths an answer shows while it is still streaming: it must grow in view, not appear whole
    page.evaluate("""() => {
        window.partial = new Set();
        new MutationObserver(() => {
            for (const m of document.querySelectorAll(".msg.assistant[data-state=streaming]"))
                if (m.textContent) window.partial.add(m.textContent.length);
        }).observe(document.getElementById("thread"), {childList: true, subtree: true});
    }""")
    messages = [{"role": "system", "content": system}]
    for turn, question in enumerate(["what does a server do?", "and how are experts chosen?"]):
        ask(page, question)
        page.wait_for_selector(f".msg.assistant[data-state=done] >> nth={turn}")
        assert page.get_attribute("body", "data-busy") == "false"
        assert page.locator(".msg.user").nth(turn).text_content() == question

        messages.append({"role": "user", "content": question})
        status, api = call(port, "POST", "/v1/chat/completions",
                           {"model": NAME, "temperature": 0, "max_tokens": max_tokens, "messages": messages})
        assert status == 200
        expected = api["choices"][0]["message"]["content"]
        assert expected and last_answer(page).text_content() == expected
        messages.append({"role": "assistant", "content": expected})

        # the count is the server's usage chunk; the rate a positive number
        speed = re.search(r"(\d+) tokens · ([\d.]+) tokens/s", page.text_content("#status"))
        assert speed and int(speed[1]) == api["usage"]["completion_tokens"] and float(speed[2]) > 0, \
            page.text_content("#status")
    assert page.evaluate("window.partial.size") >= 2

    shot = tmp_path / "chat-page.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("DSV3_SCREENSHOT"):
        target = os.path.abspath(os.environ["DSV3_SCREENSHOT"])
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(shot, target)


def test_shift_enter_adds_a_newline_and_enter_sends(page):
    page.click("#prompt")
    page.keyboard.type("first line")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("second line")
    assert page.input_value("#prompt") == "first line\nsecond line"
    assert page.locator(".msg").count() == 0 and page.get_attribute("body", "data-busy") == "false"
    page.keyboard.press("Enter")
    assert page.text_content(".msg.user") == "first line\nsecond line"
    assert page.input_value("#prompt") == ""


def test_server_errors_are_shown_in_the_page(page):
    # no key yet: the server's 401 message appears where the answer would be
    page.wait_for_selector("body[data-auth=needed]")
    ask(page, "hello")
    error = page.wait_for_selector(".msg.assistant.error")
    assert "API key" in error.text_content()
    assert page.text_content("#status").startswith("Error:")
    # with the key, a request the context cannot hold gets the server's 400 text
    connect(page)
    page.fill("#max-tokens", "100000")
    ask(page, "hello")
    page.wait_for_selector(".msg.assistant.error >> nth=1")
    assert "context holds" in last_answer(page).text_content()
    assert page.get_attribute("body", "data-busy") == "false"


def test_stop_keeps_the_partial_answer_and_frees_the_slot(server, page, monkeypatch):
    port, engine = server
    step = engine.step

    def steady_step():  # at most ~200 steps a second on any machine: Stop always lands mid-answer
        time.sleep(0.005)
        return step()

    monkeypatch.setattr(engine, "step", steady_step)
    # this engine does not speculate: a stand-in /health says it does, to see the acceptance reach the status
    health = {"status": "ok", "speculative": True, "mtp_acceptance": 0.625}
    page.route("**/health", lambda route: route.fulfill(json=health))
    connect(page)
    page.fill("#temperature", "0")
    page.fill("#max-tokens", str(engine.max_len - 32))  # far more than can stream before Stop
    ask(page, "the latent cache")
    page.wait_for_function("() => document.querySelector('.msg.assistant').textContent.length > 20")
    page.click("#stop")
    page.wait_for_selector("body[data-busy=false]")
    answer = last_answer(page)
    assert answer.get_attribute("data-state") == "stopped"
    kept = answer.text_content()
    assert len(kept) > 20 and page.text_content(".note") == "Stopped."
    wait_idle(port)  # the aborted fetch closed the connection, and the server cancelled the generation
    # chunks were counted, so the count is marked approximate, and it is far from the limit
    status = page.text_content("#status")
    speed = re.search(r"≈(\d+) tokens · [\d.]+ tokens/s .* · MTP acceptance 62.5%$", status)
    assert speed and int(speed[1]) < engine.max_len - 32, status
    assert answer.text_content() == kept
