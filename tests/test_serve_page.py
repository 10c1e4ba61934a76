"""The chat page at `/`, in a real headless Chromium (Debian's `chromium`, driven by Playwright):
a question typed in streams an answer equal to the server's non-streamed greedy answer; the next
turn carries the conversation; Reset clears it; a server with an API key gets one from the page.
A screenshot is kept in test-artifacts/ (CI's artifact folder)."""

from __future__ import annotations

import os
import shutil

import pytest
from tests.serve_helpers import ServerThread, one_thread

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARTIFACTS = os.path.join(REPO, "test-artifacts")
# Playwright cannot download its own browser here; Debian's chromium, headless, nothing phoning home.
CHROMIUM_ARGS = [
    "--no-sandbox",  # CI runs as root
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
DONE = '.msg.assistant[data-done="true"]'


@pytest.fixture(scope="module", autouse=True)
def _threads():
    yield from one_thread()


@pytest.fixture(scope="module")
def browser():
    path = shutil.which("chromium")
    if path is None:
        reason = "chromium is not installed (apt-get install chromium)"
        if os.environ.get("QATUNE_REQUIRE_BROWSER"):
            pytest.fail(reason)
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def ask(page, question: str, done_before: int) -> str:
    page.fill("#prompt", question)
    page.click("#send")
    page.wait_for_function(f"document.querySelectorAll('{DONE}').length > {done_before}", timeout=30_000)
    return page.locator(".msg.assistant").nth(done_before).evaluate("e => e.textContent")


def test_chat_page_streams_the_greedy_answer(make_tiny_run, browser):
    run = make_tiny_run("plain")
    with ServerThread(run) as s:
        page = browser.new_page()
        page.goto(s.url + "/")
        page.wait_for_function(f"document.getElementById('model-name').textContent.startsWith('{s.served.name} ')")
        assert "context 128 tokens" in page.inner_text("#model-name")
        page.fill("#temperature", "0")
        page.fill("#max-tokens", "24")

        client, kw = s.client(), dict(model=s.served.name, max_tokens=24, temperature=0)
        question = "What is the boiling point of water?"
        shown = ask(page, question, 0)
        messages = [{"role": "user", "content": question}]
        expected = client.chat.completions.create(messages=messages, **kw).choices[0].message.content
        assert shown == expected and shown
        assert int(page.locator(".msg.assistant").first.get_attribute("data-chunks")) > 3  # it streamed
        os.makedirs(ARTIFACTS, exist_ok=True)
        shot = os.path.join(ARTIFACTS, "chat_page.png")
        page.screenshot(path=shot, full_page=True)
        with open(shot, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"

        follow_up = "And on a mountain?"  # the page sends the whole conversation
        shown = ask(page, follow_up, 1)
        messages += [{"role": "assistant", "content": expected}, {"role": "user", "content": follow_up}]
        assert shown == client.chat.completions.create(messages=messages, **kw).choices[0].message.content

        page.click("#reset")
        assert page.locator(".msg").count() == 0
        assert ask(page, question, 0) == expected  # a fresh conversation again
        page.close()


def test_chat_page_asks_for_the_api_key_and_keeps_a_long_chat_in_the_context(make_tiny_run, browser):
    with ServerThread(make_tiny_run("plain"), "--api-key", "s3cret") as s:
        page = browser.new_page()
        page.goto(s.url + "/")
        page.wait_for_selector("#api-key-box", state="visible")
        assert page.inner_text("#model-name") == "this server needs an API key"
        page.fill("#api-key", "s3cret")
        page.dispatch_event("#api-key", "change")
        page.wait_for_function(f"document.getElementById('model-name').textContent.startsWith('{s.served.name} ')")
        assert page.input_value("#max-tokens") == "64"  # half the 128-token context
        page.fill("#temperature", "0")
        page.fill("#max-tokens", "40")
        long_question = "Tell me everything about the history of the city of Rome, please, " * 2  # 35 tokens
        for turn in range(3):  # from turn 2 on, the previous exchange (35 + 41) does not fit beside the new one
            assert ask(page, long_question, turn)
        assert page.locator(".note", has_text="dropped the 1 oldest exchange(s) to fit the context").count() == 2
        assert page.locator(".msg.error").count() == 0
        page.close()
