"""`jaxpatience <command>` (also `python -m jaxpatience`): a dispatcher only; each command lives in its own module.

    demo   recipes/demo.py            train  training/loop.py          irpo   recipes/irpo.py
    eval   evaluation/evaluate.py     pairs  teacher/run.py            serve  serving/app.py
    plan   planning/lab.py            info   model/weights.py's describe_checkpoint
    tiny   model/weights.py's make_tiny_checkpoint
    lm-eval evaluation/harness.py (the [lmeval] extra: lm-evaluation-harness)

Every command's module is imported only when that command runs, so `jaxpatience --help` does not start JAX.
The delegated commands parse their own arguments (`jaxpatience eval --help`). User errors (ValueError, OSError:
bad paths, configs, checkpoints) print one line, `jaxpatience: error: ...`, and exit with status 2; set
JAXPATIENCE_DEBUG=1 to see the traceback instead. A JAX_PLATFORMS naming a backend that cannot start here is one
line too (sharding.backend_start_error). A full disk is one line too, naming the file and what is intact
(DiskFull, durability/store.py), and the rerun resumes. A training run stopped by SIGTERM (with a checkpoint, see
training/preemption.py) exits with status 143, as a process killed by SIGTERM would.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

from jaxpatience.durability.store import DiskFull, is_disk_full

# The commands' modules are imported inside the functions below, when their command runs: they load JAX (or the
# teacher's client), which `jaxpatience --help` and a mistyped command must not wait for.


def _demo(argv: list[str]) -> int:
    from jaxpatience.recipes.demo import main

    return _resumable(main, argv)


def _train(argv: list[str]) -> int:
    from jaxpatience.training.loop import main

    return _resumable(main, argv)


def _irpo(argv: list[str]) -> int:
    from jaxpatience.recipes.irpo import main

    return _resumable(main, argv)


def _resumable(main: Callable[[list[str]], int], argv: list[str]) -> int:
    """Run a command that trains. A training run stopped by SIGTERM (training/preemption.py) is not an error: one
    line, and exit status 143 as for a process killed by SIGTERM; the same command resumes it."""
    from jaxpatience.training.preemption import TERMINATED_EXIT_STATUS, Preempted  # loads JAX, as `main` does

    try:
        return main(argv)
    except Preempted as stop:
        print(f"jaxpatience: {stop}", file=sys.stderr)
        return TERMINATED_EXIT_STATUS


def _eval(argv: list[str]) -> int:
    from jaxpatience.evaluation.evaluate import main

    return main(argv)


def _lm_eval(argv: list[str]) -> int:
    from jaxpatience.evaluation.harness import main

    return main(argv)


def _serve(argv: list[str]) -> int:
    from jaxpatience.serving.app import main

    return main(argv)


def _plan(argv: list[str]) -> int:
    from jaxpatience.planning.lab import main

    return main(argv)


def _pairs(argv: list[str]) -> int:
    from jaxpatience.teacher.run import main

    return main(argv)


# command -> (function of the rest of the command line, help: one line of `jaxpatience --help` at 80 columns)
DELEGATED: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "demo": (_demo, "the toy pipeline: SFT, Patience, Iterative RPO, report (offline)"),
    "train": (_train, "train DPO / DPO+NLL / SFT on preference pairs (YAML + key=value)"),
    "irpo": (_irpo, "Iterative RPO: sample, pair, train DPO+NLL, evaluate, repeat"),
    "eval": (_eval, "evaluate a checkpoint on GSM8K / MATH / gsm_symbolic / a file"),
    "lm-eval": (_lm_eval, "run lm-evaluation-harness tasks on a checkpoint, in-process"),
    "pairs": (_pairs, "build Patience pairs with a teacher model (OpenAI-compatible)"),
    "serve": (_serve, "serve a checkpoint over an OpenAI-compatible HTTP API"),
    "plan": (_plan, "compare meshes for a job without the hardware: memory, collectives, roofline"),
}


def _info(args: argparse.Namespace) -> int:
    """Print a checkpoint's facts: aligned `key  value` lines, or one JSON object with --json."""
    from jaxpatience.model.weights import describe_checkpoint

    facts = describe_checkpoint(args.path)
    if args.json:
        print(json.dumps(facts))
        return 0
    width = max(map(len, facts))
    for key, value in facts.items():
        is_count = isinstance(value, int) and not isinstance(value, bool)  # 494,032,768 reads better
        print(f"{key:<{width}}  {value:,}" if is_count else f"{key:<{width}}  {value}")
    return 0


def _tiny(args: argparse.Namespace) -> int:
    from jaxpatience.config_io import check_output_dir
    from jaxpatience.durability.outputs import claim_folder
    from jaxpatience.model.weights import make_tiny_checkpoint

    check_output_dir(args.out, "the output folder")  # a file in its place, no permission: as save_pretrained says
    # --overwrite replaces only a tiny checkpoint (durability/outputs.py), never another command's folder or yours
    output = claim_folder(args.out, "tiny", "checkpoint", key="--out")
    print(make_tiny_checkpoint(args.out, args.seed, args.overwrite))
    output.mark()
    return 0


def _parser() -> argparse.ArgumentParser:
    """The top-level parser: `info` and `tiny` in full, the delegated commands as names with one help line."""
    parser = argparse.ArgumentParser(
        prog="jaxpatience",
        description="Preference-training LLMs to reason (Patience, Iterative RPO) in JAX/Flax NNX.",
        epilog="`jaxpatience COMMAND --help` lists a command's options.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in DELEGATED.items():
        commands.add_parser(name, help=help_text, add_help=False)
    info = commands.add_parser(
        "info",
        help="describe a checkpoint (HF directory or .gguf) without loading it",
        description="Describe a checkpoint without loading its weights: format, parameter count, dtypes, "
        "layers, heads, vocabulary, tokenizer and chat template, read from an HF directory's config.json, "
        "safetensors headers and tokenizer, or from a .gguf file's metadata. The files are checked as a load "
        "would check them (a damaged file is one sentence).",
    )
    info.add_argument("path", help="an HF checkpoint directory or a .gguf file")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(run=_info)
    tiny = commands.add_parser(
        "tiny",
        help="write a tiny random Qwen2 checkpoint (no downloads)",
        description="Write a tiny random Qwen2 checkpoint made from a seed, with no downloads: an HF checkpoint "
        "folder (config, safetensors weights, a small BPE tokenizer with the ChatML template) that every command "
        "accepts as its model, for trying the pipeline in seconds on a CPU. Its answers are noise.",
    )
    tiny.add_argument("--out", required=True, help="the folder to write (must not exist, or be empty)")
    tiny.add_argument("--seed", type=int, default=0, help="the random seed of the weights (default 0)")
    tiny.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    tiny.set_defaults(run=_tiny)
    return parser


def main(argv: list[str] | None = None) -> int:
    # transformers' advice that PyTorch is absent: this package never needs it (its models are JAX's).
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:  # the command's own parser reads the rest (its --help included)
        command = DELEGATED[argv[0]][0]
        return _guarded(lambda: command(argv[1:]))
    args = _parser().parse_args(argv)
    return _guarded(lambda: args.run(args))


def _guarded(run: Callable[[], int]) -> int:
    """Run a command; a user error becomes one line on stderr and exit status 2 (a traceback with DEBUG)."""
    debug = os.environ.get("JAXPATIENCE_DEBUG") == "1"
    try:
        return run()
    except (ValueError, OSError) as err:  # ConfigError and CheckpointError are ValueErrors
        if debug:
            raise
        print(f"jaxpatience: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except (RuntimeError, AssertionError) as err:  # JAX's backend start failing (a JAX_PLATFORMS it cannot start)
        backend_error = _backend_start_error(err)
        if debug or backend_error is None:
            raise
        print(f"jaxpatience: error: {backend_error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print("jaxpatience: interrupted", file=sys.stderr)
        return 130


def _backend_start_error(err: BaseException) -> ValueError | None:
    """sharding.backend_start_error's sentence where JAX was loaded and its backend failed to start, else None."""
    if "jax" not in sys.modules:  # the command never loaded JAX: the error is not a backend's
        return None
    from jaxpatience.sharding import backend_start_error

    return backend_start_error(err)


def _one_line(err: ValueError | OSError) -> str:
    """The sentence for a user error; a full disk says what is intact (if known) and what to do."""
    if not is_disk_full(err):
        return str(err)
    if isinstance(err, DiskFull):  # names the file and what is intact
        return f"{err}; free space and rerun to resume."
    where = f" while writing {err.filename}" if getattr(err, "filename", None) else ""
    return f"no space left on device{where}; free space and rerun to resume."


if __name__ == "__main__":
    sys.exit(main())
