"""Where each stage reads and writes (relative to the working directory: the project root)."""
from pathlib import Path

DATA = Path("data")
PREPARED = DATA / "prepared"  # real data splits (uint8 tensors) + meta.json
TEACHER = DATA / "teacher"  # model.pt (state_dict) + spec.json
BASELINE = DATA / "baseline"  # student arch trained on real data
SYNTHETIC = DATA / "synthetic"  # samples.pt (images + teacher logits) + meta.json + grid.png
STUDENT = DATA / "student"  # model.pt + spec.json + history.csv
REPORTS = DATA / "reports"  # metrics.json, plots
EXPORT = DATA / "export"  # student.onnx + metrics.json
TIMINGS = DATA / ".timings"  # wall times of the last stage runs (git-ignored, not a DVC output)
