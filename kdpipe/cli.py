"""kdpipe command line: ``kdpipe run`` for the whole DAG, one subcommand per stage."""
from __future__ import annotations

import argparse
import sys


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
    return p


def main(argv: list[str] | None = None) -> int:
    from kdpipe.config import ConfigError, load_config
    from kdpipe.data import DataError

    args = _parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.command == "run":
            from kdpipe.pipeline import dvc_available, run_pipeline

            plain = args.config == "params.yaml" and not args.overrides
            use_dvc = args.use_dvc if args.use_dvc is not None else (plain and dvc_available())
            if use_dvc and not plain:
                raise ConfigError("--dvc runs with params.yaml as it is; for overrides use 'dvc exp run -S key=value' "
                                  "or 'kdpipe run --no-dvc --set ...'")
            run_pipeline(cfg, use_dvc)
        else:
            from kdpipe.stages import run_stage

            run_stage(args.command, cfg)
    except (ConfigError, DataError) as e:
        print(f"kdpipe: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
