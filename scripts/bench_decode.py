"""Generated tokens/s and time-to-first-token of jaxpatience.generate against transformers' generate.

    python scripts/bench_decode.py --model HF_DIR --batch-size 16 --prompt-len 64 --new-tokens 64

--model is an HF checkpoint directory, or a preset name from jaxpatience.config.PRESETS ("tiny",
"qwen2-0.5b", ...), in which case random weights are saved to a temporary directory first so that both sides
read the same weights (with --no-hf, a preset is initialised in JAX directly and transformers is not used).

Both sides decode greedily from the same random prompts of exactly --prompt-len tokens and must produce exactly
--new-tokens tokens per row: ours is called with stop_tokens=[] (no stop token at all), transformers' with
min_new_tokens=N (it masks EOS until N tokens exist); the script checks the counts. Each figure is the best of
--repeats timed runs after one untimed warm-up run (compilation for us, lazy initialisation for torch):
tokens/s = batch * new_tokens / time of a full generate call; TTFT = time of a generate call with
max_new_tokens=1 (prompt encoding included on both sides, text decoding on ours).

The last line printed is one JSON object: tokens_per_s, ttft_s, hf_tokens_per_s, hf_ttft_s, ratio (ours over
transformers'), batch, prompt_len, new_tokens, device, plus, with --bandwidth-gbs, the memory-bandwidth bound on
tokens/s (every decode step reads all weights and the whole KV cache once).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import jax
import numpy as np


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up: compilation / lazy initialisation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def save_random_checkpoint(preset_name: str, directory: Path, dtype: str) -> Path:
    """Random transformers Qwen2 weights with a preset's shape, saved as an HF checkpoint."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from jaxpatience.config import preset

    torch.manual_seed(0)
    config = Qwen2Config(**{k: v for k, v in preset(preset_name).to_hf().items() if k != "torch_dtype"})
    Qwen2ForCausalLM(config).to(getattr(torch, dtype)).save_pretrained(directory)
    return directory


def random_jax_model(preset_name: str, dtype: str, mesh):
    """A preset-shaped model with random weights made in JAX (no transformers, no files)."""
    from flax import nnx

    from jaxpatience import sharding
    from jaxpatience.config import preset
    from jaxpatience.model import Qwen2ForCausalLM

    config = preset(preset_name).replace(param_dtype=dtype, compute_dtype=dtype)

    def init():
        return nnx.split(Qwen2ForCausalLM(config, rngs=nnx.Rngs(0)))[1]

    graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: Qwen2ForCausalLM(config, rngs=nnx.Rngs(0))))
    out_shardings = sharding.state_shardings(mesh, abstract_state) if mesh is not None else None
    state = jax.jit(init, out_shardings=out_shardings)()  # each weight is created in place, already sharded
    return nnx.merge(graphdef, state)


def bandwidth_bound(model, batch: int, cache_len: int, bandwidth_gbs: float) -> float:
    """Tokens/s if each decode step only had to read every weight and the whole KV cache once."""
    from flax import nnx

    config = model.config
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model)))
    kv_bytes = (2 * config.num_hidden_layers * batch * cache_len * config.num_key_value_heads
                * config.resolved_head_dim * np.dtype(config.compute_dtype).itemsize)  # fmt: skip
    return batch * bandwidth_gbs * 1e9 / (weight_bytes + kv_bytes)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="HF checkpoint directory or a preset name")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure; the best is reported")
    parser.add_argument("--no-hf", action="store_true", help="skip transformers (e.g. a 7B shape on a GPU)")
    parser.add_argument("--mesh", default="", help="e.g. 'data=2,tensor=4'; default: one device")
    parser.add_argument("--bandwidth-gbs", type=float, default=None, help="memory bandwidth for the bound")
    return parser.parse_args(argv)


def load(args: argparse.Namespace, tmp_dir: Path, mesh):
    """(model, tokenizer, path): the path is the HF checkpoint transformers reads (None with --no-hf on a preset).

    A preset gets random weights; presets have no tokenizer (prompts are ids and `.text` stays empty).
    """
    from jaxpatience import load_pretrained
    from jaxpatience.config import PRESETS
    from jaxpatience.weights import load_model

    path = Path(args.model)
    if args.model in PRESETS and not path.exists():
        if args.no_hf:
            return random_jax_model(args.model, args.dtype, mesh), None, None
        path = save_random_checkpoint(args.model, tmp_dir / args.model, args.dtype)
        return load_model(path, args.dtype, mesh=mesh), None, path
    model, tokenizer = load_pretrained(path, param_dtype=args.dtype, mesh=mesh)
    return model, tokenizer, path


def time_transformers(path: Path, prompts: list[list[int]], args: argparse.Namespace) -> dict:
    """transformers' greedy generate on the same prompts and weights: tokens/s, TTFT and torch's thread count."""
    import torch
    from transformers import Qwen2ForCausalLM

    batch, prompt_len, new_tokens = args.batch_size, args.prompt_len, args.new_tokens
    torch_model = Qwen2ForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).eval()
    input_ids = torch.tensor(prompts)
    mask = torch.ones_like(input_ids)

    def theirs(max_new: int):
        with torch.no_grad():
            out = torch_model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False,
                                       max_new_tokens=max_new, min_new_tokens=max_new, pad_token_id=0)  # fmt: skip
        assert out.shape == (batch, prompt_len + max_new)

    hf_seconds = best_time(lambda: theirs(new_tokens), args.repeats)
    return dict(hf_tokens_per_s=batch * new_tokens / hf_seconds, hf_ttft_s=best_time(lambda: theirs(1), args.repeats),
                torch_threads=torch.get_num_threads())  # fmt: skip


def main() -> None:
    args = parse_args()
    from jaxpatience import generate
    from jaxpatience.sharding import make_mesh, parse_mesh

    mesh = make_mesh(**parse_mesh(args.mesh)) if args.mesh else None
    tmp = tempfile.TemporaryDirectory()
    model, tokenizer, path = load(args, Path(tmp.name), mesh)
    batch, prompt_len, new_tokens = args.batch_size, args.prompt_len, args.new_tokens
    rng = np.random.default_rng(0)
    vocab = model.config.vocab_size if tokenizer is None else min(len(tokenizer), model.config.vocab_size)
    prompts = rng.integers(0, vocab, size=(batch, prompt_len)).tolist()

    def ours(max_new: int):
        results = generate(model, tokenizer, prompts, max_new_tokens=max_new, stop_tokens=[], batch_size=batch,
                           mesh=mesh, progress=False)  # fmt: skip
        assert all(len(r.token_ids) == max_new for r in results)

    seconds = best_time(lambda: ours(new_tokens), args.repeats)
    report = dict(
        model=args.model,
        device=f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind} x{len(jax.devices())}",
        dtype=args.dtype,
        batch=batch,
        prompt_len=prompt_len,
        new_tokens=new_tokens,
        tokens_per_s=batch * new_tokens / seconds,
        ttft_s=best_time(lambda: ours(1), args.repeats),
        hf_tokens_per_s=None,
        hf_ttft_s=None,
        ratio=None,
    )
    if args.bandwidth_gbs:
        cache_len = 2 ** (prompt_len - 1).bit_length() + 2 ** (new_tokens - 1).bit_length()  # the bucketed S
        report["bandwidth_bound_tokens_per_s"] = bandwidth_bound(model, batch, cache_len, args.bandwidth_gbs)
    if not args.no_hf:
        report |= time_transformers(path, prompts, args)
        report["ratio"] = report["tokens_per_s"] / report["hf_tokens_per_s"]
    tmp.cleanup()
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in report.items()}))


if __name__ == "__main__":
    main()
