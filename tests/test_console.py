"""The web console at /ui driven in a real headless browser (Debian's chromium through Playwright)
against a real server on the tiny model: listing, moving an alias, training from the page,
comparing (the same numbers as `softprompt eval`) and the playground, on both store backends."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time

import httpx
import pytest
import uvicorn

from devtools.postgres import free_port
from prompt_store import open_store
from server.app import create_app
from tests.http_helpers import make_settings, mixing, publish  # noqa: F401
from tests.jobs_helpers import SENTIMENT, jsonl, save_tiny_model

pytestmark = [pytest.mark.browser, pytest.mark.processes]

KEY = "console-key"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
INSTALL = "Debian's chromium was not found: apt-get install chromium (`.ci/run` installs it)."


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail(INSTALL)
        pytest.skip(INSTALL)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        yield browser
        browser.close()


@pytest.fixture
def server(mixing, store_location, tmp_path):
    """A real server (uvicorn) on the tiny model, its jobs trained by processes loading the same model."""
    model = save_tiny_model(mixing, tmp_path / "model")
    settings = make_settings(
        tmp_path, store=store_location, model=model, api_key=KEY, jobs_dir=tmp_path / "jobs", max_new_tokens_limit=64
    )
    publish(store_location, mixing, "math", vectors=4, seed=0)
    publish(store_location, mixing, "math", vectors=6, seed=1)
    publish(store_location, mixing, "style", vectors=3, seed=2)
    with open_store(store_location) as store:
        store.set_alias("math-prod", "math-v1")
    app = create_app(settings, frozen=mixing)
    runner = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not runner.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{runner.config.port}"
    runner.should_exit = True
    thread.join(30)


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(f"{server}/ui")
    page.get_by_label("Admin key").fill(KEY)
    page.get_by_role("button", name="Use").click()
    page.get_by_text("key set for this tab").wait_for()
    yield page
    context.close()


def test_the_prompts_page_lists_versions_and_aliases_and_moves_an_alias(page, store_location):
    page.goto(page.url.split("#")[0] + "#/prompts")
    for version in ("math-v1", "math-v2", "style-v1"):
        page.get_by_role("link", name=version, exact=True).first.wait_for()
    assert page.title().startswith("Prompts")
    aliases = page.get_by_role("table", name="Aliases and the version each points at")
    assert "math-prod" in aliases.inner_text() and "math-v1" in aliases.inner_text()
    page.get_by_label("Alias", exact=True).fill("math-prod")
    page.get_by_label("Version", exact=True).select_option("math-v2")
    page.get_by_role("button", name="Point the alias here").click()
    page.get_by_text("math-prod now points at math-v2.").wait_for()
    with open_store(store_location) as store:
        assert store.aliases()["math-prod"] == "math-v2"
    page.get_by_role("link", name="math-v2", exact=True).first.click()
    page.get_by_role("heading", name="math-v2", exact=True).wait_for()
    assert page.title().startswith("math-v2") and "Fits the served model." in page.inner_text("main")


def test_a_training_job_started_from_the_page_shows_progress_and_ends_published(page, store_location, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_bytes(jsonl(SENTIMENT * 4))
    page.goto(page.url.split("#")[0] + "#/jobs")
    page.get_by_label("Training data").set_input_files(str(data))
    page.get_by_label("Prompt name to publish").fill("senti")
    page.get_by_label("Init text").fill("Classify the sentiment.")
    page.get_by_label("Steps").fill("6")
    page.get_by_role("button", name="Start training").click()
    page.get_by_role("link", name="senti-v1").wait_for(timeout=180_000)  # the state cell links the published version
    progress = page.locator("[data-progress] progress").first
    assert progress.get_attribute("value") == "6" and progress.get_attribute("max") == "6"
    with open_store(store_location) as store:
        assert [str(v.id) for v in store.versions("senti")] == ["senti-v1"]
    page.get_by_role("link", name="senti-v1").click()
    page.get_by_role("img", name="Training curve").wait_for()


def test_a_comparison_from_the_page_shows_the_numbers_softprompt_eval_gives(page, server, store_location, tmp_path):
    from server.cli import main as softprompt

    data = tmp_path / "sentiment.jsonl"
    data.write_bytes(jsonl(SENTIMENT * 3))
    page.goto(page.url.split("#")[0] + "#/compare")
    for version in ("math-v1", "style-v1"):
        page.get_by_role("checkbox", name=version).check()
    page.get_by_label("Text prompts").fill("Classify the sentiment.")
    page.get_by_label("also the bare model").check()
    page.get_by_label("Labeled JSONL").set_input_files(str(data))
    page.get_by_role("button", name="Run the comparison").click()
    scores = page.get_by_role("table", name="Scores with 95 % intervals")
    scores.wait_for(timeout=180_000)
    shown = {
        row.locator("td").nth(0).inner_text(): (
            row.locator("td").nth(1).inner_text(),
            row.locator("td").nth(2).inner_text(),
        )
        for row in scores.locator("tbody tr").all()
    }
    model = str(tmp_path / "model")
    out = tmp_path / "cli.json"
    assert (
        softprompt(
            [
                "eval",
                "--data",
                str(data),
                "--prompt",
                "math-v1",
                "--prompt",
                "style-v1",
                "--text",
                "Classify the sentiment.",
                "--bare",
                "--store",
                store_location,
                "--model",
                model,
                "--no-progress",
                "--no-record",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    table = json.loads(out.read_text())
    assert len(shown) == 4
    for result in table["results"]:
        low, high = result["ci95"]
        assert shown[result["reference"]] == (f"{100 * result['score']:.1f} %", f"[{100 * low:.1f}, {100 * high:.1f}]")


def test_the_playground_shows_one_answer_per_chosen_version(page, server):
    page.goto(page.url.split("#")[0] + "#/playground")
    page.get_by_label("Input").fill("What is two plus three?")
    page.get_by_label("Max new tokens").fill("6")
    for ref in ("math-v2", "math-prod"):
        page.get_by_role("checkbox", name=ref, exact=True).check()
    page.get_by_role("button", name="Send").click()
    for label in ("(bare model)", "math-v2", "math-prod"):
        page.locator(f"[data-answer='{label}'] + p", has_text="tokens in").wait_for()
    assert page.locator("section.card").count() == 3
    for prompt, label in ((None, "(bare model)"), ("math-v2", "math-v2"), ("math-prod", "math-prod")):
        expected = httpx.post(
            f"{server}/generate",
            params={"prompt": prompt} if prompt else None,
            timeout=60,
            json={"input": "What is two plus three?", "max_new_tokens": 6},
        ).json()["text"]
        assert page.locator(f"[data-answer='{label}']").inner_text() == expected


def test_the_pages_answer_a_narrow_screen_and_say_errors_as_the_api_words_them(browser, server):
    context = browser.new_context(viewport={"width": 375, "height": 800})
    page = context.new_page()
    try:
        page.goto(f"{server}/ui#/prompts")
        page.get_by_role("link", name="math-v1", exact=True).first.wait_for()
        assert page.evaluate("document.documentElement.scrollWidth") <= 375 + 1  # nothing wider than the screen
        page.on("dialog", lambda dialog: dialog.accept())  # no key in this tab: the API refuses
        page.get_by_role("button", name="Delete math-v1").click()
        alert = page.get_by_role("alert")
        alert.wait_for()
        assert "401 unauthorized" in alert.inner_text()
        page.goto(f"{server}/ui#/prompts/nope-v9")
        assert "No prompt named 'nope-v9'" in page.get_by_role("alert").inner_text()
    finally:
        context.close()
