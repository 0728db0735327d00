"""Errors phrased for the user (the CLI prints them in one line and exits 2). A module without torch,
so that ``kdpipe run`` (which only drives ``dvc repro``) starts without importing it."""


class DataError(ValueError):
    """Bad input data, phrased for the user (names the path)."""


class ExportError(RuntimeError):
    """The exported model failed its check (onnxruntime against PyTorch): exit 1, the previous export kept."""
