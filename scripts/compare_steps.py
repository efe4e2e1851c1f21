"""Decoder-step time of bundles against each other, in one process: each round times ``--steps`` steps of every
bundle in turn (from position ``--position``, after that many steps of prefix), the order reversed every other round,
so that a noisy machine's drift falls on all of them alike. Prints the best and median microseconds per step and
writes the rounds as JSON.

For changes of the compiler (bundles built before and after, loaded by this checkout's runtime); whole translations,
and runtimes of other revisions, are ``scripts/compare_bundles.py``'s.

    python scripts/compare_steps.py build/ende-before build/ende --batch 1 --rounds 15
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundles", nargs="+", type=Path)
    parser.add_argument("--batch", type=int, default=1, help="rows (sentences x beams) per step")
    parser.add_argument("--position", type=int, default=10, help="steps decoded before the timed ones")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per bundle and round")
    parser.add_argument("--source-length", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1, help="TVM threads")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    for name in ("batch", "steps", "source_length", "rounds", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.position < 0:
        parser.error("--position must be at least 0")
    os.environ["TVM_NUM_THREADS"] = str(args.threads)

    import numpy as np

    from int8mt.errors import UserError
    from int8mt.runtime.bundle import Bundle, set_thread_count, use_runtime_library

    use_runtime_library()
    set_thread_count(args.threads)  # as a translator's replica does (TVM then reads no environment per launch)
    try:
        bundles = [Bundle(path) for path in args.bundles]
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rng = np.random.default_rng(0)
    runs = []
    for bundle in bundles:
        src = rng.integers(4, 1000, (args.batch, args.source_length)).astype(np.int64)
        src[:, -1] = bundle.eos_id
        runs.append((bundle, bundle.tensor(src), bundle.encode(src)))

    def step_time(bundle: Bundle, src, cross) -> float:
        cache = bundle.empty_cache(args.batch, args.position + args.steps)
        tokens = np.full((args.batch, 1), bundle.start_id, np.int64)
        for step in range(args.position):
            bundle.decode_step(tokens, step, cache, cross, src)
        start = time.perf_counter()
        for step in range(args.position, args.position + args.steps):
            bundle.decode_step(tokens, step, cache, cross, src)
        return (time.perf_counter() - start) / args.steps * 1e6

    times: list[list[float]] = [[] for _ in bundles]
    for r in range(args.rounds):
        order = range(len(runs)) if r % 2 == 0 else reversed(range(len(runs)))
        for i in order:
            times[i].append(step_time(*runs[i]))
    print(f"{args.rounds} rounds of {args.steps} steps at batch {args.batch}, position {args.position}, "
          f"{args.threads} thread(s); µs per step")
    for path, values in zip(args.bundles, times):
        print(f"{str(path):40s} best {min(values):8.1f}  median {statistics.median(values):8.1f}")
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k not in ("bundles", "json")}
        args.json.write_text(json.dumps({"settings": settings, "bundles": [str(p) for p in args.bundles],
                                         "step_us": times}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
