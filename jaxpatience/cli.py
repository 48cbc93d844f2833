"""`jaxpatience <command>`: a thin dispatcher. Each command's logic lives in its own module.

Built-in here: `info` (describe a checkpoint) and `tiny` (write a tiny random checkpoint, no downloads).
Delegated: `jaxpatience eval ...` calls `jaxpatience.evaluate.main(argv)`, and so on (see DELEGATED).
User errors (bad paths, configs, checkpoints) print one line and exit with status 2; set
JAXPATIENCE_DEBUG=1 to see the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
from pathlib import Path

# command -> (module with `main(argv: list[str]) -> int`, one-line help)
DELEGATED = {
    "demo": ("jaxpatience.demo", "the toy pipeline: base SFT, Patience (DPO), Iterative RPO, report (no downloads)"),
    "train": ("jaxpatience.run", "train with DPO / DPO+NLL / SFT on preference pairs (YAML config + key=value)"),
    "irpo": ("jaxpatience.irpo", "Iterative RPO: sample, pair by correctness, train DPO+NLL, evaluate, repeat"),
    "eval": ("jaxpatience.evaluate", "evaluate a checkpoint on GSM8K / MATH / gsm_symbolic / a local file"),
    "pairs": ("jaxpatience.data.teacher", "build Patience pairs with a teacher model (OpenAI-compatible API)"),
}

TINY_CORPUS = [
    "Tom has 3 apples and buys 4 bags with 5 apples each. How many apples does he have now?",
    "4 bags times 5 apples is 20 apples. 3 + 20 = 23. Let me check: 23 - 20 = 3. The answer is 23.",
    "You are a helpful assistant. Please reason step by step. #### 42",
]


def describe(path: str | Path) -> dict:
    """Facts about a checkpoint without loading its weights (fast on a 7B model)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist.")
    if path.suffix == ".gguf":
        return _describe_gguf(path)
    if not path.is_dir():
        raise ValueError(f"{path} is neither an HF checkpoint directory nor a .gguf file.")
    from jaxpatience.config import ModelConfig
    from jaxpatience.tokenizer import load_tokenizer
    from jaxpatience.weights import SafetensorsReader

    config = ModelConfig.from_hf(path)
    reader = SafetensorsReader(path)
    try:
        tokenizer = load_tokenizer(path)
        raw_template = (path / "chat_template.jinja").is_file() or bool(
            json.loads((path / "tokenizer_config.json").read_text()).get("chat_template")
        )
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} has no loadable tokenizer ({err}).") from None
    return {
        "path": str(path),
        "format": "safetensors" + (" (sharded)" if (path / "model.safetensors.index.json").is_file() else ""),
        "architecture": "Qwen2ForCausalLM",
        "parameters": sum(math.prod(reader.shape(k)) for k in reader.keys()),
        "dtype": ", ".join(sorted({reader.dtype(k) for k in reader.keys()})),
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "heads": f"{config.num_attention_heads} query / {config.num_key_value_heads} kv x {config.resolved_head_dim}",
        "tied_embeddings": config.tie_word_embeddings,
        "vocab_size": config.vocab_size,
        "tokenizer_size": len(tokenizer),
        "chat_template": "from checkpoint" if raw_template else "missing (ChatML default used)",
        "eos_token": tokenizer.eos_token,
    }


def _describe_gguf(path: Path) -> dict:
    import gguf

    from jaxpatience.weights import gguf_config, gguf_to_hf_name, read_gguf_metadata

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as err:  # the gguf package raises assorted errors on a bad file
        raise ValueError(f"{path} is not a readable GGUF file ({err}).") from None
    metadata = read_gguf_metadata(reader)
    names = {gguf_to_hf_name(t.name) for t in reader.tensors}
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embed is None:
        raise ValueError(f"{path} lacks the tensor 'token_embd.weight'.")
    config = gguf_config(metadata, path, tied="lm_head.weight" not in names, vocab_size=int(embed.shape[-1]))
    return {
        "path": str(path),
        "format": "gguf",
        "architecture": "qwen2",
        "parameters": sum(int(t.n_elements) for t in reader.tensors),
        "dtype": ", ".join(sorted({t.tensor_type.name for t in reader.tensors})),
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "heads": f"{config.num_attention_heads} query / {config.num_key_value_heads} kv x {config.resolved_head_dim}",
        "tied_embeddings": config.tie_word_embeddings,
        "vocab_size": config.vocab_size,
        "tokenizer_size": len(metadata.get("tokenizer.ggml.tokens", [])),
        "chat_template": "from checkpoint" if metadata.get("tokenizer.chat_template") else "missing (ChatML default)",
    }


def make_tiny_checkpoint(out: str | Path, seed: int = 0, overwrite: bool = False) -> Path:
    """A tiny random Qwen2 with a small BPE tokenizer (ChatML), saved as an HF checkpoint."""
    from flax import nnx

    from jaxpatience.config import preset
    from jaxpatience.model import Qwen2ForCausalLM
    from jaxpatience.tokenizer import train_bpe_tokenizer
    from jaxpatience.weights import save_pretrained

    tokenizer = train_bpe_tokenizer(TINY_CORPUS, vocab_size=320)
    config = preset("tiny").replace(vocab_size=len(tokenizer), tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config, rngs=nnx.Rngs(seed))
    return save_pretrained(model, tokenizer, out, overwrite=overwrite)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        module = importlib.import_module(DELEGATED[argv[0]][0])
        return _guarded(lambda: module.main(argv[1:]))

    parser = argparse.ArgumentParser(prog="jaxpatience", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = commands.add_parser("info", help="describe a checkpoint (HF directory or .gguf) without loading it")
    info.add_argument("path")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    tiny = commands.add_parser("tiny", help="write a tiny random Qwen2 checkpoint (no downloads)")
    tiny.add_argument("--out", required=True)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    for name, (_, help_text) in DELEGATED.items():
        commands.add_parser(name, help=help_text, add_help=False)
    args = parser.parse_args(argv)

    if args.command == "info":

        def run():
            facts = describe(args.path)
            if args.json:
                print(json.dumps(facts))
            else:
                width = max(map(len, facts))
                for key, value in facts.items():
                    print(f"{key:<{width}}  {value:,}" if isinstance(value, int) and not isinstance(value, bool)
                          else f"{key:<{width}}  {value}")  # fmt: skip
            return 0

        return _guarded(run)
    if args.command == "tiny":
        return _guarded(lambda: print(make_tiny_checkpoint(args.out, args.seed, args.overwrite)) or 0)
    return 2


def _guarded(run) -> int:
    """Run a command; a user error becomes one line on stderr and exit status 2."""
    if os.environ.get("JAXPATIENCE_DEBUG") == "1":
        return run()
    try:
        return run()
    except (ValueError, OSError) as err:  # ConfigError and CheckpointError are ValueErrors
        print(f"jaxpatience: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("jaxpatience: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
