"""Screenshots of the web console for the README (docs/screenshots/*.png), taken in Debian's chromium.

    .venv/bin/python examples/console_screenshots.py            # the default model, ~5 minutes on 2 cores

Starts `softprompt serve` on the default model with a fresh store holding the sentiment and
arithmetic prompts train_bench.py trained (bench/results, with their curves), then drives the
console as a user would: the prompts page, a version, a comparison on 48 held-out reviews, a
short training job started from the page, and the playground; one screenshot of each.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from core.modeling import load_frozen_model  # noqa: E402
from devtools.local_servers import start_server, stop_at_exit  # noqa: E402
from devtools.postgres import free_port  # noqa: E402
from prompt_store import open_store  # noqa: E402
from trainer.data import jsonl_lines  # noqa: E402
from trainer.loop import init_embeddings  # noqa: E402

OUT = ROOT / "docs" / "screenshots"
KEY = "screenshot-key"
RESULTS = {"sentiment": "embedgrad-lr0.003", "arithmetic": "embedgrad-lr0.01"}


def publish_bench_prompts(store_root: str) -> None:
    """train_bench's chosen prompts, with the metrics and curve it recorded."""
    frozen = load_frozen_model("default")
    with open_store(store_root) as store:
        for name, run in RESULTS.items():
            summary = json.loads((ROOT / "bench" / "results" / name / f"{run}.json").read_text())
            vectors = torch.load(ROOT / "bench" / "results" / name / f"{run}.pt")
            init = init_embeddings(frozen, summary["config"]["init_text"])
            metrics = dict(summary["metrics"], cosines=torch.cosine_similarity(vectors, init, dim=-1).tolist())
            metrics["curve"] = [
                {k: r[k] for k in ("step", "loss", "val_metric") if r.get(k) is not None} for r in summary["history"]
            ]
            store.publish(
                name,
                vectors,
                fingerprint=frozen.fingerprint,
                base_model=frozen.base_model,
                init_text=summary["config"]["init_text"],
                training_config=summary["config"],
                metrics=metrics,
            )
        store.set_alias("sentiment-prod", "sentiment-v1")


def first_lines(path: Path, n: int) -> str:
    """The first n JSONL records (a review may hold U+2028: jsonl_lines splits on line feeds only)."""
    return "\n".join(jsonl_lines(path.read_text())[:n]) + "\n"


def main() -> int:
    from playwright.sync_api import sync_playwright

    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder, ExitStack() as stack:
        store = f"{folder}/store"
        publish_bench_prompts(store)
        reviews = Path(folder) / "reviews.jsonl"
        reviews.write_text(first_lines(ROOT / "examples" / "data" / "sentiment.test.jsonl", 48))
        train = Path(folder) / "train.jsonl"
        train.write_text(first_lines(ROOT / "examples" / "data" / "sentiment.train.jsonl", 64))
        port = free_port()
        stop_at_exit(
            stack,
            start_server(
                store,
                Path(folder) / "server",
                port,
                threads=2,
                env={"SOFTPROMPT_API_KEY": KEY, "SOFTPROMPT_TRAIN_THREADS": "1"},
            ),
        )
        base = f"http://127.0.0.1:{port}/ui"
        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(180_000)
            try:
                drive(browser, page, base, reviews, train)
            except Exception:
                failed = Path(tempfile.gettempdir()) / "console-failed.png"
                page.screenshot(path=failed, full_page=True)
                print(f"the page as it stood: {failed}", file=sys.stderr)
                print(page.locator("main").inner_text(), file=sys.stderr)
                print((Path(folder) / "server" / "server.log").read_text()[-4000:], file=sys.stderr)
                raise
            browser.close()
    for path in sorted(OUT.glob("*.png")):
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


def drive(browser, page, base: str, reviews: Path, train: Path) -> None:
    """The console as a user walks through it, one screenshot a page."""
    page.goto(f"{base}#/prompts")
    page.get_by_label("Admin key").fill(KEY)
    page.get_by_role("button", name="Use").click()
    page.get_by_role("link", name="sentiment-v1", exact=True).first.wait_for()
    page.screenshot(path=OUT / "prompts.png", full_page=True)
    page.goto(f"{base}#/prompts/sentiment-v1")
    page.get_by_role("img", name="Training curve").wait_for()
    page.screenshot(path=OUT / "version.png", full_page=True)
    page.goto(f"{base}#/compare")
    page.get_by_role("checkbox", name="sentiment-v1").check()
    page.get_by_label("Text prompts").fill("Classify the sentiment of this review as positive or negative.")
    page.get_by_label("also the bare model").check()
    page.get_by_label("Labeled JSONL").set_input_files(str(reviews))
    page.get_by_role("button", name="Run the comparison").click()
    page.get_by_role("table", name="Scores with 95 % intervals").wait_for()
    page.screenshot(path=OUT / "compare.png", full_page=True)
    page.goto(f"{base}#/jobs")
    page.get_by_label("Training data").set_input_files(str(train))
    page.get_by_label("Prompt name to publish").fill("reviews")
    page.get_by_label("Init text").fill("Classify the sentiment of this review as positive or negative.")
    page.get_by_label("Steps").fill("6")
    page.get_by_role("button", name="Start training").click()
    page.locator("[data-progress] progress[value='3']").first.wait_for()
    page.screenshot(path=OUT / "jobs.png", full_page=True)
    page.get_by_role("link", name="reviews-v1").wait_for()
    page.goto(f"{base}#/playground")
    page.get_by_label("Input").fill("A gorgeous, witty and moving film.")
    page.get_by_label("Max new tokens").fill("8")
    for ref in ("sentiment-v1", "reviews-v1"):
        page.get_by_role("checkbox", name=ref, exact=True).check()
    page.get_by_role("button", name="Send").click()
    for label in ("(bare model)", "sentiment-v1", "reviews-v1"):
        page.locator(f"[data-answer='{label}'] + p", has_text="tokens in").wait_for()
    page.screenshot(path=OUT / "playground.png", full_page=True)
    narrow = browser.new_page(viewport={"width": 390, "height": 844})
    narrow.goto(f"{base}#/prompts")
    narrow.get_by_role("link", name="sentiment-v1", exact=True).first.wait_for()
    narrow.screenshot(path=OUT / "prompts-narrow.png")


if __name__ == "__main__":
    sys.exit(main())
