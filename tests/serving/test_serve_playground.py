"""The playground in a real headless Chromium (Playwright driving the system browser)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from serve_helpers import KEYS


def _chromium() -> str | None:
    for candidate in (os.environ.get("MOSAIC_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium")):
        if candidate and Path(candidate).exists():
            return candidate
    return None


CHROMIUM = _chromium()


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install -y chromium)")
def test_playground_chat_shows_policy_and_rule(url):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(f"{url}/")  # redirects to /playground
            assert page.title() == "MOSAIC playground"
            # a wrong key is reported, not crashed on
            page.fill("#key", "sk-wrong")
            page.click("#load")
            page.wait_for_selector("#error:has-text('HTTP 401')")
            # the venue key: adult profile with a betting floor
            page.fill("#key", KEYS["venue"])
            page.click("#load")
            page.wait_for_selector("#categories input[value='alcohol']")
            assert "floor: betting" in page.inner_text("#who")
            assert page.is_disabled("#categories input[value='betting']")  # the floor cannot be unticked
            page.select_option("#profile", "teen-eu")
            page.check("#categories input[value='horror']")
            page.fill("#message", "Tell me a scary horror story")
            page.fill("#max", "6")
            page.click("#send")
            page.wait_for_selector("#log .policy")
            assert page.inner_text("#log .policy") == "addiction, alcohol, betting, horror, sex"
            assert page.inner_text("#log .rule") == "not refused"  # the random tiny model never refuses
            assert "you: Tell me a scary horror story" in page.inner_text("#log")
            # an invalid choice shows the server's message
            page.select_option("#profile", "adult")
            page.uncheck("#categories input[value='horror']")
            page.evaluate("document.querySelector('#profile').add(new Option('Kids', 'Kids'))")
            page.select_option("#profile", "Kids")
            page.fill("#message", "hi")
            page.click("#send")
            page.wait_for_selector("#error:has-text('valid profiles')")
        finally:
            browser.close()
