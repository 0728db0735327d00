"""kdpipe command line: ``kdpipe run`` for the whole DAG, one subcommand per stage."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    from kdpipe.stages import STAGES

    p = argparse.ArgumentParser(prog="kdpipe", description="Data-free knowledge distillation pipeline.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--config", default="params.yaml", help="YAML config (default: params.yaml)")
        sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one parameter, e.g. --set distill.temperature=8 (repeatable)")
        return sp

    r = common(sub.add_parser("run", help="run the whole pipeline under one MLflow parent run"))
    r.add_argument("--dvc", dest="use_dvc", action="store_true", default=None,
                   help="run through 'dvc repro' (default when params.yaml is used unmodified in a DVC project)")
    r.add_argument("--no-dvc", dest="use_dvc", action="store_false", help="run the stages in this process")
    for s in STAGES:
        common(sub.add_parser(s, help=f"run the {s} stage"))
    sv = common(sub.add_parser("serve", help="serve the pipeline flow as a scheduled Prefect deployment (flow.serve)"))
    sv.add_argument("--cron", default="0 3 * * *", help='cron schedule (default: "0 3 * * *")')
    sv.add_argument("--name", default="kdpipe-scheduled", help="deployment name (default: kdpipe-scheduled)")
    sv.add_argument("--timezone", default="UTC")
    common(sub.add_parser("audit-memorization", help="data owner: nearest real sample to each synthetic one "
                          "(pixels, teacher features) -> data/reports/memorization.json + .png"))
    dg = common(sub.add_parser("dag", help="print dvc.yaml with the data deps the config needs (kdpipe/dag.py)"))
    dg.add_argument("--write", action="store_true", help="write dvc.yaml instead of printing it")
    ln = sub.add_parser("lineage", help="the chain from a registered model (or a run) back to the data")
    ln.add_argument("ref", help="model name, name/version, name@alias, or a run id")
    ln.add_argument("--json", action="store_true", help="machine-readable output")
    ln.add_argument("--config", default="params.yaml", help="config giving tracking.uri (default: params.yaml)")
    return p


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


def main(argv: list[str] | None = None) -> int:
    from kdpipe.config import ConfigError, load_config
    from kdpipe.errors import DataError
    from kdpipe.pipeline import StageFailed

    args = _parser().parse_args(argv)
    try:
        if args.command == "lineage":
            from kdpipe import lineage
            from kdpipe.tracking import tracking_uri

            cfg = load_config(args.config) if Path(args.config).exists() else load_config(None)
            return lineage.main(args.ref, tracking_uri(cfg), args.json)
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
        elif args.command == "run":
            from kdpipe.pipeline import dvc_available, run_pipeline
            from kdpipe.tracking import check_tracking

            plain = args.config == "params.yaml" and not args.overrides
            use_dvc = args.use_dvc if args.use_dvc is not None else (plain and dvc_available())
            if use_dvc and not plain:
                raise ConfigError("--dvc runs with params.yaml as it is; for overrides use 'dvc exp run -S key=value' "
                                  "or 'kdpipe run --no-dvc --set ...'")
            if use_dvc:
                from kdpipe import dag

                dag.check(cfg)  # dvc.yaml's data deps must be those params.yaml needs (distill.data, teachers)
            check_tracking(cfg)  # before the parent run opens (MLflow would retry for minutes)
            run_pipeline(cfg, use_dvc)
        else:
            return _stage(args.command, cfg)
    except (ConfigError, DataError) as e:
        print(f"kdpipe: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # NaN/inf in a loss or in weights: the stage stopped, earlier outputs kept
        print(f"kdpipe: stopped: {e}", file=sys.stderr)
        return 1
    except StageFailed as e:  # a stage under `dvc repro` failed; its own message is printed above
        print(f"kdpipe: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
