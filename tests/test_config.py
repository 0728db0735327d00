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


@pytest.mark.parametrize("stage, override, said", [
    ("train-teacher", "teacher.epochs=0", "teacher.epochs"),
    ("distill", "synthesize.alpha=0.7", "synthesize.alpha moved to replay.alpha"),  # a moved key
])
def test_cli_exit_2_before_any_work(stage, override, said, tmp_path):
    r = subprocess.run([sys.executable, "-m", "kdpipe", stage, "--config", str(ROOT / "params.yaml"),
                        "--set", override], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert said in r.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("old, new", [
    ("synthesize.alpha", "replay.alpha"), ("synthesize.beta0", "replay.beta0"), ("synthesize.iw_norm", "replay.iw_norm"),
    ("synthesize.priority_eps", "replay.eps"), ("synthesize.phi_gamma", "phi.gamma"), ("synthesize.phi_clip", "phi.clip"),
])
def test_moved_key_fails_naming_its_new_home(old, new, tmp_path):
    """The prioritized-replay and φ keys live in the sections replay and phi (read by synthesize and distill):
    the old key fails, from --set or from a file, with the new key named."""
    with pytest.raises(ConfigError, match=rf"{old} moved to {new}\b"):
        load_config(ROOT / "params.yaml", [f"{old}=0.5"])
    section, key = old.split(".")
    f = tmp_path / "p.yaml"
    f.write_text(f"{section}:\n  rounds: 3\n  {key}: 0.5\n")
    with pytest.raises(ConfigError, match=rf"{old} moved to {new}\b") as e:
        load_config(f)
    assert "unknown key" not in str(e.value)


def test_replay_and_phi_sections_load_from_yaml_and_set(tmp_path):
    cfg = Config()
    assert (cfg.replay.alpha, cfg.replay.beta0, cfg.replay.iw_norm, cfg.replay.eps) == (0.6, 0.4, "mean", 1e-3)
    assert (cfg.phi.gamma, cfg.phi.clip) == (2.0, 5.0)
    f = tmp_path / "p.yaml"
    f.write_text("replay:\n  alpha: 0.7\n  beta0: 0.5\n  iw_norm: max\n  eps: 0.01\nphi:\n  gamma: 0.5\n  clip: 3\n"
                 "synthesize:\n  phi: true\n  priority: true\ndistill:\n  phi: true\n  priority: true\n")
    cfg = load_config(f)
    assert (cfg.replay.alpha, cfg.replay.beta0, cfg.replay.iw_norm, cfg.replay.eps) == (0.7, 0.5, "max", 0.01)
    assert (cfg.phi.gamma, cfg.phi.clip) == (0.5, 3.0)
    assert cfg.synthesize.phi and cfg.synthesize.priority and cfg.distill.phi and cfg.distill.priority
    cfg = load_config(f, ["replay.alpha=0.9", "replay.iw_norm=mean", "phi.gamma=0", "phi.clip=10"])
    assert (cfg.replay.alpha, cfg.replay.iw_norm, cfg.replay.beta0, cfg.phi.gamma, cfg.phi.clip) == (0.9, "mean", 0.5, 0.0, 10.0)
    cfg = load_config(None, ["replay.eps=0.002", "phi.clip=4"])  # no file: --set makes the section
    assert cfg.replay.eps == 0.002 and cfg.phi.clip == 4.0 and cfg.replay.alpha == 0.6
    for bad, key in (("replay.beta0=1.5", "replay.beta0"), ("replay.iw_norm=sum", "replay.iw_norm"),
                     ("replay.eps=0", "replay.eps"), ("phi.clip=1", "phi.clip"), ("phi.gamma=-1", "phi.gamma")):
        with pytest.raises(ConfigError, match=f"'{key}'"):
            load_config(None, [bad])
    with pytest.raises(ConfigError, match=r"unknown key 'replay.alfa' \(did you mean 'replay.alpha'\?\)"):
        load_config(None, ["replay.alfa=0.5"])
    from kdpipe.config import describe
    keys = [r[0] for r in describe()]
    assert {"replay.alpha", "replay.beta0", "replay.iw_norm", "replay.eps", "phi.gamma", "phi.clip"} <= set(keys)
    assert not any(k in keys for k in ("synthesize.alpha", "synthesize.phi_gamma", "synthesize.priority_eps"))


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


def test_dvc_yaml_lists_the_shared_sections_whole():
    """synthesize and distill list the sections replay and phi (not subkeys); `kdpipe dag --write` turns a dvc.yaml
    that lists the moved keys (synthesize.alpha, ...) into that, and the old one is out of date until then."""
    from kdpipe import dag
    from kdpipe.config import MOVED

    text = (ROOT / "dvc.yaml").read_text()
    stages = yaml.safe_load(text)["stages"]
    for stage in ("synthesize", "distill"):
        assert {"replay", "phi"} <= set(stages[stage]["params"]) and not set(stages[stage]["params"]) & set(MOVED)
    old = text.replace("      - replay\n      - phi\n", "", 1).replace(
        "      - replay\n      - phi\n", "".join(f"      - {k}\n" for k in MOVED), 1)
    assert "synthesize.alpha" in old and "      - replay\n" not in old
    assert dag.render(Config(), old) == text
