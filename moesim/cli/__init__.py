"""The ``moesim`` command line. Each module in this package that defines ``register(subparsers)``
adds one or more subcommands; they are discovered automatically (adding a command is one new file).

A command's handler is ``func(args) -> int`` set with ``parser.set_defaults(func=...)``. Errors
the user can fix (bad names, bad files) are raised as ValueError/FileNotFoundError and printed as
one line, without a traceback; so are OS errors (permission denied, a directory where a file was
expected, a full disk), running out of memory, and -- as "internal error" -- anything else.
``--debug`` shows the traceback.
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
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"moesim {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 -- every error becomes one line; --debug shows the traceback
        if args.debug:
            raise
        print(f"moesim {args.command}: error: {error_line(exc)}", file=sys.stderr)
        return 2


def error_line(exc: BaseException) -> str:
    """One line for an exception: the message of errors the user can fix, the OS's words and the path
    for OS errors, and the exception type for anything unexpected."""
    if isinstance(exc, KeyError) and exc.args:
        return str(exc.args[0])
    if isinstance(exc, (ValueError, ImportError)):
        return str(exc) or type(exc).__name__
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{where}"
    if isinstance(exc, MemoryError):
        return f"out of memory ({exc or 'the input asks for more memory than this machine has'})"
    if isinstance(exc, OSError):
        return str(exc)
    return f"internal error {type(exc).__name__}: {exc} (run with --debug for the traceback and please report it)"


if __name__ == "__main__":
    sys.exit(main())
