"""`cxr-study convert SRC DST`: rewrite a checkpoint once as safetensors, weights only.

Training never unpickles anything beyond tensors and ``argparse.Namespace``. A checkpoint that
pickles other objects (optimiser classes, custom configs) is converted here, once: by default it
is refused like everywhere else; with ``--trust-pickle`` it is fully unpickled, which can run
code from the file, so the user must vouch for where it came from. The result holds only tensors
and never needs unpickling again.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from contract.errors import CheckpointError
from contract.paths import safetensors_file

TRUST_HINT = ("if you trust where this file came from, rerun with --trust-pickle (unpickling can "
              "run code from it)")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `convert` command to the CLI."""
    convert = sub.add_parser("convert", help="rewrite a checkpoint as safetensors (weights only)")
    convert.add_argument("src", help="checkpoint to read (torch.save file or safetensors)")
    convert.add_argument("dst", help="safetensors file to write (*.safetensors)")
    convert.add_argument("--trust-pickle", action="store_true",
                         help="fully unpickle SRC, which can run code from it: only for a file "
                              "you vouch for")
    convert.add_argument("--foundation", default=None,
                         help="read the weights where this foundation's files hold them (EVA-X: "
                              "model_ema first); default: under model or state_dict, or flat")
    convert.set_defaults(func=_cmd_convert)


def _cmd_convert(args: argparse.Namespace) -> int:
    from safetensors import safe_open

    from trainables.foundation import CONVERT_HINT, convert_to_safetensors, get_foundation
    from trainables.layouts import MAE

    wrappers = get_foundation(args.foundation).layouts[0].wrappers if args.foundation else (
        MAE.wrappers)
    src, dst = Path(args.src), safetensors_file(Path(args.dst), "DST")
    try:
        convert_to_safetensors(src, dst, trust_pickle=args.trust_pickle, wrappers=wrappers)
    except CheckpointError as err:
        # The library's advice is to run this very command; here the next step is the flag.
        if CONVERT_HINT not in str(err):
            raise
        raise CheckpointError(str(err).replace(CONVERT_HINT, TRUST_HINT)) from err
    if args.trust_pickle and src.suffix != ".safetensors":
        print(f"unpickled {src} fully (no allow-list) because --trust-pickle vouched for it")
    with safe_open(str(dst), framework="pt") as written:
        count = len(written.keys())
    print(f"wrote {dst}: {count} tensors, {dst.stat().st_size / 1e6:.2f} MB")
    return 0
