"""`cxr-study data ...` subcommands (placeholder until implemented)."""

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `data` command group to the CLI."""
