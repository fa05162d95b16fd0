"""Shared pytest fixtures (modules opt in: ``pytestmark = pytest.mark.usefixtures(...)``)."""

from __future__ import annotations

import warnings

import pytest


@pytest.fixture
def quiet():
    """No warnings shown during the test (Lightning's advice on workers, logging
    intervals and the like, which these tiny runs trigger by design)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
