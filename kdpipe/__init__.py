"""kdpipe: data-free knowledge distillation, from a trained teacher to a small ONNX student."""
__version__ = "0.1.0"
