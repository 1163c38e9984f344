"""The vLLM release guard: the engine's internals are only trusted on the release they were written for."""

import pytest

from rollout.engines.vllm_version import OVERRIDE_ENV, TESTED, check_vllm_version, installed_vllm


@pytest.mark.parametrize("version", [f"{TESTED}.0", f"{TESTED}.3", f"{TESTED}.0+cpu"])
def test_the_tested_release_and_its_patches_pass(version):
    assert check_vllm_version(version) == version


@pytest.mark.parametrize("version", ["0.33.0", "0.31.2", "1.32.0", "unknown"])
def test_another_release_fails_naming_both_versions_and_the_way_out(version, monkeypatch):
    monkeypatch.delenv(OVERRIDE_ENV, raising=False)
    with pytest.raises(RuntimeError) as err:
        check_vllm_version(version)
    text = str(err.value)
    assert f"vLLM {version} is installed" in text
    assert f"{TESTED}.x" in text and "pause_generation" in text and OVERRIDE_ENV in text


def test_the_override_lets_an_untested_release_through(monkeypatch):
    monkeypatch.setenv(OVERRIDE_ENV, "1")
    assert check_vllm_version("0.33.0") == "0.33.0"


def test_the_installed_vllm_is_the_tested_release():
    # The `cpu` extra pins it; a drift here means pyproject.toml and rollout/engines/vllm_version.py disagree.
    assert check_vllm_version(installed_vllm())
