"""``int8mt`` command line: each subcommand lives in ``cli/<name>.py`` and only parses arguments."""
from __future__ import annotations

import argparse
import sys
from importlib import import_module
from pathlib import Path

from .. import __version__
from ..errors import UserError

COMMANDS = ("train", "qat", "compile", "tune", "inspect", "translate", "serve", "evaluate", "bench", "quant-table",
            "verify", "targets")
RUNTIME_ONLY = ("translate", "serve", "evaluate")  # commands that run bundles and never compile


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="int8mt", description="INT8 Transformer machine translation compiled with Apache TVM")
    parser.add_argument("--version", action="version", version=f"int8mt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        import_module(f"{__name__}.{name.replace('-', '_')}").register(sub)
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in sub.choices:
        parser.parse_args(argv)  # --help, --version, or the error naming the valid commands
    # options and positionals in any order (`translate B --beam 4 "text"`): each command's own parser, intermixed
    args = sub.choices[argv[0]].parse_intermixed_args(argv[1:], argparse.Namespace(command=argv[0]))
    if args.command in RUNTIME_ONLY:
        from ..runtime.bundle import use_runtime_library

        use_runtime_library()
    try:
        return int(args.run(args) or 0)
    except (UserError, FileNotFoundError) as err:  # anything else is a bug: its traceback is kept
        print(f"int8mt {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"int8mt {args.command}: interrupted", file=sys.stderr)
        return 130


def port_number(text: str) -> int:
    """An ``argparse`` type: a TCP port to listen on, 1-65535."""
    port = int(text) if text.isdigit() else 0
    if not 0 < port < 1 << 16:
        raise argparse.ArgumentTypeError(f"must be a port number, 1-65535, got {text!r}")
    return port


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None,
                        help="defaults file (default: ./tvm_config.yaml if present, else built-in defaults)")


def database_path(flag: Path | None, configured: str) -> Path | None:
    """The tuning database a command uses: ``--db`` or ``tune.database``; None means the shipped one."""
    chosen = str(flag) if flag is not None else configured
    return None if chosen == "shipped" else Path(chosen)


def config_path(args: argparse.Namespace) -> Path | None:
    if args.config is not None:
        return args.config
    default = Path("tvm_config.yaml")
    return default if default.is_file() else None
