"""kdpipe command line: ``kdpipe run`` for the whole DAG, one subcommand per stage."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    from kdpipe.stages import STAGES

    p = argparse.ArgumentParser(prog="kdpipe", description="Data-free knowledge distillation pipeline. "
                                "'kdpipe params' lists every parameter key; 'kdpipe init' starts a teacher-only project.")
    p.add_argument("--version", action="version", version=f"kdpipe {_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--config", default="params.yaml", help="YAML config (default: params.yaml)")
        sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one parameter, e.g. --set distill.temperature=8 (repeatable)")
        return sp

    r = common(sub.add_parser("run", help="run the whole pipeline under one MLflow parent run (dvc repro; with "
                              "--config/--set in this process, overwriting the DVC-tracked data/ folders)",
                              description="Run the whole pipeline under one MLflow parent run. With params.yaml as it "
                              "is, in a DVC project: 'dvc repro' (versioned; unchanged stages are skipped). With "
                              "--config or --set: the stages run in this process and overwrite the DVC-tracked data/ "
                              "folders (not versioned; for a versioned variant use 'dvc exp run -S key=value')."))
    r.add_argument("--dvc", dest="use_dvc", action="store_true", default=None,
                   help="run through 'dvc repro' (default when params.yaml is used unmodified in a DVC project)")
    r.add_argument("--no-dvc", dest="use_dvc", action="store_false", help="run the stages in this process")
    r.add_argument("--push", action="store_true", help="after a successful 'dvc repro', 'dvc push' the outputs to the "
                   "default DVC remote (set one with 'dvc remote add -d NAME URL'; an error before any work if none)")
    for s in STAGES:
        common(sub.add_parser(s, help=STAGE_HELP[s], description=STAGE_HELP[s]))
    sv = common(sub.add_parser("serve", help="serve the pipeline flow as a scheduled Prefect deployment (flow.serve)"))
    sv.add_argument("--cron", default="0 3 * * *", help='cron schedule (default: "0 3 * * *")')
    sv.add_argument("--name", default="kdpipe-scheduled", help="deployment name (default: kdpipe-scheduled)")
    sv.add_argument("--timezone", default="UTC", help="time zone of the cron schedule (default: UTC)")
    common(sub.add_parser("audit-memorization", help="data owner: nearest real sample to each synthetic one "
                          "(pixels, teacher features) -> data/reports/memorization.json + .png"))
    dg = common(sub.add_parser("dag", help="print dvc.yaml with the data deps the config needs (kdpipe/dag.py)"))
    dg.add_argument("--write", action="store_true", help="write dvc.yaml instead of printing it")
    it = sub.add_parser("init", help="scaffold a teacher-only project in DIR (params.yaml with the teacher card, dvc.yaml, "
                        "git + DVC) from a teacher file; no real data needed")
    it.add_argument("dir", help="the project folder (created; must not hold a kdpipe project)")
    it.add_argument("--teacher", required=True, metavar="FILE",
                    help="the teacher: a *.onnx file (any producer), or a state_dict with --set teacher.source="
                         "torchvision:<name> | timm:<name> | <zoo name>; copied to DIR/teacher/")
    it.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="a card key or any parameter, e.g. --set teacher.range=[0,255] --set teacher.mean=null "
                         "--set teacher.std=null (repeatable)")
    it.add_argument("--no-git", dest="git", action="store_false", help="do not initialise git and DVC")
    sc = common(sub.add_parser("score", help="data owner: score an exported student (and the teacher) on a labelled "
                               "ImageFolder with onnxruntime; logged to MLflow, linked to the registered version"))
    sc.add_argument("student", help="the student ONNX file (data/export/student.onnx or the registered model's)")
    sc.add_argument("--data", required=True, help="labelled images: <folder>/<class>/<image>")
    sc.add_argument("--teacher", default=None, help="the teacher ONNX file, fed by the card (params.yaml teacher or --set)")
    sc.add_argument("--out", default=None, help="also write the figures to this JSON file")
    pa = sub.add_parser("params", help="list every parameter key: type, default, range, meaning (from the schema)")
    pa.add_argument("section", nargs="?", default=None, help="one section, e.g. synthesize or teacher")
    st = common(sub.add_parser("activation-stats", help="data owner, for a teacher without BatchNorm: per-channel mean "
                               "and variance of every convolution's output on their images -> a small file for "
                               "synthesize.stats (the BN prior's targets)"))
    st.add_argument("--data", required=True, help="the owner's images: <folder>/<class>/<image>")
    st.add_argument("--out", default="activation_stats.pt", help="the file to hand over (default: activation_stats.pt)")
    pr = common(sub.add_parser("promote", help="move alias promote.alias (champion) to a registered version only when "
                               "its evaluate metrics pass the gate in params (promote:); exit 1 naming each failed "
                               "metric, 2 for a config error or an unknown model/version (docs/promote.md)"))
    pr.add_argument("ref", nargs="?", default=None, help="model, model/version or model@alias (default: tracking."
                    "registered_model@tracking.alias; a bare model name means model@tracking.alias, i.e. candidate)")
    ln = sub.add_parser("lineage", help="the chain from a registered model (or a run) back to the data")
    ln.add_argument("ref", help="model name, name/version, name@alias, or a run id")
    ln.add_argument("--json", action="store_true", help="machine-readable output (everything --verbose shows)")
    ln.add_argument("--verbose", "-v", action="store_true", help="also every hash, input digest and parameter of each step")
    ln.add_argument("--verify", action="store_true", help="download the registered model and re-hash it and every DVC "
                    "output the chain names (local data/ files); exit 1 naming each artifact that differs")
    ln.add_argument("--html", metavar="FILE", default=None, help="also write the chain as a graph (one HTML page, "
                    "inline SVG) to FILE, and log it to the model's export run in MLflow")
    ln.add_argument("--config", default="params.yaml", help="config giving tracking.uri (default: params.yaml)")
    return p


STAGE_HELP = {
    "prepare": "real data -> data/prepared/ (seeded, stratified splits); keys: data, seed",
    "train-teacher": "data/prepared/ -> data/teacher/ (trains the teacher, or checks teacher.checkpoint); keys: teacher",
    "baseline": "data/prepared/ -> data/baseline/ (the student's architecture on real data); keys: baseline, student",
    "synthesize": "the teacher only (data/teacher/ or the card's file) -> data/synthetic/ (data-free); keys: synthesize, replay, phi",
    "distill": "data/synthetic/ + the teacher -> data/student/; keys: distill, replay, phi (distill.data real|mixed reads data/prepared/)",
    "evaluate": "models + the real test split -> data/reports/ (accuracy); without real data: fidelity on a held-out "
                "synthetic set; keys: evaluate",
    "export": "data/student/ -> data/export/student.onnx (+ INT8), checked with onnxruntime, registered in MLflow; keys: export",
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kdpipe")
    except PackageNotFoundError:
        return "unknown"


def _stage(name: str, cfg) -> int:
    """One stage. Under torchrun (WORLD_SIZE > 1) a data-parallel stage (kdpipe.dist.DDP_STAGES)
    runs on every rank; any other stage runs on rank 0 alone while the other ranks exit."""
    from kdpipe import dist
    from kdpipe.stages import run_stage
    from kdpipe.utils import pick_device

    if dist.world_size() > 1 and name not in dist.DDP_STAGES:
        if not dist.is_main():
            print(f"[kdpipe] rank {dist.rank()}: '{name}' runs on rank 0 alone", flush=True)
            return 0
        run_stage(name, cfg)
        return 0
    dist.init(pick_device(cfg.device))
    run_stage(name, cfg)
    dist.close()  # only after success: on an error this rank exits and torchrun stops the others
    return 0


def trace_opens(log: str) -> None:
    """KDPIPE_TRACE_OPENS=<file>: every file this process opens is appended to <file> at exit (a Python audit
    hook on "open"), so a data owner can check what a run read (tests/test_teacher_only.py does)."""
    import atexit

    seen: set[str] = set()

    def hook(event, args):
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            p = os.fsdecode(args[0])
            seen.add(os.path.abspath(p))

    def flush():
        with open(log, "a") as f:
            f.write("".join(f"{p}\n" for p in sorted(seen)))

    sys.addaudithook(hook)
    atexit.register(flush)


def main(argv: list[str] | None = None) -> int:
    if os.environ.get("KDPIPE_TRACE_OPENS"):
        trace_opens(os.environ["KDPIPE_TRACE_OPENS"])
    from kdpipe.config import ConfigError, load_config
    from kdpipe.errors import DataError, ExportError
    from kdpipe.pipeline import StageFailed

    args = _parser().parse_args(argv)
    try:
        if args.command == "lineage":
            from kdpipe import lineage
            from kdpipe.tracking import tracking_uri

            cfg = load_config(args.config) if Path(args.config).exists() else load_config(None)
            return lineage.main(args.ref, tracking_uri(cfg), args.json, verbose=args.verbose, verify_files=args.verify,
                                html_path=args.html)
        if args.command == "params":
            from kdpipe.config import describe

            try:
                for key, typ, default, rng, meaning in describe(args.section):
                    print(f"{key:<40} {typ:<28} {default:<14} {rng:<14} {meaning}")
                sys.stdout.flush()
            except BrokenPipeError:  # `kdpipe params | head`: the reader has what it wanted
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        if args.command == "init":
            from kdpipe.project import init

            init(args.dir, args.teacher, args.overrides, git=args.git)
            return 0
        if args.command == "promote":  # no params.yaml here: the schema's defaults (an explicit --config must exist)
            from kdpipe.promote import promote
            from kdpipe.tracking import tracking_uri

            default = args.config == "params.yaml" and not Path(args.config).exists()
            cfg = load_config(None if default else args.config, args.overrides)
            return promote(cfg, args.ref, tracking_uri(cfg))
        if args.command in ("score", "activation-stats"):  # the owner's side may have no params.yaml: defaults
            from kdpipe import score

            cfg = load_config(args.config if Path(args.config).exists() else None, args.overrides)
            if args.command == "activation-stats":
                r = score.owner_stats(cfg, args.data, args.out)
                print(f"[kdpipe] {args.out}: mean and variance of {r['layers']} convolutions over {r['n_images']} "
                      f"images, teacher sha256 {r['teacher_sha256'][:12]}", flush=True)
            else:
                print(score.format_text(score.score(cfg, args.student, args.data, args.teacher, args.out)), flush=True)
            return 0
        cfg = load_config(args.config, args.overrides)
        from kdpipe.stages import STAGES

        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.command not in STAGES:
            raise ConfigError(f"'kdpipe {args.command}' does not run under torchrun; torchrun runs one stage: "
                              f"torchrun --nproc_per_node N -m kdpipe train-teacher (README: Multi-GPU and speed)")
        if args.command == "serve":
            from flows.pipeline import serve

            serve(args.name, args.cron, args.timezone, args.config, args.overrides)
        elif args.command == "audit-memorization":
            from kdpipe.audit import audit_memorization

            audit_memorization(cfg)
        elif args.command == "dag":
            from kdpipe import dag

            dag.main(cfg, args.write)
        elif args.command == "run":  # the one orchestrator (kdpipe/pipeline.py): preflight, retry rule
            from kdpipe.pipeline import run_pipeline

            res = run_pipeline(args.config, args.overrides, args.use_dvc, push=args.push)
            if res["pushed"]:
                print(f"[kdpipe] outputs pushed to DVC remote '{res['pushed']}'", flush=True)
            print(res["summary"], flush=True)
        else:
            return _stage(args.command, cfg)
    except (ConfigError, DataError) as e:
        print(f"kdpipe: error: {e}", file=sys.stderr)
        return 2
    except ExportError as e:  # the ONNX student failed its onnxruntime check: the previous export is kept
        print(f"kdpipe: {e}", file=sys.stderr)
        return 1
    except FloatingPointError as e:  # NaN/inf in a loss or in weights: the stage stopped, earlier outputs kept
        print(f"kdpipe: stopped: {e}", file=sys.stderr)
        return 1
    except StageFailed as e:  # a stage under `dvc repro` failed; its own message is printed above
        print(f"kdpipe: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
