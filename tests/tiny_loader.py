"""A picklable loader of the tiny test model and SAEs, for Ray workers (they rebuild them from seeds)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TinyLoader:
    """Builds ``conftest.make_tiny_model()``; an SAE ref is (arch, layer, seed, width)."""

    def model(self):
        from conftest import make_tiny_model

        return make_tiny_model()

    def sae(self, ref, lm):
        from conftest import make_tiny_sae

        arch, layer, seed, width = ref
        sae = make_tiny_sae(d_sae=width, layer=layer, arch=arch, seed=seed)
        sae.id = f"tiny-{arch}-L{layer}-s{seed}"
        return sae
