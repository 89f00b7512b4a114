"""The run config: every bad value is refused naming the field, the value and what is allowed;
overrides apply; one file drives every command; every command exits 2 on a bad config without
a traceback; ``sluice config show``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sluice import cli
from sluice.config import ConfigError, SluiceConfig, load_config

ROOT = Path(__file__).resolve().parents[3]

# (override, words the message must contain besides the field path and the value)
BAD = [
    ("staleness.eta=-1", "greater than or equal to 0"),
    ("staleness.eta=1001", "less than or equal to 1000"),
    ("staleness.eta=two", "valid integer"),
    ("staleness.batch_groups=0", "greater than or equal to 1"),
    ("run.name=has space", "should match pattern"),
    ("run.seed=-3", "greater than or equal to 0"),
    ("model.layers=0", "greater than or equal to 1"),
    ("model.hidden=4", "greater than or equal to 8"),
    ("model.arch=gpt2", "'llama' or 'qwen2'"),
    ("inference.engine=gpu", "'auto', 'sglang' or 'cpu'"),
    ("inference.threads=0", "greater than or equal to 1"),
    ("inference.mem_fraction=1.5", "less than or equal to 1"),
    ("inference.servers=notalist", "valid list"),
    ("rollout.n_samples=0", "greater than or equal to 1"),
    ("rollout.temperature=-0.5", "greater than or equal to 0"),
    ("rollout.top_p=0", "greater than 0"),
    ("rollout.top_k=-2", "greater than or equal to -1"),
    ("rollout.update_mode=retract", "'abort_all' or 'pause'"),
    ("rollout.shutdown_grace_s=60", "less than or equal to 25"),
    ("rollout.ignore_eos=maybe", "valid boolean"),
    ("trainer.lr=0", "greater than 0"),
    ("trainer.lr=abc", "valid number"),
    ("trainer.max_steps=0", "greater than or equal to 1"),
    ("trainer.is_mode=clip", "'none', 'truncate' or 'mask'"),
    ("trainer.is_level=batch", "'token' or 'sequence'"),
    ("trainer.aggregation=sum", "'token_mean', 'seq_mean_token_sum' or 'seq_mean_token_mean'"),
    ("trainer.dual_clip=1", "greater than 1"),
    ("trainer.eps_low=1", "less than 1"),
    ("trainer.reward_target=1.5", "less than or equal to 1"),
    ("trainer.device=tpu", "'auto', 'cpu' or 'cuda'"),
    ("trainer.consumer=a:b", "should match pattern"),
    ("trainer.lrr=0.1", "trainer.lrr: unknown key; did you mean trainer.lr?"),
    ("nosection.x=1", "nosection: unknown section; valid: redis, run"),
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("override", "allowed"), BAD, ids=[b[0] for b in BAD])
def test_bad_value_names_field_value_and_what_is_allowed(override: str, allowed: str) -> None:
    field, _, value = override.partition("=")
    with pytest.raises(ConfigError) as exc:
        load_config(None, [override])
    msg = str(exc.value)
    assert field in msg, msg
    if "unknown" not in allowed:  # an unknown key is named with its section's keys instead
        assert value in msg, msg
    assert allowed.lower() in msg.lower(), msg


@pytest.mark.timeout(30)
def test_bad_value_in_a_file_names_the_file(tmp_path: Path) -> None:
    f = tmp_path / "run.yaml"
    f.write_text("trainer:\n  lr: -1\nrollout:\n  n_samples: 0\n")
    with pytest.raises(ConfigError) as exc:
        load_config(f)
    msg = str(exc.value)
    # Every bad field is named, not only the first.
    assert str(f) in msg and "trainer.lr = -1" in msg and "rollout.n_samples = 0" in msg


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("text", "words"),
    [("[1, 2]", "mapping of sections"), ("trainer: {lr: [", "not valid YAML")],
)
def test_malformed_file(tmp_path: Path, text: str, words: str) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=words):
        load_config(f)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.timeout(30)
def test_overrides_apply_over_the_file(tmp_path: Path) -> None:
    f = tmp_path / "run.yaml"
    f.write_text("trainer: {lr: 0.01, max_steps: 7}\nstaleness: {eta: 3}\n")
    cfg = load_config(f, ["trainer.lr=1e-5", "inference.servers=[http://a:1, http://b:2]"])
    assert cfg.trainer.lr == 1e-5  # override wins over the file
    assert cfg.trainer.max_steps == 7  # the file wins over the default
    assert cfg.staleness.eta == 3
    assert cfg.inference.servers == ["http://a:1", "http://b:2"]
    assert cfg.rollout.n_samples == SluiceConfig().rollout.n_samples  # default kept
    with pytest.raises(ConfigError, match=r"section\.field=value"):
        load_config(None, ["trainer.lr"])


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", ["demo.yaml", "gsm8k-sglang.yaml", "multi-machine.yaml"])
def test_examples_validate(name: str) -> None:
    cfg = load_config(ROOT / "examples" / name)
    raw = yaml.safe_load((ROOT / "examples" / name).read_text())
    # Every value written in the example is the one the config holds.
    for section, fields in raw.items():
        for k, v in fields.items():
            got = getattr(getattr(cfg, section), k)
            if hasattr(got, "model_dump"):  # a nested section (trainer.lora): the fields given
                got = {kk: vv for kk, vv in got.model_dump().items() if kk in v}
            assert got == v, f"{section}.{k}"


@pytest.mark.timeout(30)
def test_same_file_drives_every_command(tmp_path: Path) -> None:
    """Each command's own parser takes the same --config/--set, and the config each one loads
    from them (the pre-start check in sluice.cli, then the command's load_config) is the same."""
    f = tmp_path / "run.yaml"
    f.write_text(
        "run: {name: shared, dir: /tmp/shared}\nmodel: {path: /models/m}\n"
        "inference: {threads: 2}\ntrainer: {lr: 0.002}\n"
    )
    parser = cli.build_parser()
    loaded = {}
    for argv in (
        ["serve", "--config", str(f), "--set", "trainer.lr=0.004"],
        ["rollout", "--config", str(f), "--set", "trainer.lr=0.004", "--servers", "http://x:1"],
        ["train", "--config", str(f), "--set", "trainer.lr=0.004", "--resume"],
        ["demo", "--config", str(f), "--set", "trainer.lr=0.004", "--no-live"],
        ["config", "show", str(f), "--set", "trainer.lr=0.004"],
    ):
        args = parser.parse_args(argv)
        assert args.config == str(f) and args.overrides == ["trainer.lr=0.004"]
        loaded[argv[0]] = load_config(args.config, args.overrides)
    first = next(iter(loaded.values()))
    assert first.trainer.lr == 0.004 and first.run.name == "shared"
    assert all(c == first for c in loaded.values())
    # sluice serve fills its model and threads from that config.
    from sluice.commands import serve

    args = parser.parse_args(["serve", "--config", str(f)])
    serve._from_config(args)
    assert args.model == "/models/m" and args.threads == 2 and args.seed == 0
    args = parser.parse_args(["serve", "--config", str(f), "--threads", "1", "--model", "/m2"])
    serve._from_config(args)
    assert args.model == "/m2" and args.threads == 1  # explicit flags win


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--config", "{f}"],
        ["rollout", "--config", "{f}", "--servers", "http://127.0.0.1:1"],
        ["serve", "--config", "{f}"],
        ["demo", "--config", "{f}", "--no-live"],
        ["config", "show", "{f}"],
    ],
    ids=["train", "rollout", "serve", "demo", "config"],
)
def test_every_command_exits_2_on_a_bad_config(
    tmp_path: Path, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("staleness: {eta: -4}\n")
    code = cli.main([a.format(f=f) for a in argv])
    err = capsys.readouterr().err
    assert code == 2
    assert f"sluice {argv[0]}:" in err and "staleness.eta = -4" in err
    assert "greater than or equal to 0" in err and "Traceback" not in err


@pytest.mark.timeout(60)
def test_bad_override_real_process_exit_code(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sluice", "train", "--set", "trainer.lr=-1"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "trainer.lr = -1" in proc.stderr and "greater than 0" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.timeout(30)
def test_config_show(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "250")  # the table unwrapped
    f = tmp_path / "run.yaml"
    f.write_text("trainer: {lr: 0.01}\nredis: {url: 'redis://u:s3cret@h:6379/0'}\n")
    assert cli.main(["config", "show", str(f), "--set", "staleness.eta=5"]) == 0
    out = capsys.readouterr().out
    assert "s3cret" not in out and "redis://u:***@h:6379/0" in out
    # Help text and the default of a changed field are shown.
    assert "# AdamW learning rate. [default: 0.001]" in out
    assert "  lr: 0.01" in out and "  eta: 5" in out
    # The printed YAML is itself a config that loads to the same values (password aside; the
    # task's options are printed with their defaults: tests/unit/sluice/
    # test_sluice_config_show_tasks.py).
    shown = yaml.safe_load(out)
    shown["redis"]["url"] = "redis://u:s3cret@h:6379/0"
    expected = load_config(f, ["staleness.eta=5"])
    expected.task.options = {"n_digits": 4, "n_train": 1024, "n_eval": 128, "seed": 0}
    assert SluiceConfig.model_validate(shown) == expected
    assert cli.main(["config", "show", "--table"]) == 0
    table = capsys.readouterr().out
    assert "trainer.lr" in table and "AdamW learning rate" in table
