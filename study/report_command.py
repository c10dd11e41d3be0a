"""`cxr-study report`: the report of a study (LoRA vs FFT, every method vs a reference arm), as
Markdown and self-contained HTML."""

from __future__ import annotations

import argparse
from pathlib import Path

from contract.errors import ConfigError
from contract.paths import writable_dir


def _cmd_report(args: argparse.Namespace) -> int:
    from analysis.report import write_report
    if args.n_boot < 100:
        raise ConfigError(f"--n-boot {args.n_boot}: use at least 100 bootstrap replicates "
                          "(1000 or more for a reported CI)")
    out = writable_dir(Path(args.out), "--out")
    page = write_report(args.tracking_uri, args.experiment, out, n_boot=args.n_boot,
                        lora_arm=args.lora_arm, fft_arm=args.fft_arm, seed=args.seed,
                        reference_arm=args.reference_arm)
    print(page)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `report` command to the CLI."""
    report = sub.add_parser("report", help="write report.md and report.html for a study")
    report.add_argument("--tracking-uri", required=True, help="MLflow tracking URI of the study")
    report.add_argument("--experiment", required=True, help="MLflow experiment of the study")
    report.add_argument("--out", required=True, help="folder for report.md, report.html, figures")
    report.add_argument("--n-boot", type=int, default=1000,
                        help="bootstrap replicates for the paired CIs (default: 1000)")
    report.add_argument("--lora-arm", default=None,
                        help="LoRA arm to compare (needed when the study has several)")
    report.add_argument("--fft-arm", default=None,
                        help="FFT arm to compare (needed when the study has several)")
    report.add_argument("--reference-arm", default=None,
                        help="arm to compare every method with (default: the study's one FFT "
                             "arm)")
    report.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: 0)")
    report.set_defaults(func=_cmd_report)
