"""INT8 vs FP32 latency of a student architecture with onnxruntime, per quantization variant and per op.

    python bench/int8.py [--arch lenet5_half] [--channels 1] [--size 32] [--batch 64] [--runs 50] [--tag t]

Latency does not depend on the weight values, so the model is the architecture at its random init
(exported by the export stage's own code, quantized by kdpipe/quantize.py's settings and variants of
them, calibrated on random images). One thread, median of --runs calls after 3 warm-ups. The per-op
table is onnxruntime's profiler (mean µs per run of each node's kernel). Writes
bench/results/int8-<arch>-cpu[-<tag>].json and prints a markdown table.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._info import run_info, write_result  # noqa: E402


def op_profile(path: str, x, runs: int) -> dict:
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.intra_op_num_threads = o.inter_op_num_threads = 1
    o.enable_profiling = True
    o.profile_file_prefix = str(Path(path).with_suffix(""))
    s = ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        s.run(None, {"input": x})
    agg = collections.Counter()
    for e in json.load(open(s.end_profiling())):
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            agg[f"{e['args']['op_name']} {e['name'][: -len('_kernel_time')]}"] += e["dur"]
    return {k: round(v / runs, 1) for k, v in agg.most_common(8)}


def main() -> int:
    import onnx
    import onnxruntime as ort
    import torch
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from kdpipe.models import build_model
    from kdpipe.quantize import SyntheticReader, latency_ms, session
    from kdpipe.stages.export import export_onnx

    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="lenet5_half")
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--tag", default=None, help="suffix of the results file (e.g. the CPU: avx512)")
    a = ap.parse_args()
    torch.manual_seed(0)
    spec = {"arch": a.arch, "in_channels": a.channels, "num_classes": 10, "image_size": a.size,
            "classes": [str(i) for i in range(10)], "mean": [0.5] * a.channels, "std": [0.25] * a.channels}
    tmp = Path(tempfile.mkdtemp(prefix="kdpipe-int8-"))
    fp32, pre = str(tmp / "fp32.onnx"), str(tmp / "pre.onnx")
    export_onnx(build_model(spec).eval(), spec, fp32, 18)
    quant_pre_process(fp32, pre)
    calib = (torch.rand(512, a.channels, a.size, a.size) * 255).to(torch.uint8)
    x = torch.rand(a.batch, a.channels, a.size, a.size).numpy()
    first_conv = [n.name for n in onnx.load(pre).graph.node if n.op_type == "Conv"][:1]
    variants = {  # name: quantize_static keywords (the first is kdpipe/quantize.py's)
        "QDQ S8S8, 7-bit per-channel weights (kdpipe)": dict(quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8, reduce_range=True),
        "QDQ U8S8, 7-bit weights": dict(quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8, reduce_range=True),
        "QOperator U8S8, 7-bit weights": dict(quant_format=QuantFormat.QOperator, activation_type=QuantType.QUInt8, reduce_range=True),
        "QDQ U8S8, 8-bit weights": dict(quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8, reduce_range=False),
        "kdpipe's, first conv left in FP32": dict(quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8, reduce_range=True,
                                                  nodes_to_exclude=first_conv),
    }
    rows = [{"model": "FP32", "latency_ms": latency_ms(session(fp32), x, a.runs), "ops_us": op_profile(fp32, x, a.runs)}]
    for i, (name, kw) in enumerate(variants.items()):
        path = str(tmp / f"int8_{i}.onnx")
        quantize_static(pre, path, SyntheticReader(calib), per_channel=True, weight_type=QuantType.QInt8, **kw)
        rows.append({"model": name, "latency_ms": latency_ms(session(path), x, a.runs), "ops_us": op_profile(path, x, a.runs)})
    flags = sorted({f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
                    if f in Path("/proc/cpuinfo").read_text().split()}) if Path("/proc/cpuinfo").exists() else []
    out = {"arch": a.arch, "input": [a.batch, a.channels, a.size, a.size], "onnxruntime": ort.__version__,
           **run_info(threads=1), "cpu_flags": flags, "rows": rows}  # onnxruntime on one thread
    write_result(out, f"int8-{a.arch}-cpu{'-' + a.tag if a.tag else ''}.json")
    print(f"{a.arch}, batch {a.batch}; onnxruntime {ort.__version__}; CPU flags {flags}; commit {out['commit']}; {out['date']}\n")
    print("| model | latency (ms) | vs FP32 | slowest ops (µs per run) |\n|---|---|---|---|")
    for r in rows:
        ops = ", ".join(f"{k} {v:.0f}" for k, v in list(r["ops_us"].items())[:3])
        print(f"| {r['model']} | {r['latency_ms']:.2f} | {rows[0]['latency_ms'] / r['latency_ms']:.2f}× | {ops} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
