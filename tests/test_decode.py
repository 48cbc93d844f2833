"""Rung 6: decoding. Cached greedy equals an uncached rollout and transformers' greedy generate; stops, sampling,
buckets (no recompilation), sharding, LoRA and bad input.

Most tests share one model and keep prompts <= 16 tokens, max_new_tokens <= 16 and batches <= 4 rows, so they
reuse the same compiled executables and the file runs in well under a minute on two CPU cores.

Near-ties: argmax comparisons between two implementations (or cached vs uncached) are only meaningful where the
top-2 logit gap is larger than float32 noise (~1e-6). The checkpoints use initializer_range=0.1 (larger logits
than HF's 0.02) and every comparison first asserts that the gap along the compared rollout is >= MARGIN, so a
config with a near-tie fails loudly instead of flaking.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import make_hf_checkpoint
from flax import nnx
from transformers import Qwen2ForCausalLM as TorchQwen2

from jaxpatience import generate, load_pretrained
from jaxpatience.config import SamplingConfig
from jaxpatience.generation.api import Generation, Sampler, sample_tokens
from jaxpatience.generation.sampling import ROW_FILTERED, ROW_PLAIN
from jaxpatience.sharding import make_mesh

MARGIN = 1e-4  # the smallest top-1/top-2 logit gap a compared greedy step may have
PROMPTS = [[5, 9, 33, 71, 8], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50], [17, 3]]  # ragged lengths 5, 11, 2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("decode") / "untied", initializer_range=0.1)


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return load_pretrained(checkpoint)


@functools.partial(jax.jit, static_argnames="graphdef")
def _full_forward(state, ids, mask, *, graphdef):
    return nnx.merge(graphdef, state)(ids, attention_mask=mask)  # [B, T, V], no cache


def uncached_rollout(model, prompt: list[int], steps: int) -> tuple[list[int], float]:
    """Greedy tokens by re-running the full uncached forward each step; also the smallest top-2 gap seen.

    The sequence is right-padded to a fixed width (positions come from the mask) so that one compilation serves
    every step.
    """
    graphdef, state = nnx.split(model)
    ids, gaps, width = list(prompt), [], 32
    for _ in range(steps):
        padded = np.zeros((1, width), np.int32)
        padded[0, : len(ids)] = ids
        mask = (np.arange(width) < len(ids)).astype(np.int32)[None]
        logits = np.asarray(_full_forward(state, padded, mask, graphdef=graphdef))[0, len(ids) - 1]
        top2 = np.sort(logits)[-2:]
        gaps.append(top2[1] - top2[0])
        ids.append(int(np.argmax(logits)))
    return ids[len(prompt) :], min(gaps)


def test_cached_greedy_equals_uncached_argmax_rollout(loaded):
    model, tokenizer = loaded
    results = generate(model, tokenizer, PROMPTS, max_new_tokens=12, stop_tokens=[])
    for prompt, result in zip(PROMPTS, results, strict=True):
        expected, gap = uncached_rollout(model, prompt, 12)
        assert gap >= MARGIN, "near-tie in the reference rollout: pick another seed/config"
        assert result.token_ids == expected
        assert result.finish_reason == "length"


@pytest.mark.parametrize("tied", [False, True])
def test_greedy_equals_transformers_generate(tmp_path, tied):
    path = make_hf_checkpoint(tmp_path / "ckpt", tied=tied, initializer_range=0.1)
    model, tokenizer = load_pretrained(path)
    eos, pad, steps = tokenizer.eos_token_id, tokenizer.pad_token_id, 14
    # transformers' input: left-padded ids + attention mask, as its generate() expects for decoder-only models.
    width = max(map(len, PROMPTS))
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in PROMPTS])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    torch_model = TorchQwen2.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        out = torch_model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                                   max_new_tokens=steps, pad_token_id=pad, eos_token_id=eos)  # fmt: skip
    results = generate(model, tokenizer, PROMPTS, max_new_tokens=steps, stop_tokens=[eos])
    for row, (prompt, result) in enumerate(zip(PROMPTS, results, strict=True)):
        hf_new = out[row, width:].tolist()
        hf_ids = hf_new[: hf_new.index(eos)] if eos in hf_new else hf_new  # HF pads after EOS
        _, gap = uncached_rollout(model, prompt, len(hf_ids))
        assert gap >= MARGIN, "near-tie in the compared rollout: pick another seed/config"
        assert result.token_ids == hf_ids
        assert result.finish_reason == ("stop" if eos in hf_new else "length")
        assert result.text == tokenizer.decode(hf_ids, skip_special_tokens=True)


def test_stop_tokens_end_each_row_and_max_new_tokens_is_honoured(loaded):
    model, tokenizer = loaded
    full = [r.token_ids for r in generate(model, tokenizer, PROMPTS, max_new_tokens=12, stop_tokens=[])]
    stop = full[0][3]  # row 0 produces this token at step 3 (or earlier): it must stop there
    results = generate(model, tokenizer, PROMPTS, max_new_tokens=12, stop_tokens=[stop])
    for row, result in zip(full, results, strict=True):
        if stop in row:  # each row stops at its own first stop token, the others run on
            assert result.token_ids == row[: row.index(stop)] and result.finish_reason == "stop"
        else:
            assert result.token_ids == row and result.finish_reason == "length"
    assert len(results[0].token_ids) <= 3
    assert any(stop not in row for row in full), "every row stopped: the test no longer shows per-row stopping"
    # max_new_tokens below the bucket: exactly that many tokens, and they are a prefix of the longer run.
    short = generate(model, tokenizer, PROMPTS, max_new_tokens=5, stop_tokens=[])
    assert [r.token_ids for r in short] == [row[:5] for row in full]
    # A stop token given as a string: the tokenizer's eos.
    by_name = generate(model, tokenizer, PROMPTS, max_new_tokens=12, stop_tokens=[tokenizer.eos_token])
    by_id = generate(model, tokenizer, PROMPTS, max_new_tokens=12, stop_tokens=[tokenizer.eos_token_id])
    assert by_name == by_id


def test_sampling_is_reproducible_and_depends_on_the_seed(loaded):
    model, tokenizer = loaded
    kwargs = dict(max_new_tokens=12, temperature=1.0, stop_tokens=[])
    first = generate(model, tokenizer, PROMPTS, seed=3, **kwargs)
    again = generate(model, tokenizer, PROMPTS, seed=3, **kwargs)
    other = generate(model, tokenizer, PROMPTS, seed=4, **kwargs)
    assert first == again
    assert first != other
    # Per-row keys: a prompt's sample does not depend on the rest of its batch (same prompt index, same seed).
    other_mates = generate(model, tokenizer, PROMPTS[:1] + [[1, 2, 3], [4] * 9], seed=3, **kwargs)
    assert other_mates[0] == first[0] and other_mates[1] != first[1]


def test_num_samples_returns_k_distinct_samples_per_prompt(loaded):
    model, tokenizer = loaded
    results = generate(
        model,
        tokenizer,
        PROMPTS,
        max_new_tokens=8,
        temperature=1.0,
        num_samples=2,
        seed=1,
        stop_tokens=[],
        batch_size=4,
    )  # batch_size 4 rows: two prompts x two samples per batch
    assert len(results) == len(PROMPTS) and all(len(samples) == 2 for samples in results)
    assert all(isinstance(s, Generation) and len(s.token_ids) == 8 for samples in results for s in samples)
    assert any(samples[0].token_ids != samples[1].token_ids for samples in results)


def test_sampling_config_equals_the_keyword_form(loaded):
    """`sampling=SamplingConfig(...)` is the seven sampling arguments at once; mixing both ways is refused."""
    model, tokenizer = loaded
    sampling = SamplingConfig(temperature=1.0, top_p=0.9, top_k=20, num_samples=1, max_new_tokens=10, seed=2)
    keywords = dict(temperature=1.0, top_p=0.9, top_k=20, num_samples=1, max_new_tokens=10, seed=2, stop_tokens=None)
    from_config = generate(model, tokenizer, PROMPTS, sampling=sampling)
    assert from_config == generate(model, tokenizer, PROMPTS, **keywords)
    assert from_config != generate(model, tokenizer, PROMPTS, **{**keywords, "seed": 3})  # the seed is read
    assert all(len(samples) == 1 for samples in from_config)  # an int num_samples: lists [k] per prompt
    for name, value in keywords.items():
        with pytest.raises(ValueError, match=f"either sampling or {name}, not both"):
            generate(model, tokenizer, PROMPTS, sampling=sampling, **{name: value})


def test_temperature_to_zero_and_top_k_one_equal_greedy(loaded):
    model, tokenizer = loaded
    greedy = generate(model, tokenizer, PROMPTS, max_new_tokens=12, stop_tokens=[])
    cold = generate(model, tokenizer, PROMPTS, max_new_tokens=12, temperature=1e-5, stop_tokens=[], seed=7)
    top1 = generate(model, tokenizer, PROMPTS, max_new_tokens=12, temperature=1.5, top_k=1, stop_tokens=[], seed=7)
    assert cold == greedy
    assert top1 == greedy


def test_sample_tokens_respects_top_k_and_top_p():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 256))  # 256 draws of one distribution
    keys = jax.random.split(jax.random.key(0), 256)
    one = jnp.float32(1.0)
    top_k2 = np.asarray(sample_tokens(logits, keys, Sampler(False, 2, False), one, one))
    assert set(top_k2) == {0, 1}
    nucleus = np.asarray(sample_tokens(logits, keys, Sampler(False, 0, True), one, jnp.float32(0.7)))
    assert set(nucleus) == {0, 1}  # 0.5 < 0.7 so token 1 is needed too; 0.8 >= 0.7 so token 2 is not
    plain = np.asarray(sample_tokens(logits, keys, Sampler(False, 0, False), one, one))
    assert set(plain) >= {0, 1, 2}


def test_per_row_sampler_keeps_each_rows_settings_whatever_its_neighbours():
    """Sampler.per_row (the server's slots): each row its own temperature / top_k / top_p; a row's draw does not
    depend on the other rows' settings, and temperature 0 is the argmax."""
    rows = 256
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * rows))
    keys = jax.random.split(jax.random.key(0), rows)
    settings = lambda t, p, k: (jnp.full(rows, t, jnp.float32), jnp.full(rows, p, jnp.float32), jnp.full(rows, k))
    draw = lambda t, p, k, sampler=ROW_FILTERED: np.asarray(sample_tokens(logits, keys, sampler, *settings(t, p, k)))
    assert set(draw(1.0, 1.0, 2)) == {0, 1}
    assert set(draw(1.0, 0.7, 0)) == {0, 1}  # as the static nucleus above
    assert set(draw(1.0, 1.0, 0)) == {0, 1, 2, 3}
    assert np.array_equal(draw(1.0, 1.0, 0, ROW_PLAIN), draw(1.0, 1.0, 0))  # an unfiltered row: either sampler
    assert set(draw(0.0, 1.0, 0)) == {0}  # greedy rows take the argmax
    # Mixed rows: every other row greedy / top-2 / nucleus; the rest plain. Each row equals its uniform draw.
    temperature, top_p, top_k = settings(1.0, 1.0, 0)
    kinds = np.arange(rows) % 4
    temperature = jnp.where(kinds == 1, 0.0, temperature)
    top_k = jnp.where(kinds == 2, 2, top_k)
    top_p = jnp.where(kinds == 3, 0.7, top_p)
    mixed = np.asarray(sample_tokens(logits, keys, ROW_FILTERED, temperature, top_p, top_k))
    uniform = {0: draw(1.0, 1.0, 0), 1: draw(0.0, 1.0, 0), 2: draw(1.0, 1.0, 2), 3: draw(1.0, 0.7, 0)}
    for kind, expected in uniform.items():
        assert np.array_equal(mixed[kinds == kind], expected[kinds == kind])


def test_sharded_decode_on_8_devices_equals_one_device(checkpoint, loaded):
    model, tokenizer = loaded
    assert len(jax.devices()) == 8
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    sharded_model, _ = load_pretrained(checkpoint, mesh=mesh)
    prompts = PROMPTS + [[11, 12, 13, 14]]
    for kwargs in (dict(), dict(temperature=1.0, top_k=20, top_p=0.9, seed=2)):
        single = generate(model, tokenizer, prompts, max_new_tokens=10, stop_tokens=[], **kwargs)
        sharded = generate(sharded_model, tokenizer, prompts, max_new_tokens=10, stop_tokens=[], mesh=mesh, **kwargs)
        assert sharded == single
    # An unsharded model with a mesh is placed by the rule table on the fly.
    assert generate(model, tokenizer, prompts, max_new_tokens=10, stop_tokens=[], mesh=mesh, **kwargs) == single


def test_batches_and_progress_bar_keep_prompt_order(loaded, capsys):
    model, tokenizer = loaded
    prompts = [[i + 3] * (1 + i % 6) for i in range(7)]
    together = generate(model, tokenizer, prompts, max_new_tokens=6, stop_tokens=[], batch_size=4)
    streamed = generate(model, tokenizer, prompts, max_new_tokens=6, stop_tokens=[], batch_size=2, progress=True)
    assert streamed == together
    bar = capsys.readouterr().err
    assert "7/7" in bar and "tokens/s" in bar


def test_unmerged_lora_decodes_like_the_merged_model(checkpoint):
    from jaxpatience.config import LoraConfig
    from jaxpatience.model import lora

    model, tokenizer = load_pretrained(checkpoint)
    base = generate(model, tokenizer, PROMPTS, max_new_tokens=10, stop_tokens=[])
    lora.apply_lora(model, LoraConfig(rank=4, alpha=8.0))
    for i, (_, adapter) in enumerate(lora.adapters(model)):  # B = 0 at init: make the adapters do something
        adapter.lora_B.set_value(0.5 * jax.random.normal(jax.random.key(i), adapter.lora_B.get_value().shape))
    unmerged = generate(model, tokenizer, PROMPTS, max_new_tokens=10, stop_tokens=[])
    lora.merge(model)
    merged = generate(model, tokenizer, PROMPTS, max_new_tokens=10, stop_tokens=[])
    assert unmerged != base  # the adapters are applied
    for prompt, u, m in zip(PROMPTS, unmerged, merged, strict=True):
        _, gap = uncached_rollout(model, prompt, 10)
        assert gap >= MARGIN, "near-tie: pick another adapter init"
        assert u.token_ids == m.token_ids


@pytest.mark.parametrize(
    ("prompts", "kwargs", "message"),
    [
        (["ok", ""], {}, "prompt 1 is empty"),
        ([[]], {}, "prompt 0 is empty"),
        ([[5] * 300], {}, "longer than the model's context of 256"),
        ([[5] * 250], dict(max_new_tokens=10), "lower max_new_tokens"),
        ([[5, 6]], dict(stop_tokens=["<|not a token|>"]), "is not a single token"),
        ([[5, 6]], dict(stop_tokens=[10**6]), "is not a token id"),
        ([[5, 99999]], {}, "outside the vocabulary"),
        ([3.5], {}, "expected a string or a list of token ids"),
        ([[5, 6.5]], {}, "not a flat list of integer token ids"),
        ([[5, 6]], dict(top_p=0.0), "top_p must be in"),
        ([[5, 6]], dict(num_samples=0), "num_samples must be"),
    ],
)
def test_bad_input_gets_one_clear_error(loaded, prompts, kwargs, message):
    model, tokenizer = loaded
    with pytest.raises(ValueError, match=message) as info:
        generate(model, tokenizer, prompts, **{"max_new_tokens": 4, **kwargs})
    assert str(info.value).count(". ") == 0 and str(info.value).endswith(".")  # one sentence
