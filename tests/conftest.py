"""Shared helpers for the dk-jax tests."""

import numpy as np
import pytest


def rel_err(actual, expected) -> float:
    """max |actual - expected| / max |expected| (normwise relative error)."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    scale = max(np.abs(expected).max(initial=0.0), 1e-30)
    return float(np.abs(actual - expected).max(initial=0.0) / scale)


@pytest.fixture
def rng():
    return np.random.default_rng(0)
