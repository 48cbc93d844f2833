"""Where the demo's time goes: run `jaxpatience demo` and print, per stage, its wall time and XLA's compile time.

    python scripts/profile_demo.py --out out/demo-profile [--seed S] [--small] [key=value ...]

Compile time is the sum of jax's `/jax/core/compile/backend_compile_duration` events while each stage runs (a
program found in jax's in-memory cache costs nothing and is not counted). Set JAX_LOG_COMPILES=1 to see each
program's name. The demo itself is unchanged: its out folder, resume and report are the usual ones.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from jax import monitoring

from jaxpatience.recipes import demo

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def compile_profile() -> Iterator[dict[str, collections.Counter]]:
    """While open, XLA compile seconds and program counts per demo stage ({"seconds": ..., "programs": ...}): a
    jax.monitoring listener, and the demo's own stage timer told to name the stage that is running."""
    seconds, programs, current = collections.Counter(), collections.Counter(), ["startup"]

    def listen(event: str, duration: float, **_) -> None:
        if event == COMPILE_EVENT and current[0] is not None:
            seconds[current[0]] += duration
            programs[current[0]] += 1

    stage = demo._Timings.stage

    @contextlib.contextmanager
    def named_stage(self, name: str, done: bool):
        current[0] = name
        with stage(self, name, done) as skip:
            yield skip

    monitoring.register_event_duration_secs_listener(listen)
    demo._Timings.stage = named_stage
    try:
        yield {"seconds": seconds, "programs": programs}
    finally:
        demo._Timings.stage = stage
        current[0] = None  # jax keeps its listeners: this one stops counting


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--overwrite", action="store_true", help="delete --out first")
    parser.add_argument("overrides", nargs="*", help="key=value, as for jaxpatience demo")
    args = parser.parse_args()

    config = demo.load_demo_config([f"seed={args.seed}", *args.overrides], small=args.small)
    if args.overwrite and Path(args.out).exists():
        shutil.rmtree(args.out)
    start = time.perf_counter()
    with compile_profile() as profile:
        summary = demo.run_demo(config, args.out, progress=False)
    total = time.perf_counter() - start
    seconds, programs = profile["seconds"], profile["programs"]
    print(f"\n{'stage':<20} {'wall s':>7} {'compile s':>9} {'programs':>8}")
    for name, wall in summary["stage_s"].items():
        print(f"{name:<20} {wall:>7.1f} {seconds[name]:>9.1f} {programs[name]:>8}")
    print(f"{'all':<20} {total:>7.1f} {sum(seconds.values()):>9.1f} {sum(programs.values()):>8}")
    print(json.dumps({"wall_s": total, "compile_s": dict(seconds), "programs": dict(programs)}))


if __name__ == "__main__":
    main()
