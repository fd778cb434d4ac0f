"""Shared fixtures over the test doubles of :mod:`saesteer.testing` (the tiny random model and SAEs, a Gemma
Scope 2 SAE in a local hub cache), the app's modes under AppTest, and a network guard.

Nothing here downloads anything.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from saesteer.models import LoadedModel
from saesteer.paths import FIXTURE_ENV, ROOTS_ENV
from saesteer.saes import LoadedSae
from saesteer.testing import WORDS, make_tiny_model, make_tiny_sae, tiny_feature_data


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_lm() -> LoadedModel:
    return make_tiny_model()


@pytest.fixture(scope="session")
def tiny_sae() -> LoadedSae:
    return make_tiny_sae()


@pytest.fixture(scope="module")
def word_bank():
    """(model, SAE, FeatureBank): the tiny model, a layer-1 SAE and its bank over the fixture's ``WORDS``, for
    candidate selection (the duel, the presets)."""
    from saesteer.evaluation import FeatureBank

    lm = make_tiny_model()
    sae = make_tiny_sae(layer=1, seed=1)
    return lm, sae, FeatureBank.from_feature_data(tiny_feature_data(lm, sae, WORDS))


@pytest.fixture(scope="session")
def embedded_lm():
    """The real embedded Gemma 3 270M (first load in a fresh cache takes about two minutes)."""
    from saesteer.models import load_model

    return load_model()


# ---------------------------------------------------------------------------------------------------
# The app under AppTest (tests/test_app.py, tests/test_guarantees.py, tests/test_bad_input.py)


@pytest.fixture
def fixture_env(monkeypatch):
    """The app on the tiny test fixture (SAESTEER_TEST_FIXTURE=tiny), offline."""
    monkeypatch.setenv(FIXTURE_ENV, "tiny")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield


@pytest.fixture
def real_mode(monkeypatch, tmp_path):
    """The app's real loaders, with the hub forced offline so nothing is downloaded; the test's tmp_path is an
    allowed root for paths typed into the sidebar."""
    import huggingface_hub.constants as hub_constants

    monkeypatch.delenv(FIXTURE_ENV, raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv(ROOTS_ENV, str(tmp_path))
    yield


# ---------------------------------------------------------------------------------------------------
# Network guard and an empty offline hub cache (tests/test_gemmascope.py, tests/test_app_gemmascope.py)

@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails at once and is recorded."""
    import socket

    attempts = []

    def refuse(self, address, *args, **kwargs):
        attempts.append(address)
        raise OSError(f"network access refused in this test: {address!r}")

    def no_lookup(host, *args, **kwargs):
        attempts.append(host)
        raise socket.gaierror(f"name lookup refused in this test: {host!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", no_lookup)
    return attempts


@pytest.fixture
def scope_hub(monkeypatch, tmp_path):
    """An empty local hub cache in tmp_path, with the hub client in offline mode (what HF_HUB_CACHE and
    HF_HUB_OFFLINE=1 set at import)."""
    import huggingface_hub.constants as hub_constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return cache
