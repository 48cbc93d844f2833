"""The reference cache (training/reference_cache.py): a rerun reads the stored table; other data, weights, template or
dtypes give another key; packed and padded runs of the same pairs train alike."""

from __future__ import annotations

import json
import shutil

import numpy as np
from conftest import make_tokenizer
from test_run import config_args, losses_of, write_pairs

from jaxpatience.data.pairs import PairLoader
from jaxpatience.durability.metrics import read_metrics
from jaxpatience.training import reference_cache
from jaxpatience.training.loop import load_run_config, train


def _run(checkpoint, pairs, out, *extra):
    args = config_args(checkpoint, pairs, out, "train.max_steps=2", "precompute_reference=true", "data.max_length=256",
                       "data.buckets=[256]", *extra)  # padded: 2 rows of 256 per pair; packed: far fewer  # fmt: skip
    return train(load_run_config(None, args), progress=False)


def test_a_rerun_reads_the_table_and_packing_trains_like_padding(tiny_checkpoint, tmp_path, capsys):
    checkpoint, pairs, cache = tiny_checkpoint(), write_pairs(tmp_path / "pairs.jsonl"), tmp_path / "cache"
    _run(checkpoint, pairs, tmp_path / "padded", "data.packing=false", f"data.reference_cache={cache}")
    assert "computed, saved to" in capsys.readouterr().out
    (stored,) = cache.glob("*.npy")
    assert json.loads(stored.with_suffix(".json").read_text())["pairs"] == 24
    _run(checkpoint, pairs, tmp_path / "packed", "data.packing=true", f"data.reference_cache={cache}")
    assert "reusing" in capsys.readouterr().out and len(list(cache.glob("*.npy"))) == 1
    # Packed and padded: the same pairs per step, so the same two steps (float32 rounding apart).
    np.testing.assert_allclose(losses_of(tmp_path / "packed"), losses_of(tmp_path / "padded"), rtol=1e-5)
    padded, packed = (read_metrics(tmp_path / run / "metrics.jsonl")[-1] for run in ("padded", "packed"))
    assert packed["padding_share"] < padded["padding_share"] and packed["tokens_per_s"] > 0
    # The table is what a hit reads: shift the stored chosen log-probs and the first step's rewards move with it.
    table = np.load(stored)
    np.save(stored, table + np.asarray([5.0, 0.0], np.float32))
    _run(checkpoint, pairs, tmp_path / "shifted", f"data.reference_cache={cache}")
    first = read_metrics(tmp_path / "shifted" / "metrics.jsonl")[0]
    beta = load_run_config(None, config_args(checkpoint, pairs, tmp_path)).train.loss.beta
    np.testing.assert_allclose(first["rewards/chosen"], -5.0 * beta, rtol=1e-4)


def test_the_key_changes_with_data_template_weights_and_dtypes(tiny_checkpoint, tmp_path):
    model, other_model = tiny_checkpoint(), tiny_checkpoint(seed=1)
    data, other_data = write_pairs(tmp_path / "a.jsonl"), write_pairs(tmp_path / "b.jsonl", seed=1)
    encode = lambda path, **kw: PairLoader.from_source(str(path), make_tokenizer(), batch_size=4,
                                                       **{"max_length": 160} | kw).pairs  # fmt: skip
    settings = {"param_dtype": "float32", "compute_dtype": "float32"}
    key = lambda model, pairs, settings=settings: reference_cache.cache_key(model, pairs, settings)[0]
    base = key(model, encode(data))
    assert key(model, encode(data)) == base  # deterministic
    assert key(model, encode(data, packing=True)) == base  # the layout does not change the table
    changed = [key(other_model, encode(data)), key(model, encode(other_data)),
               key(model, encode(data, chat_template=False)), key(model, encode(data, max_length=40)),
               key(model, encode(data), settings | {"compute_dtype": "bfloat16"})]  # fmt: skip
    assert len({base, *changed}) == 6
    moved = shutil.copytree(model, tmp_path / "moved")  # the same weights elsewhere: the same table
    assert key(moved, encode(data)) == base
    assert reference_cache.default_directory(str(data)) == tmp_path / ".reference_cache"
