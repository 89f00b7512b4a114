"""settings_differ: the one warning a joining worker or trainer logs when its config's eta (or
batch_groups) is not the run's: both values, and that the run's win."""

from __future__ import annotations

from staleness.checks import settings_differ


def test_settings_differ() -> None:
    assert settings_differ("r", run_eta=2, config_eta=2) is None
    assert (
        settings_differ("r", run_eta=2, config_eta=2, run_batch_groups=4, config_batch_groups=4)
        is None
    )
    msg = settings_differ("r", run_eta=16, config_eta=2)
    assert msg is not None
    assert msg.startswith("run 'r' has eta=16 (the config says 2): using the run's, which wins")
    assert "sluice run set-eta N --run r" in msg
    both = settings_differ("r", run_eta=1, config_eta=3, run_batch_groups=8, config_batch_groups=4)
    assert (
        both is not None
        and "eta=1 (the config says 3) and batch_groups=8 (the config says 4)" in both
    )
    only_b = settings_differ(
        "r", run_eta=1, config_eta=1, run_batch_groups=8, config_batch_groups=4
    )
    assert only_b is not None and only_b.startswith(
        "run 'r' has batch_groups=8 (the config says 4): "
    )
