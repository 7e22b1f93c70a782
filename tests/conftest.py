"""Shared test configuration: hypothesis profiles and the import path.

Profiles are chosen by the environment variable ``HYPOTHESIS_PROFILE``; under ``CI=true``
the default is ``ci`` (derandomized, so a CI failure reproduces exactly), elsewhere ``dev``.
The pytest markers, one per equation group, are declared in ``pytest.ini``.
"""
import os
import sys
from pathlib import Path

from hypothesis import HealthCheck, settings

# The modules are flat top-level files: make them importable however pytest is invoked.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

settings.register_profile(
    "ci", derandomize=True, deadline=None, max_examples=40,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, max_examples=150)
_default = "ci" if os.environ.get("CI", "").lower() == "true" else "dev"
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", _default))
