"""Remake the README's screenshot of the concept duel: start the app on the embedded model, open the duel in
the presenter view through its URL, wait until the three columns, the verdict and the strength strip are
done, and save the page to ``assets/screenshots/duel.png`` (headless Chromium, Debian's ``/usr/bin/chromium``).

    nice -n 10 python scripts/screenshot_duel.py [--concept water] [--layer 2] [--seed 0] [--out assets/screenshots/duel.png]
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.parse
from pathlib import Path

from saesteer.appserver import CHROME_ARGS, CHROMIUM, AppDidNotStart, app_env, running_app
from saesteer.paths import FIXTURE_ENV

ROOT = Path(__file__).resolve().parents[1]


def wait_until_still(page, deadline: float, quiet_s: float = 5.0) -> None:
    """Wait until the page's text has not changed for ``quiet_s`` seconds (the strip streams after the verdict;
    Streamlit's own status widget is not a reliable end signal: it stayed on the page after the run here)."""
    last, since = None, time.time()
    while time.time() < deadline:
        text = page.inner_text("body")
        if text != last:
            last, since = text, time.time()
        elif time.time() - since >= quiet_s:
            return
        page.wait_for_timeout(500)
    raise TimeoutError("the duel page kept changing until the deadline")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concept", default="water")
    ap.add_argument("--layer", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--strength", type=float, default=None, help="paper amp; default: the page's own default strength")
    ap.add_argument("--out", type=Path, default=ROOT / "assets" / "screenshots" / "duel.png")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds to wait for the app and the run")
    ap.add_argument("--width", type=int, default=1600)
    ap.add_argument("--height", type=int, default=2300, help="viewport height: Streamlit scrolls inside the page, so the shot is the viewport")
    args = ap.parse_args()

    from playwright.sync_api import sync_playwright

    args.out.parent.mkdir(parents=True, exist_ok=True)
    log_path = args.out.with_suffix(".log")
    deadline = time.time() + args.timeout
    try:
        with running_app(ROOT, app_env(ROOT, {FIXTURE_ENV: None}), log_path, args.timeout) as base:
            query = {"layer": args.layer, "concept": args.concept, "seed": args.seed, "present": 1}
            if args.strength is not None:
                query["strength"] = f"{args.strength:g}"
            url = f"{base}/Concept_duel?{urllib.parse.urlencode(query)}"
            print("opening", url)
            ms = int(max(1.0, deadline - time.time()) * 1000)
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROME_ARGS, headless=True)
                page = browser.new_page(viewport={"width": args.width, "height": args.height})
                page.goto(url)
                try:
                    page.wait_for_selector("text=Verdict.", timeout=ms)
                    page.wait_for_selector("text=Strength strip", state="attached", timeout=ms)  # two matches: one is hidden
                    wait_until_still(page, deadline)
                except Exception:
                    page.screenshot(path=str(args.out.with_suffix(".timeout.png")), full_page=True)
                    print("the duel did not finish in time; the page showed:\n" + page.inner_text("body")[-3000:], file=sys.stderr)
                    raise
                page.screenshot(path=str(args.out), full_page=True)
                verdict = page.locator("p", has_text="Verdict.").first.inner_text()
                browser.close()
            print(f"saved {args.out} ({args.out.stat().st_size / 1e3:.0f} kB)")
            print(verdict)
            return 0
    except AppDidNotStart as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
