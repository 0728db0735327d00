"""Parameters: one schema, params.yaml mirrors it, bad keys fail before any work (exit 2)."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kdpipe.config import Config, ConfigError, dump_params, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_params_yaml_mirrors_schema():
    on_disk = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert on_disk == Config().model_dump(mode="json")
    assert load_config(ROOT / "params.yaml") == Config()
    assert (ROOT / "params.yaml").read_text() == dump_params(), "regenerate: python -m kdpipe.config > params.yaml"


def test_overrides_are_typed():
    cfg = load_config(ROOT / "params.yaml", ["distill.temperature=8", "synthesize.phi=false", "data.root=/x"])
    assert cfg.distill.temperature == 8.0 and cfg.synthesize.phi is False and cfg.data.root == "/x"
    # YAML reads an unquoted `off` as false: speed.amp takes it as "off"; a bool elsewhere stays a bool
    assert load_config(ROOT / "params.yaml", ["speed.amp=off", "speed.compile=off"]).speed.amp == "off"
    with pytest.raises(ConfigError, match="'speed.amp'"):
        load_config(ROOT / "params.yaml", ["speed.amp=on"])


@pytest.mark.parametrize("override, key", [
    ("distill.temprature=3", "distill.temprature"),  # unknown key
    ("nosuchsection.x=1", "nosuchsection"),
    ("distill.epochs=many", "distill.epochs"),  # wrong type
    ("distill.alpha=1.5", "distill.alpha"),  # out of range
    ("data.name=imagenet", "data.name"),
    ("synthesize.capacity=-4", "synthesize.capacity"),
])
def test_bad_parameter_names_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "params.yaml", [override])
    assert f"'{key}" in str(e.value)


def test_unknown_key_in_file(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("teacher:\n  epochs: 3\n  epocs: 4\n")
    with pytest.raises(ConfigError, match="unknown key 'teacher.epocs'"):
        load_config(f)


def test_cli_exit_2_before_any_work(tmp_path):
    r = subprocess.run([sys.executable, "-m", "kdpipe", "train-teacher", "--config", str(ROOT / "params.yaml"),
                        "--set", "teacher.epochs=0"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "teacher.epochs" in r.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "mlflow.db").exists()


def test_params_digest_changes_with_params():
    assert Config().digest() != load_config(ROOT / "params.yaml", ["seed=1"]).digest()


def test_params_lists_every_key_and_did_you_mean(capsys):
    from kdpipe.cli import main
    from kdpipe.config import Config, describe

    rows = describe()
    assert len(rows) == len(_flat_keys(Config().model_dump(mode="json")))
    assert all(r[4] for r in rows), [r[0] for r in rows if not r[4]]  # every key has its one line of meaning
    assert main(["params", "synthesize"]) == 0
    out = capsys.readouterr().out
    assert "synthesize.w_tv" in out and "synthesize.capacity" in out and ">= 16" in out and "distill." not in out
    with pytest.raises(ConfigError, match=r"unknown key 'synthesize.rouns' \(did you mean 'synthesize.rounds'\?\)"):
        load_config(None, ["synthesize.rouns=3"])
    assert main(["params", "synthesise"]) == 2
    assert "did you mean 'synthesize" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("kdpipe 0.1.0")


def _flat_keys(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        out += _flat_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
    return out
