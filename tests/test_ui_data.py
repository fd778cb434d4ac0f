"""``saesteer.ui.data``: views of feature data the pages share."""

from __future__ import annotations

import torch

from saesteer.testing import make_tiny_sae
from saesteer.ui.data import live_lens_tokens


def test_live_lens_tokens_are_the_top_logits_of_the_feature_direction(tiny_lm):
    """Through ``scores.logit_lens``, equal to the obvious computation: unembed the decoder row, take the top k."""
    sae = make_tiny_sae(layer=2, seed=5)
    for feature in (0, 17, 127):
        with torch.no_grad():
            logits = tiny_lm.unembed(sae.directions([feature]).to(tiny_lm.device, tiny_lm.dtype))[0].float()
        want = [tiny_lm.tokenizer.decode([i]) for i in torch.topk(logits, 10).indices.tolist()]
        assert live_lens_tokens(tiny_lm, sae, feature, k=10) == want
    assert live_lens_tokens(tiny_lm, sae, 17, k=10) is live_lens_tokens(tiny_lm, sae, 17, k=10)  # cached per SAE
