"""Peak-latent diagnostics on the pages: the sidebar's line (measured on request for a non-bundled SAE) and the
plain-words meaning of a paper-mode amp in the lab and on the feature card, checked against the library."""

from __future__ import annotations

import re

from test_app import app, no_exception, texts

from saesteer import diagnostics
from saesteer.config import NEUTRAL_PROMPT
from saesteer.testing import make_tiny_model, make_tiny_sae
from saesteer.ui.diagnostics_panel import MEASURE_TOKENS
from saesteer.ui.nav import PAGES


def _layer(at) -> int:
    shown = "\n".join(c.value for c in at.sidebar.caption)
    return int(re.search(r"SAE \*\*tiny-topk-L(\d+)\*\*", shown).group(1))


def test_sidebar_measures_a_non_bundled_sae_on_request(fixture_env):
    at = app().run()
    no_exception(at)
    assert any("Peak-latent diagnostics: not measured" in c.value for c in at.sidebar.caption)
    at.sidebar.button(key="sb_diag_measure").click().run()
    no_exception(at)
    layer = _layer(at)
    want = diagnostics.measure(make_tiny_model(), make_tiny_sae(layer=layer, seed=layer), MEASURE_TOKENS)
    assert any(want.summary() in c.value for c in at.sidebar.caption), [c.value for c in at.sidebar.caption]
    at.switch_page(PAGES["layers"].path).run()  # the measurement is kept for the session across pages
    no_exception(at)
    assert any(want.summary() in c.value for c in at.sidebar.caption)


def test_lab_and_card_say_what_a_paper_amp_adds(fixture_env):
    at = app().run()
    layer = _layer(at)
    at.switch_page(PAGES["lab"].path).run()
    no_exception(at)
    lm, sae = make_tiny_model(), make_tiny_sae(layer=layer, seed=layer)
    latent = diagnostics.prompt_strength(lm, sae, NEUTRAL_PROMPT).latent
    line = re.search(r"Feature (\d+): Amp ([\d.]+) adds (\d+) % of the residual norm here, set by latent (\d+), which fires on", texts(at))
    assert line, texts(at)
    feature, amp = int(line.group(1)), float(line.group(2))
    assert int(line.group(4)) == latent
    ps = diagnostics.prompt_strength(lm, sae, NEUTRAL_PROMPT)
    assert int(line.group(3)) == round(100 * amp * ps.amp1_share(float(sae.directions([feature]).norm())))

    at.switch_page(PAGES["card"].path).run()
    no_exception(at)
    assert re.search(rf"At this amplification: Amp 10 adds \d+ % of the residual norm here, set by latent {latent}, ", texts(at)), texts(at)


def test_the_diagnostics_cache_key_follows_the_weights_not_the_object():
    from saesteer.ui.diagnostics_panel import _key

    sae = make_tiny_sae(layer=1, seed=1)
    twin = make_tiny_sae(layer=1, seed=1)  # the same weights in another object (an id() key told them apart)
    other = make_tiny_sae(layer=1, seed=2)  # the same name, other weights
    assert _key("tiny", sae) == _key("tiny", twin) != _key("tiny", other)
