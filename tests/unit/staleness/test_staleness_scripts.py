"""``staleness.scripts``: the scripts' own error replies become the caller's errors, with
their messages; any other reply is left to Redis's error (no Redis: the scripts run on a real
server in tests/integration/test_version_manager.py)."""

from __future__ import annotations

import pytest

from staleness import scripts
from staleness.records import RunNotFound, VersionError


def test_norun_reply() -> None:
    err = scripts.script_error("r", "admit 1 for w", "SLUICE_NORUN run settings are missing")
    assert isinstance(err, RunNotFound)
    assert str(err) == "run 'r': admit 1 for w: the run's settings are missing"


def test_version_reply() -> None:
    err = scripts.script_error("r", "publish version 3", "SLUICE_VERSION 3 5")
    assert isinstance(err, VersionError)
    assert str(err) == (
        "run 'r': cannot publish version 3: the current version is 5 and versions only increase"
    )


def test_other_replies_are_not_ours() -> None:
    assert scripts.script_error("r", "x", "NOSCRIPT No matching script") is None
    assert scripts.script_error("r", "x", "LOADING Redis is loading the dataset") is None


@pytest.mark.parametrize(
    ("script", "markers"),
    [
        (scripts.ADMIT_LUA, {scripts.NORUN}),
        (scripts.PUBLISH_LUA, {scripts.NORUN, scripts.BAD_VERSION}),
        (scripts.ANNOUNCE_LUA, {scripts.BAD_VERSION}),
        (scripts.SET_ETA_LUA, {scripts.NORUN}),
    ],
)
def test_scripts_reply_with_the_markers_script_error_reads(script: str, markers: set[str]) -> None:
    for marker in markers:
        assert f"redis.error_reply('{marker} " in script


@pytest.mark.parametrize(
    "script",
    [scripts.ADMIT_LUA, scripts.RELEASE_LUA, scripts.DROP_LUA, scripts.PUBLISH_LUA],
)
def test_exactly_once_scripts_answer_a_retry_first(script: str) -> None:
    # the stored result under the request key is returned before anything is read or written
    first = script.strip().splitlines()[:2]
    assert first[0].startswith("local done = redis.call('GET', KEYS[")
    assert first[1].startswith("if done then return ")
