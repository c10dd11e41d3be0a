"""`cxr-study`: the command line. The only place that catches the project's errors.

Every `StudyError` (bad config, data, checkpoint) is printed as one line on stderr with exit
status 2 and no traceback.
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from contract.errors import StudyError


def _cmd_demo(args: argparse.Namespace) -> int:
    from contract.paths import writable_dir
    from study.demo import run_demo
    run_demo(writable_dir(Path(args.dir), "--dir").resolve())
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from study.config import check_destinations, load_study
    cfg = load_study(Path(args.study))
    if args.dry_run:
        from study.plan import plan_text
        print(plan_text(cfg))
        return 0
    if args.add_trials is not None and args.add_trials < 1:
        raise StudyError(f"--add-trials {args.add_trials}: give a number of trials >= 1")
    if args.arm and args.add_trials is None:
        raise StudyError("--arm only selects where --add-trials go: add --add-trials N")
    check_destinations(cfg)  # not for --dry-run: a plan may be made away from the cluster
    add = {arm: args.add_trials for arm in (args.arm or [a.name for a in cfg.arms])} if (
        args.add_trials) else None
    from study.runner import run_study
    from study.summary import finish, look_further
    try:
        outcomes = run_study(cfg, address=args.address, resume=args.resume or bool(add),
                             add_trials=add)
    except KeyboardInterrupt:
        print(f"cxr-study: interrupted; the study is saved. Continue it with: cxr-study run "
              f"{args.study} --resume", file=sys.stderr)
        return 130
    uri, experiment = cfg.tracking.uri, cfg.tracking.experiment
    finish(uri, experiment, cfg.storage, {f"{o.task} {o.arm}": o.wall_s for o in outcomes},
           report=not args.no_report)
    print("Look further with:")
    print("\n".join(look_further(uri, experiment, cfg.storage)))
    return 0


def _cmd_best(args: argparse.Namespace) -> int:
    from analysis.runs import best_configs, load_runs
    table = best_configs(load_runs(args.tracking_uri, args.experiment), args.task, args.arm)
    if args.json:
        print(json.dumps(table.to_dict(orient="records"), indent=1, default=str))
    elif table.empty:
        print("no finished search trials yet")
    else:
        ids = ["run_id", "final_run_ids", "search_run_id"]
        shown = table.drop(columns=["config", *ids]).round(4)
        print(shown.to_string(index=False))
        for row in table.itertuples():
            print(f"{row.task} {row.arm}: {json.dumps(row.config, default=str)}; export "
                  f"{row.run_id} ({'a final run' if row.final_run_ids else 'a search trial'})")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from analysis.runs import experiments_in, load_runs, trial_status
    target = Path(args.study)
    if not target.exists():
        raise StudyError(f"{target} does not exist: pass the study directory or its study file")
    if target.is_dir():
        uri = f"sqlite:///{(target / 'mlflow.db').resolve()}"
        names = experiments_in(uri) if (target / "mlflow.db").is_file() else []
        if not names:
            raise StudyError(f"{target} holds no study (no mlflow.db with an experiment): "
                             "pass the study directory or its study file")
    else:
        from study.config import load_study
        cfg = load_study(target)
        uri, names = cfg.tracking.uri, [cfg.tracking.experiment]
    for name in names:
        table = trial_status(load_runs(uri, name))
        print(f"experiment {name} ({uri})")
        print(table.to_string(index=False) if len(table) else "  no trials yet")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from study.export import export_run
    report = export_run(args.tracking_uri, args.run, Path(args.adapter) if args.adapter else None,
                        Path(args.merged) if args.merged else None)
    if report.max_abs_diff is not None:
        print(f"merged vs unmerged logits: max abs diff {report.max_abs_diff:.2e}")
    for path in report.written:
        print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB) from {report.weights}: "
              f"{report.source}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cxr-study", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the embedded end-to-end phantom study")
    demo.add_argument("--dir", default="demo_run", help="demo directory (default: demo_run)")
    demo.set_defaults(func=_cmd_demo)
    run = sub.add_parser("run", help="run a study file")
    run.add_argument("study", help="study file (TOML)")
    run.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    run.add_argument("--address", default=None,
                     help="join a running Ray cluster: auto, HOST:PORT or ray://HOST:PORT")
    run.add_argument("--resume", action="store_true",
                     help="continue a stopped or killed study, or grow a finished one")
    run.add_argument("--add-trials", type=int, default=None, metavar="N",
                     help="N more search trials per task for each arm (implies --resume)")
    run.add_argument("--arm", action="append", default=None,
                     help="with --add-trials: only this arm (repeatable)")
    run.add_argument("--no-report", action="store_true",
                     help="end with the summary table only (write the report later with "
                          "`cxr-study report`)")
    run.set_defaults(func=_cmd_run)
    best = sub.add_parser("best", help="best config per task and arm, from MLflow")
    best.add_argument("--tracking-uri", required=True)
    best.add_argument("--experiment", required=True)
    best.add_argument("--task", default=None)
    best.add_argument("--arm", default=None)
    best.add_argument("--json", action="store_true")
    best.set_defaults(func=_cmd_best)
    status = sub.add_parser("status", help="trials done/stopped/failed/running, from MLflow")
    status.add_argument("study", help="study directory or study file")
    status.set_defaults(func=_cmd_status)
    export = sub.add_parser("export", help="write a trial's adapters or its merged model")
    export.add_argument("run", help="MLflow run id of a final run or trial (see `best --json`)")
    export.add_argument("--tracking-uri", required=True)
    export.add_argument("--adapter", help="adapters + head + fc_norm (safetensors)")
    export.add_argument("--merged", help="full model with LoRA merged, timm layout (safetensors)")
    export.set_defaults(func=_cmd_export)
    from study import (
        convert_command,
        data_commands,
        foundations_command,
        methods_command,
        report_command,
    )
    data_commands.register(sub)
    methods_command.register(sub)
    foundations_command.register(sub)
    report_command.register(sub)
    convert_command.register(sub)
    return parser


def one_line_warnings() -> None:
    """Every warning is one readable line, printed once: no source line under it, no repeats
    (the same advice for every task of a study is still one line)."""
    seen: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        text = " ".join(str(message).split()) or category.__name__
        if text not in seen:
            seen.add(text)
            print(f"cxr-study: warning: {text}", file=file or sys.stderr, flush=True)
    warnings.showwarning = show


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    one_line_warnings()
    # No store-migration chatter (MLflow sets its own level when it is imported).
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    try:
        return args.func(args)
    except StudyError as exc:
        print(f"cxr-study: error: {exc}", file=sys.stderr)
        return 2


def entry() -> None:
    """The `cxr-study` command: `main`, its exit handlers (Ray's shutdown, log flushing), then
    the process ends. The interpreter's own teardown after a study (Ray's core worker, torch,
    gRPC) took another 3 s here and does nothing a finished command needs."""
    code = main()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
