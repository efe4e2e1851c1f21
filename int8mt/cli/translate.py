"""int8mt translate: translate sentences from arguments, files or stdin with a compiled bundle, in this
process or (``--ray``) on a Ray cluster."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import UserError, config_path
from ._decode_args import add_decode_arguments, decode_settings, make_translator

STREAM_LINES = 1024  # input lines translated (batched by length) and written out at a time


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("translate", help="translate text with a compiled bundle")
    p.add_argument("bundle", type=Path, help="bundle directory from `int8mt compile`")
    p.add_argument("text", nargs="*", help="sentences to translate (default: read --input or stdin, one per line)")
    p.add_argument("-i", "--input", type=Path, default=None,
                   help="file with one sentence per line, or a folder of such files")
    p.add_argument("-o", "--output", type=Path, default=None,
                   help="file to write (a folder when --input is one: same file names); default: stdout")
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="translate --input on a Ray cluster with Ray Data (ADDRESS, e.g. auto or ray://HEAD:10001; "
                        "alone: a local Ray on this machine's CPUs)")
    p.add_argument("--workers", type=int, default=None,
                   help="models translating batches in parallel: in this process, sharing the weights (default: 1); "
                        "with --ray, Ray workers, each loading the bundle once (default: the cluster's CPUs / "
                        "--threads; for a CUDA bundle one per free GPU)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads per worker (default: the CPUs / --workers; with --ray: 1)")
    add_decode_arguments(p)
    p.set_defaults(run=run)


def _input_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise UserError(f"input folder {path} has no files to translate")
        return files
    if not path.is_file():
        raise UserError(f"input {path} does not exist")
    return [path]


def _plan(args: argparse.Namespace) -> list[tuple[Path, Path | None]]:
    """(input file, output file or None for stdout) pairs for --input, checked before any work."""
    files = _input_files(args.input)
    if args.input.is_dir():
        if args.output is None:
            raise UserError(f"--input {args.input} is a folder: give an output folder with --output")
        if args.output.is_file():
            raise UserError(f"--input {args.input} is a folder, so --output must be a folder, not the file "
                            f"{args.output}")
        pairs = [(f, args.output / f.relative_to(args.input)) for f in files]
    else:
        if args.output is not None and args.output.is_dir():
            raise UserError(f"--output {args.output} is a folder; give the output file's name")
        pairs = [(files[0], args.output)]
    for source, target in pairs:
        if target is not None and target.resolve() == source.resolve():
            raise UserError(f"--output would overwrite the input {source}; choose another path")
    return pairs


def run(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..data import read_lines, split_lines

    cfg = load_config(config_path(args))
    if args.input is not None:
        if args.text:
            raise UserError("give sentences as arguments or --input, not both")
        pairs = _plan(args)
        if args.ray is not None:
            if args.output is None:
                raise UserError("--ray writes its translations to --output: name the output file or folder")
            return _run_on_ray(args, cfg, [(read_lines(s), t) for s, t in pairs])
        translator = make_translator(args, cfg.decode, args.workers, args.threads)
        for source, target in pairs:
            _translate_to(translator, read_lines(source), target)
        return 0
    if args.ray is not None:
        raise UserError("--ray translates files: give --input FILE (or a folder) and --output")
    if args.text:
        sentences = list(args.text)
        for number, text in enumerate(sentences, 1):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise UserError(f"sentence argument {number} is not valid UTF-8 text") from None
    elif sys.stdin is None or sys.stdin.closed:
        raise UserError("no text to translate: pass sentences as arguments, --input FILE, or text on stdin")
    else:
        try:  # the bytes, decoded strictly (the text layer may escape undecodable bytes instead of failing)
            sentences = split_lines(sys.stdin.buffer.read().decode("utf-8"))
        except UnicodeDecodeError as err:
            raise UserError(f"standard input is not UTF-8 text (byte {err.start} of it)") from None
    _translate_to(make_translator(args, cfg.decode, args.workers, args.threads), sentences, args.output)
    return 0


def _translate_to(translator, sentences: list[str], target: Path | None) -> None:
    """Translate ``sentences`` into ``target`` (stdout if None), each block's lines out before the next starts."""
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
    out = sys.stdout if target is None else open(target, "w", encoding="utf-8")
    try:
        for start in range(0, len(sentences), STREAM_LINES):
            block = translator.translate(sentences[start:start + STREAM_LINES])
            out.write("".join(f"{line}\n" for line in block))
            out.flush()
    finally:
        if target is not None:
            out.close()


def _run_on_ray(args: argparse.Namespace, cfg, inputs: list[tuple[list[str], Path]]) -> int:
    from ..serving.batch import Progress, translate_files
    from ..serving.cluster import WorkerLayout, checked_bundle, connect

    options, batch_size = decode_settings(args, cfg.decode)
    bundle, manifest = checked_bundle(args.bundle, options, batch_size, args.target_lang)
    ray = connect(args.ray)
    layout = WorkerLayout.fit(ray, manifest, args.workers, args.threads)
    progress = Progress()
    try:
        translate_files(ray, bundle, inputs, layout, options, batch_size, progress, args.target_lang)
    except KeyboardInterrupt:
        print(f"int8mt translate: stopped after {progress.written} of {progress.total} lines; the output holds "
              f"the translations of the first {progress.written} input lines", file=sys.stderr)
        raise
    return 0
