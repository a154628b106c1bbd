"""The ``moesim`` command line. Each module in this package that defines ``register(subparsers)``
adds one or more subcommands; they are discovered automatically (adding a command is one new file).

A command's handler is ``func(args) -> int`` set with ``parser.set_defaults(func=...)``. Errors
the user can fix (bad names, bad files) are raised as ValueError/FileNotFoundError and printed as
one line, without a traceback; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moesim", description="Hardware simulator and co-design toolkit for "
                                     "Mixture-of-Experts models.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "register"):
            module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # e.g. `moesim systems | head`: the reader left; not an error of ours
        sys.stderr.close()
        return 0
    except (ValueError, FileNotFoundError, KeyError, ImportError) as exc:
        if args.debug:
            raise
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"moesim {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
