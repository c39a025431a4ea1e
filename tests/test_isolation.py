"""The suite does not depend on the developer's shell or working directory (`.ci/run` runs it
with a `.env` and an exported API_KEYS)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from comfyfleet.settings import Settings
from tests.conftest import SETTING_VARIABLES
from tests.support import child_env, serve_env


def test_tests_see_no_setting_of_the_caller_and_no_env_file() -> None:
    assert not [name for name in os.environ if name.lower() in SETTING_VARIABLES]
    assert not Path(".env").exists()
    assert Settings() == Settings(_env_file=None)
    assert Settings().api_keys == []


def test_a_started_service_gets_only_what_python_needs_and_its_own_settings(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("API_KEYS", "exported-by-the-developer")
    monkeypatch.setenv("AWS_PROFILE", "the-developers")
    env = serve_env(settings, tmp_path, 8000, COMFYUI_ENDPOINTS="")
    assert "API_KEYS" not in env and "AWS_PROFILE" not in env
    assert env["COMFYUI_ENDPOINTS"] == ""
    assert env["PATH"] == os.environ["PATH"]
    assert child_env(API_KEYS="chosen")["API_KEYS"] == "chosen"
