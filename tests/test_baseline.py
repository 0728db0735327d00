"""The baseline (student from scratch on real data) runs only where the real data may be used."""
import json

import pytest

from kdpipe.config import load_config
from kdpipe.stages import baseline
from kdpipe.tracking import Tracker


@pytest.mark.parametrize("override, reason", [("data.private=true", "data.private"),
                                              ("baseline.enabled=false", "baseline.enabled: false")])
def test_baseline_skipped(in_tmp, override, reason):
    out = baseline.run(load_config(None, [override]), Tracker())
    assert out == {"enabled": False, "reason": reason}
    spec = json.loads((in_tmp / "data/baseline/spec.json").read_text())
    assert spec["enabled"] is False
    assert not (in_tmp / "data/baseline/model.pt").exists()
