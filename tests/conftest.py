"""Shared test fixtures."""
import pytest


@pytest.fixture
def clean_patch_state(monkeypatch):
    """No patching environment variables, and the registered rules restored after the test."""
    from accel.patching import rules as rules_mod

    for var in ("ACCEL_DISABLE", "ACCEL_PLUGINS", "ACCEL_DISABLE_PLUGINS"):
        monkeypatch.delenv(var, raising=False)
    saved = list(rules_mod._registered)
    yield
    rules_mod._registered[:] = saved
