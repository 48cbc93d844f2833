"""Cost of one decode step's attention + KV-cache write for a slot-based decoder, per design option.

    python scripts/bench_attention.py --preset tiny
    python scripts/bench_attention.py --batch 64 --cache-len 1024 --kv-heads 2 --groups 7 --head-dim 64 \
        --dtype float32 --steps 20 --repeats 3

B slots each hold a cache of S positions; row b writes its one new key/value (T=1) at its own fill index
idx[b], then its query (K kv heads x G query heads per kv head, head dim H) attends to positions <= idx[b].
Every combination of these options is timed:

  layout  BSKH = cache [B, S, K, H]; BKSH = cache [B, K, S, H]
  write   dus = vmap of lax.dynamic_update_slice; scatter = cache.at[arange(B), idx].set(new);
          onehot = jnp.where(arange(S) == idx[b], new, cache) (reads and writes the whole cache)
  window  W = S / d for d in --window-divs: attention reads only cache[:, :W] (a static bucketed bound
          of max(idx)+1); W = S reads the whole cache
  attn    einsum = explicit einsums, float32 scores, mask arange(W) <= idx[b], softmax;
          dpa = jax.nn.dot_product_attention(implementation=None) with key_value_seq_lengths = idx+1
          (BKSH is transposed to BSKH first, as that function requires)

Each variant is one jitted function that runs --steps decode steps in a lax.fori_loop (the output of a step is
the next step's query, the fill indices advance by one per step) with both caches donated; it is called
--repeats times after one warm-up call, and ms/step = best call time / steps. The fill indices are drawn so
that every step stays below the smallest window, so all variants compute the same thing: before timing, one
step of each is checked against the reference (BSKH, scatter, W = S, einsum): output and both caches must
agree within 1e-5 (float32; 2e-2 for bfloat16). The last line printed is one JSON object {variant: ms/step}.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

LAYOUTS = ("BSKH", "BKSH")
WRITES = ("dus", "scatter", "onehot")
ATTNS = ("einsum", "dpa")
PRESETS = {"tiny": dict(batch=4, cache_len=64, kv_heads=2, groups=2, head_dim=16, steps=5, repeats=2)}


def write(cache, new, idx, layout: str, method: str):
    """Store new [B, K, H] at position idx[b] of row b of the cache."""
    b, k = new.shape[0], new.shape[1]
    s_axis = 1 if layout == "BSKH" else 2
    if method == "dus":
        if layout == "BSKH":
            upd = lambda c, n, i: lax.dynamic_update_slice(c, n[None], (i, 0, 0))
        else:
            upd = lambda c, n, i: lax.dynamic_update_slice(c, n[:, None], (0, i, 0))
        return jax.vmap(upd)(cache, new, idx)
    if method == "scatter":
        if layout == "BSKH":
            return cache.at[jnp.arange(b), idx].set(new)
        return cache.at[jnp.arange(b)[:, None], jnp.arange(k)[None, :], idx[:, None]].set(new)
    onehot = jnp.arange(cache.shape[s_axis])[None, :] == idx[:, None]  # [B, S]
    if layout == "BSKH":
        return jnp.where(onehot[:, :, None, None], new[:, None], cache)
    return jnp.where(onehot[:, None, :, None], new[:, :, None], cache)


def attend(q, ck, cv, idx, layout: str, window: int, attn: str):
    """q [B, K, G, H] attends to cache positions <= idx[b] among the first `window`; returns [B, K, G, H]."""
    b, k, g, h = q.shape
    if layout == "BSKH":
        ck, cv = ck[:, :window], cv[:, :window]
    else:
        ck, cv = ck[:, :, :window], cv[:, :, :window]
    if attn == "dpa":
        if layout == "BKSH":
            ck, cv = ck.transpose(0, 2, 1, 3), cv.transpose(0, 2, 1, 3)
        out = jax.nn.dot_product_attention(
            q.reshape(b, 1, k * g, h), ck, cv, key_value_seq_lengths=idx + 1, implementation=None
        )
        return out.reshape(b, k, g, h)
    kv_spec = "bskh" if layout == "BSKH" else "bksh"
    scores = jnp.einsum(f"bkgh,{kv_spec}->bkgs", q, ck, preferred_element_type=jnp.float32) / np.sqrt(h)
    mask = jnp.arange(window)[None, :] <= idx[:, None]  # [B, W]
    scores = jnp.where(mask[:, None, None, :], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(cv.dtype)
    return jnp.einsum(f"bkgs,{kv_spec}->bkgh", probs, cv)


def make_step(layout, method, window, attn):
    def step(ck, cv, q, kn, vn, idx):
        ck, cv = write(ck, kn, idx, layout, method), write(cv, vn, idx, layout, method)
        return ck, cv, attend(q, ck, cv, idx, layout, window, attn)

    return step


def make_loop(step, steps: int):
    def run(ck, cv, q, kn, vn, idx0):
        def body(i, carry):
            ck, cv, q = carry
            shift = (i + 1).astype(kn.dtype) * 0.01
            return step(ck, cv, q, kn + shift, vn - shift, idx0 + i)

        return lax.fori_loop(0, steps, body, (ck, cv, q))

    return jax.jit(run, donate_argnums=(0, 1))


def make_inputs(args, dtype):
    b, s, k, g, h = args.batch, args.cache_len, args.kv_heads, args.groups, args.head_dim
    w_min = s // max(args.window_divs)
    if w_min < args.steps + 1:
        raise SystemExit(f"smallest window {w_min} must exceed --steps {args.steps}")
    rng = np.random.default_rng(0)
    cache_k = rng.standard_normal((b, s, k, h)).astype(np.float32)
    cache_v = rng.standard_normal((b, s, k, h)).astype(np.float32)
    q = rng.standard_normal((b, k, g, h)).astype(np.float32)
    kn = rng.standard_normal((b, k, h)).astype(np.float32)
    vn = rng.standard_normal((b, k, h)).astype(np.float32)
    idx = rng.integers(0, w_min - args.steps, size=b).astype(np.int32)
    cast = lambda x: jnp.asarray(x, dtype=dtype)
    return cast(cache_k), cast(cache_v), cast(q), cast(kn), cast(vn), jnp.asarray(idx)


def to_layout(x, layout):
    return x if layout == "BSKH" else jnp.swapaxes(x, 1, 2)


def check_parity(variants, inputs, tol: float) -> None:
    ck, cv, q, kn, vn, idx = inputs
    ref = jax.jit(make_step("BSKH", "scatter", ck.shape[1], "einsum"))(ck, cv, q, kn, vn, idx)
    for name, (layout, method, window, attn) in variants.items():
        step = jax.jit(make_step(layout, method, window, attn))
        got = step(to_layout(ck, layout), to_layout(cv, layout), q, kn, vn, idx)
        got = (to_layout(got[0], layout), to_layout(got[1], layout), got[2])
        for label, r, x in zip(("k cache", "v cache", "output"), ref, got, strict=True):
            diff = float(jnp.max(jnp.abs(r.astype(jnp.float32) - x.astype(jnp.float32))))
            if not diff <= tol:
                raise AssertionError(f"{name}: {label} differs from the reference by {diff:.3g} > {tol}")
    print(f"parity: all {len(variants)} variants within {tol} of the reference")


def time_variant(variant, inputs, steps: int, repeats: int) -> float:
    layout, method, window, attn = variant
    ck, cv, q, kn, vn, idx = inputs
    run = make_loop(make_step(layout, method, window, attn), steps)
    ck, cv = to_layout(ck, layout) + 0, to_layout(cv, layout) + 0  # fresh buffers: the loop donates them
    ck, cv, out = run(ck, cv, q, kn, vn, idx)  # warm-up: compilation
    jax.block_until_ready(out)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        ck, cv, out = run(ck, cv, q, kn, vn, idx)
        jax.block_until_ready((ck, cv, out))
        best = min(best, time.perf_counter() - start)
    return best / steps * 1e3


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), help="small shape that runs in seconds")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--cache-len", type=int, default=512)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--groups", type=int, default=7, help="query heads per kv head")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--steps", type=int, default=20, help="decode steps per timed call")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--window-divs", default="1,2,4", help="windows W = S/d, comma-separated d")
    p.add_argument("--layouts", default=",".join(LAYOUTS))
    p.add_argument("--writes", default=",".join(WRITES))
    p.add_argument("--attns", default=",".join(ATTNS))
    args = p.parse_args()
    if args.preset:
        for key, value in PRESETS[args.preset].items():
            setattr(args, key, value)
    args.window_divs = [int(d) for d in args.window_divs.split(",")]
    return args


def main() -> None:
    args = parse_args()
    dtype = jnp.dtype(args.dtype)
    s = args.cache_len
    inputs = make_inputs(args, dtype)
    variants = {}
    for layout, method, div, attn in itertools.product(
        args.layouts.split(","), args.writes.split(","), args.window_divs, args.attns.split(",")
    ):
        variants[f"{layout}/{method}/W={s // div}/{attn}"] = (layout, method, s // div, attn)
    cache_mb = 2 * inputs[0].size * dtype.itemsize / 2**20
    print(
        f"B={args.batch} S={s} K={args.kv_heads} G={args.groups} H={args.head_dim} {args.dtype} "
        f"steps={args.steps} repeats={args.repeats} k+v cache {cache_mb:.1f} MiB device={jax.devices()[0]}"
    )
    check_parity(variants, inputs, 1e-5 if dtype == jnp.float32 else 2e-2)
    results = {name: time_variant(v, inputs, args.steps, args.repeats) for name, v in variants.items()}
    fastest = min(results.values())
    print(f"{'variant':<32} {'ms/step':>9} {'x fastest':>9}")
    for name, ms in sorted(results.items(), key=lambda kv: kv[1]):
        print(f"{name:<32} {ms:>9.3f} {ms / fastest:>9.2f}")
    print(json.dumps({name: round(ms, 4) for name, ms in results.items()}))


if __name__ == "__main__":
    main()
