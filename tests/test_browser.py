"""End to end in real headless Chromium: ``streamlit run app.py`` on the tiny test fixture.

Loads every page, checks that no exception or error box appears, that an HTML prompt and HTML-like tokens
are shown as text (no script runs, no dialog fires), that the sidebar keeps its state across in-app
navigation, and that a steering run streams text. Screenshots go to ``test-artifacts/``.
"""

from __future__ import annotations

import urllib.parse
from pathlib import Path

import pytest

from saesteer.appserver import CHROME_ARGS, CHROMIUM, AppDidNotStart, app_env, running_app
from saesteer.paths import FIXTURE_ENV
from saesteer.ui.nav import PAGES as NAV

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
#: URL path -> the page's heading: every page of ``nav.PAGES`` (the start page's heading is not its nav title).
PAGES = {info.url_path: "SAEs are good for steering" if key == "home" else info.title for key, info in NAV.items()}
XSS = ["<script>alert(1)</script>", "<img src=x onerror=alert(1)>"]
STARTUP_S = 180
RENDER_MS = 120_000

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def server():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium to run the browser test")
    pytest.importorskip("playwright.sync_api", reason="pip install playwright==1.65.2")
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        with running_app(ROOT, app_env(ROOT, {FIXTURE_ENV: "tiny"}), ARTIFACTS / "streamlit.log", STARTUP_S) as base:
            yield base
    except AppDidNotStart as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROME_ARGS, headless=True)
        yield b
        b.close()


def _settle(page) -> None:
    """Wait until the script run is over (no running indicator) and the main block has content."""
    page.wait_for_selector('[data-testid="stMain"] h1', timeout=RENDER_MS)
    page.wait_for_function(
        "() => !document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=RENDER_MS
    )
    page.wait_for_timeout(500)


def _assert_clean(page, name: str) -> None:
    dialogs = page.locator('[role="dialog"]')
    assert dialogs.count() == 0, f"{name}: a modal is open: {dialogs.first.inner_text()!r}"
    text = page.inner_text("body")
    assert "Traceback" not in text, f"{name}: a traceback is shown"
    assert page.locator('[data-testid="stException"]').count() == 0, f"{name}: an exception box is shown"
    errors = page.locator('[data-testid="stAlertContentError"]')
    assert errors.count() == 0, f"{name}: error boxes: {[errors.nth(i).inner_text() for i in range(errors.count())]}"


def test_every_page_in_chromium(server, browser):
    page = browser.new_page(viewport={"width": 1500, "height": 1100})
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    console_errors: list[str] = []
    page.on("pageerror", lambda e: console_errors.append(str(e)))

    for url_path, title in PAGES.items():
        page.goto(f"{server}/{url_path}")
        _settle(page)
        assert page.locator("h1", has_text=title).count() >= 1, f"{url_path}: title {title!r} missing"
        _assert_clean(page, url_path)
        page.screenshot(path=str(ARTIFACTS / f"page-{url_path or 'start'}.png"), full_page=True)
    assert dialogs == [], f"a dialog fired: {dialogs}"
    assert not any("alert" in e for e in console_errors)
    page.close()


def _no_script_ran(page, dialogs: list[str], console_errors: list[str], name: str) -> None:
    main = page.locator('[data-testid="stMain"]')
    assert main.locator('img[src="x"]').count() == 0, f"{name}: an <img> was created from text"
    assert page.locator("script:not([src])").filter(has_text="alert(1)").count() == 0, f"{name}: a <script> was created from text"
    assert page.evaluate("() => window.__alerts") == [], f"{name}: alert() was called"
    assert dialogs == [], f"{name}: a dialog fired: {dialogs}"
    assert not any("alert" in e for e in console_errors), console_errors


def test_html_like_prompt_and_contexts_show_literally_in_chromium(server, browser):
    """Guarantee 4, HTML (tests/test_guarantees.py): HTML typed as a prompt, and HTML-like tokens in a feature's
    top contexts, are shown as literal text and run nothing."""
    page = browser.new_page(viewport={"width": 1500, "height": 1100})
    page.add_init_script("window.__alerts = []; window.alert = (m) => window.__alerts.push(String(m));")
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    console_errors: list[str] = []
    page.on("pageerror", lambda e: console_errors.append(str(e)))

    # The prompt comes in through the link (anyone can send one) and is rendered in both text boxes.
    prompt = f"{XSS[0]} and {XSS[1]}"
    page.goto(f"{server}/Steering_lab?prompt={urllib.parse.quote(prompt)}")
    _settle(page)
    page.get_by_role("button", name="Generate").click()
    page.wait_for_selector("text=first steered token", timeout=RENDER_MS)
    _settle(page)
    _assert_clean(page, "steering lab with an HTML prompt")
    shown = page.locator('[data-testid="stMain"] span', has_text=prompt)
    assert shown.count() >= 2, "the prompt is not shown literally in the baseline and steered boxes"
    assert shown.first.inner_text() == prompt
    _no_script_ran(page, dialogs, console_errors, "steering lab")
    page.screenshot(path=str(ARTIFACTS / "steering-lab-html-prompt.png"), full_page=True)

    # The feature card opens on the top feature by output score, where the fixture plants a context made of
    # HTML-like tokens.
    page.goto(f"{server}/Feature_card")
    _settle(page)
    page.get_by_role("tab", name="Top contexts").click()
    page.wait_for_timeout(500)
    for s in XSS:
        assert page.get_by_text(s, exact=True).first.is_visible(), f"{s!r} is not shown literally"
    _no_script_ran(page, dialogs, console_errors, "feature card")
    page.screenshot(path=str(ARTIFACTS / "feature-card-contexts.png"), full_page=True)
    page.close()


def test_sidebar_state_survives_navigation_and_steering_streams(server, browser):
    page = browser.new_page(viewport={"width": 1500, "height": 1100})
    page.goto(f"{server}/Layers_overview")
    _settle(page)
    sidebar = page.locator('[data-testid="stSidebar"]')
    sidebar.locator('[data-testid="stSelectbox"]').first.click()
    page.get_by_role("option", name="layer 3 · tiny-topk-L3 (test fixture)").click()
    _settle(page)
    assert "layer 3" in sidebar.inner_text()
    assert "sae=tiny-topk-L3" in page.url

    sidebar.get_by_role("link", name="Steering lab").click()
    page.wait_for_selector('h1:has-text("Steering lab")', timeout=RENDER_MS)
    _settle(page)
    assert "tiny-topk-L3" in sidebar.inner_text(), "the layer picked on another page was lost"
    page.get_by_role("button", name="Generate").click()
    page.wait_for_selector("text=first steered token", timeout=RENDER_MS)
    _settle(page)
    _assert_clean(page, "steering lab after Generate")
    assert page.get_by_text("Steered", exact=True).count() >= 1
    page.screenshot(path=str(ARTIFACTS / "steering-lab-generated.png"), full_page=True)
    page.close()


def _concept_with_both_picks(theta: float) -> str:
    """A word of the tiny fixture (the server's layer 1) with an activation pick and a different output pick."""
    from saesteer.testing import WORDS, make_tiny_model, make_tiny_sae, tiny_feature_data
    from saesteer import duel
    from saesteer.evaluation import CandidateParams, FeatureBank

    lm, sae = make_tiny_model(), make_tiny_sae(layer=1, seed=1)
    bank = FeatureBank.from_feature_data(tiny_feature_data(lm, sae, WORDS))
    for w in sorted({w for w in WORDS if w.isalpha()}):
        p = duel.plan(duel.candidates(lm, bank, w, CandidateParams(theta=theta)))
        if len(p.columns) == 3 and not p.same_feature:
            return w
    pytest.fail(f"no fixture word has two different picks at theta {theta}")


def test_concept_duel_streams_three_columns_in_chromium(server, browser, tmp_path):
    """Type a concept, run the duel: three streamed columns with their counters, a verdict, the strength strip."""
    theta = 0.2  # random tiny features rarely fire mostly on one word; the page's own threshold setting
    concept = _concept_with_both_picks(theta)
    page = browser.new_page(viewport={"width": 1500, "height": 1100})
    page.goto(f"{server}/Concept_duel?layer=1")
    _settle(page)
    page.get_by_text("More settings").click()
    box = page.get_by_role("spinbutton", name="Fires on the concept")  # the number field, not its help button
    box.fill(str(theta))
    box.press("Enter")
    _settle(page)
    field = page.get_by_label("Concept", exact=True)
    field.fill(concept)
    field.press("Enter")
    page.wait_for_selector(f"text=Verdict.", timeout=RENDER_MS)
    _settle(page)
    _assert_clean(page, "concept duel")
    main = page.locator('[data-testid="stMain"]')
    columns = main.locator("div.saesteer-text")
    assert columns.count() == 3, f"{columns.count()} text columns, expected baseline, activation pick and output pick"
    prompt = "From my experience,"
    assert all(len(columns.nth(i).inner_text()) > len(prompt) for i in range(3)), "a column streamed no text"
    for title in ("Baseline (no steering)", "What fires on it (activation pick)", "What says it (output pick)"):
        assert main.get_by_text(title, exact=False).count() >= 1, f"column {title!r} missing"
    assert main.get_by_text(f"“{concept}” said", exact=False).count() >= 3, "a column has no concept counter"
    try:  # the URL follows the typed concept once the page's closing sync reaches the browser
        page.wait_for_url(f"**concept={concept}**", timeout=15_000)
    except Exception:
        pass
    assert "concept=" + concept in page.url
    shot = tmp_path / "duel.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    page.close()
