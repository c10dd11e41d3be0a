"""`cxr-study report` (placeholder until implemented)."""

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `report` command to the CLI."""
