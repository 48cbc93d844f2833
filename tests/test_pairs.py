"""PairLoader: masks, truncation counts, bucket shapes, seeded order, per-host split, resume, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import make_tokenizer

from jaxpatience.data.pairs import DataError, PairLoader, read_records


def _records(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a, b = rng.integers(1, 99, 2)
        work = " ".join(["Then add one more step."] * int(rng.integers(0, 12)))
        out.append({"prompt": f"Q{i}: what is {a} + {b}?", "chosen": f"{a} + {b} = {a + b}. {work} The answer is "
                    f"{a + b}.", "rejected": f"The answer is {a + b + 1}."})  # fmt: skip
    return out


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _loader(records, **kwargs):
    kwargs = {"batch_size": 4, "max_length": 320, "buckets": (96, 160, 320), "seed": 1} | kwargs
    return PairLoader.from_source(records, make_tokenizer(), **kwargs)


def test_masks_mark_the_response_tokens_and_eos():
    tokenizer = make_tokenizer()
    record = {"prompt": "What is 2 + 3?", "chosen": "2 + 3 = 5. The answer is 5.", "rejected": "The answer is 6."}
    loader = PairLoader.from_source([record] * 2, tokenizer, batch_size=2, max_length=128, buckets=(128,))
    batch = next(iter(loader))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": record["prompt"]}], tokenize=False,
                                           add_generation_prompt=True)  # fmt: skip
    p = len(tokenizer.encode(prompt))
    for side, key in enumerate(("chosen", "rejected")):
        ids, attn, loss = (batch[k][0, side] for k in ("input_ids", "attention_mask", "loss_mask"))
        response = tokenizer.encode(record[key]) + [tokenizer.eos_token_id]
        assert tokenizer.decode(ids[:p]) == prompt
        assert list(ids[p : p + len(response)]) == response
        assert loss.sum() == len(response) and loss[:p].sum() == 0 and loss[p : p + len(response)].all()
        assert attn.sum() == p + len(response) and (ids[attn == 0] == tokenizer.pad_token_id).all()


def test_truncation_keeps_prompt_end_and_counts():
    long_prompt = "filler words here " * 40 + "What is 2 + 3?"
    long_answer = "step " * 200 + "The answer is 5."
    records = [{"prompt": long_prompt, "chosen": long_answer, "rejected": "5"}, *_records(3)]
    loader = _loader(records, max_length=400, max_prompt_length=100, buckets=(400,))
    stats = loader.stats
    assert stats.pairs == 4 and stats.prompts_cut == 1 and stats.responses_cut == 1 and stats.tokens_cut > 200
    pair = loader.pairs[0]
    assert len(pair.prompt) == 100 and len(pair.prompt) + len(pair.chosen) == 400
    tokenizer = make_tokenizer()
    assert tokenizer.decode(pair.prompt).endswith("What is 2 + 3?<|im_end|>\n<|im_start|>assistant\n")
    assert "cut" in stats.summary()


def test_bucket_shapes_are_fixed_and_every_pair_fits():
    loader = _loader(_records(40))
    plan = loader.plan(0)
    shapes = set()
    for bucket, indices in plan:
        batch = loader.make_batch(bucket, indices)
        shapes.add(batch["input_ids"].shape)
        assert all(loader.pairs[i].length <= bucket for i in indices)
    assert shapes <= {(4, 2, 96), (4, 2, 160), (4, 2, 320)} and len(shapes) >= 2
    # leftovers move up a bucket: only fewer than one batch is dropped per epoch
    assert 0 <= loader.dropped_per_epoch < 4 and len(plan) == loader.steps_per_epoch


def test_seeded_order_is_reproducible_and_changes_per_epoch_and_seed():
    order = lambda loader, epoch: np.concatenate([ix for _, ix in loader.plan(epoch)])
    a, b = _loader(_records(40), seed=5), _loader(_records(40), seed=5)
    np.testing.assert_array_equal(order(a, 0), order(b, 0))
    assert not np.array_equal(order(a, 0), order(a, 1))
    assert not np.array_equal(order(a, 0), order(_loader(_records(40), seed=6), 0))
    # within an epoch no pair repeats
    assert len(set(order(a, 0).tolist())) == len(order(a, 0))


def test_hosts_get_disjoint_rows_covering_the_global_batch():
    records = _records(40)
    hosts = [_loader(records, batch_size=8, process_index=i, process_count=2) for i in range(2)]
    whole = _loader(records, batch_size=8)
    for (bucket, indices), step in zip(whole.plan(0), range(5), strict=False):
        rows = [h.make_batch(bucket, indices) for h in hosts]
        assert rows[0]["input_ids"].shape == (4, 2, bucket)
        assert not set(rows[0]["pair_index"]) & set(rows[1]["pair_index"])
        both = np.concatenate([r["input_ids"] for r in rows])
        np.testing.assert_array_equal(both, whole.make_batch(bucket, indices)["input_ids"], err_msg=str(step))


def test_resume_from_state_gives_the_same_batches_across_epochs():
    records = _records(30)
    uninterrupted = _loader(records)
    stream = iter(uninterrupted)
    expected = [next(stream)["pair_index"] for _ in range(3 * uninterrupted.steps_per_epoch)]
    first = _loader(records)
    first_stream = iter(first)
    got = [next(first_stream)["pair_index"] for _ in range(uninterrupted.steps_per_epoch + 2)]
    resumed = _loader(records)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))  # through JSON, as a checkpoint would
    resumed_stream = iter(resumed)
    got += [next(resumed_stream)["pair_index"] for _ in range(len(expected) - len(got))]
    for e, g in zip(expected, got, strict=True):
        np.testing.assert_array_equal(e, g)
    with pytest.raises(DataError, match="does not match"):
        _loader(records[:-1]).load_state_dict(first.state_dict())


def test_schemas_jsonl_parquet_messages(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    plain = _records(4)
    conversational = [{"prompt": [{"role": "user", "content": r["prompt"]}],
                       "chosen": [{"role": "assistant", "content": r["chosen"]}],
                       "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in plain]  # fmt: skip
    aliased = [{"question": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in plain]
    aliased[0]["problem"] = aliased[0]["question"]  # two prompt fields that agree are not ambiguous
    pq.write_table(pa.Table.from_pylist(plain), tmp_path / "pairs.parquet")
    (tmp_path / "list.json").write_text(json.dumps(plain))  # a .json file holds one list of records
    sources = [_write_jsonl(tmp_path / "a.jsonl", plain), tmp_path / "pairs.parquet", tmp_path / "list.json",
               conversational, aliased]  # fmt: skip
    encoded = [_loader(s).pairs for s in sources]
    for other in encoded[1:]:
        for x, y in zip(encoded[0], other, strict=True):
            np.testing.assert_array_equal(x.prompt, y.prompt)
            np.testing.assert_array_equal(x.chosen, y.chosen)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"bad\.jsonl, line 3: not valid JSON"),
        ('{"prompt": "q", "chosen": "a"}', r"bad\.jsonl, line 3: the record has no 'rejected' field"),
        ('{"chosen": "a", "rejected": "b"}', r"bad\.jsonl, line 3: the record has no prompt"),
        ('{"prompt": "q", "chosen": "", "rejected": "b"}', r"bad\.jsonl, line 3: field 'chosen' must be"),
        ("[1, 2]", r"bad\.jsonl, line 3: expected a JSON object"),
        # chat messages: roles from the one table, a prompt ending with the user, responses the assistant's
        (
            '{"prompt": [{"role": "wizard", "content": "q"}], "chosen": "a", "rejected": "b"}',
            r"line 3: prompt\[0\] has role 'wizard'; a role is one of system, user, assistant",
        ),
        (
            '{"prompt": [{"role": "system", "content": "s"}, {"role": "usr", "content": "q"}], "chosen": "a", '
            '"rejected": "b"}',
            r"line 3: prompt\[1\] has role 'usr'",
        ),
        (
            '{"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "chosen": "a", '
            '"rejected": "b"}',
            r"line 3: the last message of 'prompt' has role 'assistant'; it must be 'user'",
        ),
        (
            '{"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}',
            r"line 3: the last message of 'chosen' has role 'user'; it must be 'assistant'",
        ),
        (
            '{"prompt": "q", "chosen": "a", "rejected": [{"role": "assistant", "content": 5}]}',
            r"line 3: rejected\[0\]\.content must be a string",
        ),
        # two prompt fields that differ: which one is meant is not known
        (
            '{"prompt": "q", "question": "another q", "chosen": "a", "rejected": "b"}',
            r"line 3: the record has both 'prompt' and 'question' with different values",
        ),
    ],
)
def test_malformed_record_names_file_and_line(tmp_path, line, message):
    good = json.dumps(_records(1)[0])
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{good}\n{good}\n{line}\n{good}\n")
    with pytest.raises(DataError, match=message):
        _loader(path)


def test_missing_file_and_offline_hub_id(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="does not exist"):
        read_records(tmp_path / "nope.jsonl")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="pass the local .jsonl or .parquet file"):
        read_records("some-user/some-pairs-dataset")


def test_the_loader_never_imports_jax():
    import subprocess
    import sys

    code = "import sys, jaxpatience.data.pairs; print('jax' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_reference_batches_cover_every_pair_once_in_fixed_shapes():
    records = _records(41)
    loader = _loader(records)
    seen, short = [], 0
    for pair_index, batch in loader.reference_batches():
        indices = pair_index[pair_index >= 0]
        assert np.all(pair_index[len(indices) :] == -1)  # the pairs first, then rows to ignore
        bucket = batch["input_ids"].shape[-1]
        assert batch["input_ids"].shape == (4, 2, bucket) and bucket in loader.buckets
        assert all(bucket == min(b for b in loader.buckets if b >= loader.pairs[i].length) for i in indices)
        np.testing.assert_array_equal(batch["pair_index"][: len(indices)], indices)  # the first rows are the pairs
        assert set(batch["pair_index"].tolist()) == set(indices.tolist())  # the other rows repeat them
        seen += indices.tolist()
        short += len(indices) < 4
    assert sorted(seen) == list(range(len(records))) and short >= 1  # each pair once; some batch was padded
    # Hosts: the same pairs in the same order, each host holding its rows of the global batch.
    hosts = [_loader(records, batch_size=8, process_index=i, process_count=2) for i in range(2)]
    whole = _loader(records, batch_size=8)
    for (indices, batch), *parts in zip(whole.reference_batches(), *(h.reference_batches() for h in hosts),
                                         strict=True):  # fmt: skip
        for part_indices, _ in parts:
            np.testing.assert_array_equal(part_indices, indices)
        both = np.concatenate([rows["input_ids"] for _, rows in parts])
        np.testing.assert_array_equal(both, batch["input_ids"])
