"""Checkpoints are data, never code: torch.load(weights_only=True) refuses a pickle that carries code."""
import os
import pickle

import pytest
import torch

from kdpipe.models import build_model
from kdpipe.utils import load_torch, save_torch

SPEC = {"arch": "digits_cnn_small", "num_classes": 10, "classes": [str(i) for i in range(10)],
        "in_channels": 1, "image_size": 8, "mean": [0.3], "std": [0.4]}


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_crafted_pickle_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    f = tmp_path / "model.pt"
    f.write_bytes(pickle.dumps({"w": _Evil()}))
    with pytest.raises(pickle.UnpicklingError):
        load_torch(f)
    assert not (tmp_path / "pwned").exists()


def test_state_dict_roundtrip_is_atomic(tmp_path):
    m = build_model(SPEC)
    save_torch(m.state_dict(), tmp_path / "m.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temp file left behind
    m2 = build_model(SPEC)
    m2.load_state_dict(load_torch(tmp_path / "m.pt"))
    x = torch.rand(3, 1, 8, 8)
    m.eval(), m2.eval()
    assert torch.equal(m(x), m2(x))


def _prepared(tmp_path):
    from kdpipe import data
    from kdpipe.config import load_config

    data.prepare(load_config(None, []))


def test_bring_your_own_teacher_state_dict(tmp_path, monkeypatch):
    from kdpipe.config import load_config
    from kdpipe.stages import train_teacher
    from kdpipe.tracking import Tracker

    monkeypatch.chdir(tmp_path)
    _prepared(tmp_path)
    from kdpipe import data

    spec = {**SPEC, "arch": "digits_cnn", "mean": data.load_meta()["mean"], "std": data.load_meta()["std"]}
    mine = build_model(spec)
    save_torch(mine.state_dict(), tmp_path / "mine.pt")
    out = train_teacher.run(load_config(None, [f"teacher.checkpoint={tmp_path / 'mine.pt'}"]), Tracker())
    assert "byo" in out
    saved = load_torch(tmp_path / "data/teacher/model.pt")
    assert all(torch.equal(saved[k], v) for k, v in mine.state_dict().items())


def test_mismatched_checkpoint_names_the_keys(tmp_path, monkeypatch):
    from kdpipe.config import ConfigError, load_config
    from kdpipe.stages import train_teacher
    from kdpipe.tracking import Tracker

    monkeypatch.chdir(tmp_path)
    _prepared(tmp_path)
    save_torch(build_model(SPEC).state_dict(), tmp_path / "student.pt")  # digits_cnn_small, not digits_cnn
    with pytest.raises(ConfigError, match=r"does not fit teacher.arch: missing keys \['net.10"):
        train_teacher.run(load_config(None, [f"teacher.checkpoint={tmp_path / 'student.pt'}"]), Tracker())
    assert not (tmp_path / "data/teacher").exists()
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="not a loadable weights-only checkpoint"):
        train_teacher.run(load_config(None, [f"teacher.checkpoint={tmp_path / 'junk.pt'}"]), Tracker())


# ------------------------------------------------------------------ resume fingerprints the code a stage runs
class Killed(Exception):
    """Stands for a kill right after the first resume checkpoint was written."""


def killed_after_first_checkpoint(monkeypatch):
    """Resume.save as it is, then Killed once a checkpoint file exists (the stage stops mid-run)."""
    from kdpipe.resume import Resume

    save = Resume.save

    def save_then_die(self, *args, **kwargs):
        save(self, *args, **kwargs)
        if self.path.exists():
            raise Killed

    monkeypatch.setattr(Resume, "save", save_then_die)
    return lambda: monkeypatch.setattr(Resume, "save", save)


def test_code_files_are_the_stage_deps_kdpipe_dag_lists(monkeypatch, tmp_path):
    """The fingerprinted code is the kdpipe/ deps of the stage in the project's dvc.yaml (what `kdpipe dag`
    prints); a project whose dvc.yaml names no code (a teacher-only one) fingerprints the whole package."""
    import yaml

    from conftest import ROOT
    from kdpipe import dag
    from kdpipe.config import Config
    from kdpipe.resume import code_files

    monkeypatch.chdir(ROOT)
    stages = yaml.safe_load(dag.render(Config(), (ROOT / "dvc.yaml").read_text()))["stages"]
    for stage in ("train-teacher", "baseline", "synthesize", "distill"):
        want = [ROOT / d for d in stages[stage]["deps"] if d.startswith("kdpipe/")]
        assert code_files(stage) == want, stage
    assert ROOT / "kdpipe/routes.py" in code_files("distill") and ROOT / "kdpipe/losses.py" in code_files("distill")
    from kdpipe.resume import PACKAGE

    monkeypatch.chdir(tmp_path)  # no dvc.yaml here; then one that lists no code
    assert code_files("distill") == [PACKAGE]
    (tmp_path / "dvc.yaml").write_text("stages:\n  distill:\n    cmd: kdpipe distill\n    deps: [data/synthetic]\n")
    assert code_files("distill") == [PACKAGE]


def test_distill_resume_refuses_a_stale_checkpoint_after_a_routes_change(tmp_path, monkeypatch, capsys):
    """A real distill run stopped after its first resume checkpoint; with the code unchanged the next run
    resumes from it, after a change to kdpipe/routes.py (the fingerprint pointed at a temp copy of it) the
    next run says it ignores the checkpoint, names the file, starts over and ends like an uninterrupted run."""
    import shutil

    import yaml

    from kdpipe import resume
    from kdpipe.config import load_config
    from kdpipe.stages import distill
    from kdpipe.tracking import Tracker
    from test_ddp import distill_project

    from conftest import ROOT

    monkeypatch.chdir(ROOT)
    real = resume.code_files("distill")  # the checkout's dvc.yaml: distill's code deps
    assert any(f.name == "routes.py" for f in real)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)
    try:
        distill_project(tmp_path)
        p = yaml.safe_load((tmp_path / "params.yaml").read_text())
        p["distill"]["epochs"] = 3
        p["resume"].update(enabled=True, every=1)
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
        routes = tmp_path / "code" / "routes.py"  # stands for kdpipe/routes.py in the fingerprint
        routes.parent.mkdir()
        shutil.copy(resume.PACKAGE / "routes.py", routes)
        monkeypatch.setattr(resume, "code_files", lambda stage: [routes if f.name == "routes.py" else f for f in real])
        ckpt, out = tmp_path / "data/.resume/distill.pt", tmp_path / "data/student/model.pt"

        distill.run(load_config("params.yaml"), Tracker())  # the uninterrupted reference
        reference = load_torch(out)
        assert not ckpt.exists()
        out.unlink()

        restore = killed_after_first_checkpoint(monkeypatch)
        with pytest.raises(Killed):
            distill.run(load_config("params.yaml"), Tracker())
        restore()
        assert load_torch(ckpt)["done"] == 1 and not out.exists()
        kept = ckpt.read_bytes()

        capsys.readouterr()
        distill.run(load_config("params.yaml"), Tracker())  # same code: resumes
        assert "distill: resumed from data/.resume/distill.pt after epoch 1" in capsys.readouterr().out
        assert all(torch.equal(v, reference[k]) for k, v in load_torch(out).items())

        ckpt.write_bytes(kept)  # the checkpoint of the stopped run again, then a change in the routes code
        routes.write_text(routes.read_text() + "\n# a change in how batches are drawn\n")
        distill.run(load_config("params.yaml"), Tracker())
        said = capsys.readouterr().out
        assert ("distill: ignoring resume checkpoint data/.resume/distill.pt: written with other code "
                f"({routes} changed); starting from scratch") in said
        assert "resumed from" not in said
        assert not ckpt.exists()
        assert all(torch.equal(v, reference[k]) for k, v in load_torch(out).items())  # started over: the same student
    finally:
        torch.set_num_threads(n)
