"""Is the SAE's largest latent a real feature? Dense latents and what sets paper-mode strength.

The paper's steering and output score use ``max_j a_j(x)`` as the unit of strength. When the largest latent
at most tokens is one that fires on every token (it carries what all tokens share, e.g. Gemma 3's massive
dimensions, which belongs in the decoder bias), that unit is inflated: amp 1 already adds a large share of the
residual norm. :func:`diagnose` measures this on any SAE from residuals of text it was not trained on, and
:func:`prompt_strength` says which latent sets the strength at a prompt and what amp 1 means there.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from .models import LoadedModel
from .saes import LoadedSae
from .steering import capture_residuals, run_until_stop

DENSE = 0.5
"""A latent firing on more than this share of tokens is 'dense' (bias-like)."""


@dataclass(frozen=True)
class DenseLatent:
    latent: int
    density: float
    """Share of the measured tokens on which it fires."""
    peak_share: float
    """Share of the measured tokens at which it is the largest latent."""
    norm_share: float
    """Median over the tokens where it fires of a_f · ‖d_f‖ / ‖x‖ (its share of the residual norm)."""


@dataclass(frozen=True)
class SaeDiagnostics:
    sae_id: str
    layer: int
    n_tokens: int
    """Tokens (BOS excluded) the figures are measured on."""
    dense_threshold: float
    dense_latents: list[DenseLatent]
    """Latents of density > ``dense_threshold``, most frequent peak first (at most ``max_listed``)."""
    n_dense: int
    peak_is_dense: float
    """Share of tokens whose largest latent is dense."""
    median_peak_share: float
    """Median over tokens of max_j a_j · ‖d_peak‖ / ‖x‖: what amp 1 adds along the peak latent's own direction."""
    median_peak_density: float
    """Median over tokens of the density of that token's peak latent."""

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """One plain sentence for a page or a log."""
        verdict = "a bias-like latent" if self.peak_is_dense >= 0.5 else "a real feature"
        return (f"At {100 * (1 - self.peak_is_dense):.0f} % of {self.n_tokens} held-out tokens the largest latent fires on at most "
                f"{100 * self.dense_threshold:.0f} % of tokens ({self.n_dense} latents are denser); the peak is usually {verdict}, "
                f"and its median share of the residual norm is {100 * self.median_peak_share:.0f} %.")


def direction_norms(sae: LoadedSae) -> torch.Tensor:
    """‖decode(e_f) − decode(0)‖ for every latent: (d_sae,) float32, in chunks (run-time normalisation safe)."""
    out = []
    for start in range(0, sae.width, 4096):
        ids = list(range(start, min(start + 4096, sae.width)))
        out.append(sae.directions(ids).float().norm(dim=1))
    return torch.cat(out)


@torch.no_grad()
def diagnose(sae: LoadedSae, resid: torch.Tensor, dense_threshold: float = DENSE, max_listed: int = 10,
             batch: int = 8192) -> SaeDiagnostics:
    """Dense latents and the peak latent's share of the residual norm over ``resid`` (tokens, d_model),
    residuals at the SAE's hook of text the SAE did not train on (BOS excluded)."""
    if resid.ndim != 2 or len(resid) == 0:
        raise ValueError(f"diagnose needs residuals of shape (tokens, d_model) with tokens > 0, got {tuple(resid.shape)}")
    dtype = sae.sae.W_dec.dtype
    norms = direction_norms(sae)
    fired = torch.zeros(sae.width, dtype=torch.float64)
    peaks, peak_vals, x_norms = [], [], []

    def encoded():
        for i in range(0, len(resid), batch):
            x = resid[i : i + batch].to(sae.sae.W_dec.device, dtype)
            yield sae.sae.encode(x).float().cpu(), x.float().norm(dim=1).cpu()  # (tokens, d_sae), (tokens,)

    for a, xn in encoded():
        fired += (a > 0).sum(0).double()
        val, idx = a.max(dim=1)
        peaks.append(idx)
        peak_vals.append(val)
        x_norms.append(xn)
    density = (fired / len(resid)).numpy()
    peak = torch.cat(peaks).numpy()
    share = (torch.cat(peak_vals) * norms[torch.cat(peaks)] / torch.cat(x_norms).clamp_min(1e-12)).numpy()
    peak_density = density[peak]
    dense_ids = np.flatnonzero(density > dense_threshold)
    peak_counts = np.bincount(peak, minlength=sae.width)
    listed = sorted(dense_ids, key=lambda f: (-peak_counts[f], -density[f]))[:max_listed]
    shares: dict[int, list[torch.Tensor]] = {int(f): [] for f in listed}
    if listed:  # a second pass, so that only the listed latents' columns are kept
        for a, xn in encoded():
            for f in shares:
                shares[f].append((a[:, f] * norms[f] / xn.clamp_min(1e-12))[a[:, f] > 0])
    latents = []
    for f, parts in shares.items():
        s = torch.cat(parts)
        latents.append(DenseLatent(f, float(density[f]), float(peak_counts[f] / len(peak)), float(np.median(s.numpy())) if len(s) else 0.0))
    return SaeDiagnostics(
        sae_id=sae.id, layer=sae.layer, n_tokens=len(resid), dense_threshold=dense_threshold, dense_latents=latents,
        n_dense=len(dense_ids), peak_is_dense=float((peak_density > dense_threshold).mean()),
        median_peak_share=float(np.median(share)), median_peak_density=float(np.median(peak_density)),
    )


def heldout_residuals(lm: LoadedModel, layers: list[int], sequences: np.ndarray, batch: int = 16) -> dict[int, torch.Tensor]:
    """Residuals (BOS dropped, flattened, float32 on the CPU) at ``layers`` for token-id rows ``sequences`` (BOS
    first): the bundle's own collection pass, under the model's lock since the model may be shared."""
    from .bundle import collect_in_memory

    with lm.lock:
        return {l: x.cpu() for l, x in collect_in_memory(lm, sequences, layers, batch=batch).items()}


@dataclass(frozen=True)
class PromptStrength:
    """What sets paper-mode strength at the last position of a prompt, and what amp 1 means there."""

    prompt: str
    latent: int
    """The largest latent at the last position: max_j a_j = a[latent]."""
    activation: float
    resid_norm: float
    """‖x‖ at the last position."""
    latent_density: float | None
    """The latent's density on the measured corpus, when known."""

    def amp1_share(self, direction_norm: float) -> float:
        """Share of the residual norm that amp 1 adds along a feature direction of norm ``direction_norm``."""
        return self.activation * direction_norm / max(self.resid_norm, 1e-12)

    def explain(self, direction_norm: float, amp: float = 1.0) -> str:
        """Plain words, e.g. 'amp 1 adds 59 % of the residual norm here, set by latent 480, which fires on every token'."""
        share = amp * self.amp1_share(direction_norm)
        if self.latent_density is None:
            how = "whose density is not measured"
        elif self.latent_density >= 0.99:
            how = "which fires on every token"
        elif self.latent_density > DENSE:
            how = f"which fires on {100 * self.latent_density:.0f} % of tokens (bias-like)"
        else:
            how = f"which fires on {100 * self.latent_density:.1f} % of tokens"
        return f"amp {amp:g} adds {100 * share:.0f} % of the residual norm here, set by latent {self.latent}, {how}"


@torch.no_grad()
def prompt_strength(lm: LoadedModel, sae: LoadedSae, prompt: str, density: np.ndarray | None = None) -> PromptStrength:
    """The latent that sets ``max_j a_j`` at the last position of ``prompt`` (with BOS), as paper-mode steering
    and the output score see it."""
    ids = lm.tokenizer(prompt, return_tensors="pt").input_ids.to(lm.device)
    with lm.lock, capture_residuals(lm, [sae.layer], stop=True) as acts:
        run_until_stop(lambda: lm.model.model(input_ids=ids, use_cache=False))
    x = acts[sae.layer][:, -1].to(sae.sae.W_dec.dtype)  # (1, d_model)
    a = sae.sae.encode(x)[0].float()
    j = int(a.argmax())
    dens = None if density is None or not np.isfinite(density[j]) else float(density[j])
    return PromptStrength(prompt, j, float(a[j]), float(x.float().norm()), dens)


def from_dict(d: dict) -> SaeDiagnostics:
    """The inverse of :meth:`SaeDiagnostics.to_dict` (e.g. a bundled SAE's manifest entry)."""
    return SaeDiagnostics(**{**d, "dense_latents": [DenseLatent(**x) for x in d.get("dense_latents", [])]})


def heldout_sequences(lm: LoadedModel, n_tokens: int, context_size: int = 128) -> np.ndarray:
    """Token rows (BOS first) of the bundled corpus' held-out split, which no bundled SAE trained on."""
    from .bundle import tokenize_corpus
    from .corpus import iter_bundled

    return tokenize_corpus(lm.tokenizer, iter_bundled("heldout"), n_tokens, context_size)


def measure(lm: LoadedModel, sae: LoadedSae, n_tokens: int = 8192) -> SaeDiagnostics:
    """:func:`diagnose` on ``n_tokens`` held-out tokens of the bundled corpus, for any SAE of the model."""
    if n_tokens < 128:
        raise ValueError(f"n_tokens={n_tokens} is too few to measure densities: use at least 128")
    resid = heldout_residuals(lm, [sae.layer], heldout_sequences(lm, n_tokens))[sae.layer]
    return diagnose(sae, resid)


def bundled_diagnostics(model_name: str, sae_id: str) -> SaeDiagnostics | None:
    """The diagnostics a bundled SAE's manifest entry carries (measured when the bundle was built), or None."""
    from .saes import list_bundled

    for entry in list_bundled(model_name):
        if entry["id"] == sae_id and entry.get("diagnostics"):
            return from_dict(entry["diagnostics"])
    return None


def densities(features: np.ndarray, density: np.ndarray, width: int) -> np.ndarray:
    """A (width,) density vector from a feature table's ``feature`` and ``density`` columns (NaN where unknown)."""
    out = np.full(width, np.nan)
    out[np.asarray(features, dtype=np.int64)] = np.asarray(density, dtype=np.float64)
    return out


def explain_amps(ps: PromptStrength, sae: LoadedSae, features: list[int], amps: list[float]) -> list[str]:
    """:meth:`PromptStrength.explain` for each (feature, amp): what each paper-mode strength adds at the prompt."""
    norms = sae.directions(list(features)).float().norm(dim=1).tolist() if features else []
    return [ps.explain(n, a) for n, a in zip(norms, amps)]
