"""A checkpoint's files checked before any weight is read (safetensors, index, GGUF), its tokenizer checked as it
is loaded, and the fingerprint a resume compares.

The safetensors rules are held to the reference: every damaged file refused here is refused by the `safetensors`
library too, and every file that library writes is accepted. `jaxpatience info` shows each problem as one line on
stderr with exit status 2.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct

import gguf
import numpy as np
import pytest
from conftest import make_tokenizer
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from jaxpatience.cli import main
from jaxpatience.config import ConfigError, preset
from jaxpatience.durability import identity
from jaxpatience.durability.identity import describe_fingerprint_change, model_fingerprint
from jaxpatience.model.checkpoint_files import (
    CheckpointError,
    open_gguf,
    read_safetensors_header,
    safetensors_headers,
)
from jaxpatience.model.tokenizer import check_tokenizer, load_tokenizer

safetensors_numpy = pytest.importorskip("safetensors.numpy")

TENSORS = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.arange(5, dtype=np.int64)}


def _write_raw(path, header: dict, data: bytes) -> None:
    """A safetensors file with exactly this header and data (to build damaged ones)."""
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def _refused_by_library(path) -> bool:
    try:
        safetensors_numpy.load_file(str(path))
    except Exception:  # the library's SafetensorError, or a plain error on a header it cannot parse
        return True
    return False


# ----------------------------------------------------------------------------------------- safetensors files


def test_every_truncation_and_padding_is_refused_as_the_library_refuses_it(tmp_path):
    good = tmp_path / "good.safetensors"
    safetensors_numpy.save_file(TENSORS, str(good))
    header, data_start = read_safetensors_header(good)  # a file the library wrote is accepted
    assert set(header) - {"__metadata__"} == set(TENSORS) and data_start > 8
    data = good.read_bytes()
    damaged = [data[:cut] for cut in range(len(data))] + [data + b"\0", data + b" " * 64]
    for i, content in enumerate(damaged):
        path = tmp_path / f"bad{i}.safetensors"
        path.write_bytes(content)
        assert _refused_by_library(path), f"the library accepts variant {i}: the case is not a damaged file"
        with pytest.raises(CheckpointError, match=str(path)):
            read_safetensors_header(path)


def test_truncated_file_names_the_first_tensor_cut_off(tmp_path):
    path = tmp_path / "model.safetensors"
    safetensors_numpy.save_file(TENSORS, str(path))
    os.truncate(path, path.stat().st_size - 1)
    with pytest.raises(CheckpointError, match=r"is truncated: tensor '\w' ends at data byte"):
        read_safetensors_header(path)
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(CheckpointError, match="ends inside its .*-byte header"):
        read_safetensors_header(path)
    path.write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="only 3 bytes long"):
        read_safetensors_header(path)


def test_padded_file_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    safetensors_numpy.save_file(TENSORS, str(path))
    path.write_bytes(path.read_bytes() + b"\0" * 10)
    with pytest.raises(CheckpointError, match="has 10 bytes after its last tensor"):
        read_safetensors_header(path)


F32_2x2 = {"dtype": "F32", "shape": [2, 2]}


@pytest.mark.parametrize(
    "header, data_size, message",
    [
        ({"a": F32_2x2 | {"data_offsets": [0, 12]}}, 12, r"tensor 'a' spans 12 bytes, but F32 \[2, 2\] needs 16"),
        ({"a": F32_2x2 | {"data_offsets": [0, 16]}, "b": F32_2x2 | {"data_offsets": [8, 24]}}, 24, "overlap or leave"),
        ({"a": F32_2x2 | {"data_offsets": [4, 20]}}, 20, "starts at data byte 4, expected 0"),
        ({"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 1]}}, 1, "unknown dtype 'Q4'"),
        ({"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, 4, "unknown dtype"),
        ({"a": {"dtype": "F32", "shape": [2]}}, 8, "tensor 'a' has a malformed header entry"),
        ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, 8, "invalid shape or data_offsets"),
        ({"a": F32_2x2 | {"data_offsets": [16, 0]}}, 16, "invalid shape or data_offsets"),
        (["not", "a", "dict"], 0, "not a JSON object"),
    ],
)
def test_bad_header_entries_are_named(tmp_path, header, data_size, message):
    path = tmp_path / "model.safetensors"
    _write_raw(path, header, bytes(data_size))
    assert _refused_by_library(path)
    with pytest.raises(CheckpointError, match=message):
        read_safetensors_header(path)


def test_unreadable_header_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{]" + bytes(8))
    with pytest.raises(CheckpointError, match="unreadable header"):
        read_safetensors_header(path)
    path.write_bytes(struct.pack("<Q", 2**40) + bytes(8))
    with pytest.raises(CheckpointError, match="implausible header size"):
        read_safetensors_header(path)


# ----------------------------------------------------------------------------------------- sharded index


def _sharded(directory, weight_map: dict | None = None):
    """Two shard files of TENSORS ('a' in the first, 'b' in the second) and their index."""
    directory.mkdir(exist_ok=True)
    safetensors_numpy.save_file({"a": TENSORS["a"]}, str(directory / "model-00001-of-00002.safetensors"))
    safetensors_numpy.save_file({"b": TENSORS["b"]}, str(directory / "model-00002-of-00002.safetensors"))
    weight_map = weight_map or {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return directory


def test_sharded_index_is_checked_against_its_files(tmp_path):
    assert len(safetensors_headers(_sharded(tmp_path / "ok"))) == 2
    wrong = _sharded(tmp_path / "wrong", {"a": "model-00002-of-00002.safetensors"})
    with pytest.raises(CheckpointError, match=r"maps tensor 'a' to model-00002-of-00002\.safetensors, which does"):
        safetensors_headers(wrong)
    missing = _sharded(tmp_path / "missing")
    (missing / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"names model-00002-of-00002\.safetensors, which does not exist"):
        safetensors_headers(missing)
    twice = _sharded(tmp_path / "twice")
    safetensors_numpy.save_file(TENSORS, str(twice / "model-00002-of-00002.safetensors"))
    with pytest.raises(CheckpointError, match="tensor 'a' is in both"):
        safetensors_headers(twice)
    damaged = _sharded(tmp_path / "damaged")
    os.truncate(damaged / "model-00001-of-00002.safetensors", 100)
    with pytest.raises(CheckpointError, match=r"model-00001-of-00002\.safetensors is truncated"):
        safetensors_headers(damaged)


@pytest.mark.parametrize("index", ["{not json", '{"metadata": {}}', '{"weight_map": ["a"]}', '{"weight_map": {}}'])
def test_malformed_index_is_refused(tmp_path, index):
    directory = _sharded(tmp_path / "ckpt")
    (directory / "model.safetensors.index.json").write_text(index)
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json (is not a valid|maps no)"):
        safetensors_headers(directory)


# ----------------------------------------------------------------------------------------- GGUF


def _gguf(path):
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_tensor("token_embd.weight", np.ones((8, 4), np.float32))
    writer.add_tensor("output_norm.weight", np.ones(4, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_truncated_or_padded_gguf_is_one_sentence(tmp_path):
    path = _gguf(tmp_path / "m.gguf")
    reader = open_gguf(path)
    assert len(reader.tensors) == 2
    end = max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors)  # the writer pads the file after it
    del reader
    data = path.read_bytes()
    path.write_bytes(data[:end])  # without the alignment padding after the last tensor: complete, accepted
    assert len(open_gguf(path).tensors) == 2
    for cut in (end - 1, end - 17, end // 2, 40, 10):
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=r"m\.gguf is truncated or damaged: its metadata or tensor data"):
            open_gguf(path)
    path.write_bytes(data + bytes(100))
    with pytest.raises(CheckpointError, match=f"has {len(data) + 100 - end} bytes after its last tensor"):
        open_gguf(path)
    path.write_bytes(b"GGML" + data[4:])
    with pytest.raises(CheckpointError, match="does not start with the bytes 'GGUF'"):
        open_gguf(path)
    (tmp_path / "dir.gguf").mkdir()
    with pytest.raises(CheckpointError, match=r"dir\.gguf is not a file"):
        open_gguf(tmp_path / "dir.gguf")


# ----------------------------------------------------------------------------------------- tokenizer sanity


def _tokenizer_dir(path, vocab_size: int | None = None, tokenizer=None):
    """A directory with a tokenizer and the config.json of a tiny model with `vocab_size` (no weights needed)."""
    tokenizer = tokenizer or make_tokenizer()
    tokenizer.save_pretrained(path)
    config = preset("tiny").replace(vocab_size=vocab_size or len(tokenizer))
    (path / "config.json").write_text(json.dumps(config.to_hf()))
    return path


def test_a_sound_tokenizer_loads_also_with_a_larger_model_vocab(tmp_path):
    tokenizer = load_tokenizer(_tokenizer_dir(tmp_path / "tok", vocab_size=512))  # Qwen2 pads its embedding
    assert tokenizer.decode(tokenizer.encode("What is 12 + 7?")) == "What is 12 + 7?"


def test_tokenizer_config_without_tokenizer_json_is_refused(tmp_path):
    """transformers would build a 2-token tokenizer from tokenizer_config.json alone: every text becomes []."""
    path = _tokenizer_dir(tmp_path / "tok")
    (path / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="has no tokenizer.json .* encode every text to nothing"):
        load_tokenizer(path)


def test_tokenizer_that_loses_the_numbers_is_refused(tmp_path):
    words = Tokenizer(models.WordLevel({"[UNK]": 0, "<|im_end|>": 1, "<|endoftext|>": 2, "What": 3}, "[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        unk_token="[UNK]")  # fmt: skip
    with pytest.raises(CheckpointError, match="does not decode 'What is 12 \\+ 7\\? The answer is 19\\.' back"):
        load_tokenizer(_tokenizer_dir(tmp_path / "tok", tokenizer=tokenizer))


def test_tokenizer_larger_than_the_embedding_is_refused(tmp_path):
    path = _tokenizer_dir(tmp_path / "tok", vocab_size=len(make_tokenizer()) - 1)
    with pytest.raises(CheckpointError, match=r"token ids up to 299, past the model's vocab_size 299"):
        load_tokenizer(path)
    with pytest.raises(CheckpointError, match="past the model's vocab_size 100"):
        load_tokenizer(path, vocab_size=100)  # the caller's vocab_size wins over config.json's


@pytest.mark.parametrize("role", ["eos", "pad"])
def test_special_token_missing_from_the_vocabulary_is_refused(tmp_path, role):
    """transformers appends such a token as a new id the model never learnt: generation would never stop."""
    path = _tokenizer_dir(tmp_path / "tok", vocab_size=512)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps(config | {f"{role}_token": "<|nope|>"}))
    with pytest.raises(CheckpointError, match=f"its tokenizer's {role} token '<\\|nope\\|>' is not in its vocab"):
        load_tokenizer(path)


def test_tokenizer_without_eos_is_refused():
    tokenizer = make_tokenizer()
    tokenizer.eos_token = None
    with pytest.raises(CheckpointError, match="src: its tokenizer names no eos token"):
        check_tokenizer(tokenizer, None, "src")


@pytest.mark.parametrize(
    "content, message",
    [("{not json", "is not valid JSON"), ("{}", "is not a tokenizers file"), ("\xff\xfe", "is not UTF-8 text")],
)
def test_unreadable_tokenizer_json_is_one_sentence(tmp_path, content, message):
    path = _tokenizer_dir(tmp_path / "tok")
    (path / "tokenizer.json").write_bytes(content.encode("latin-1"))
    with pytest.raises(CheckpointError, match=rf"tokenizer\.json {message}"):
        load_tokenizer(path)


def test_tokenizer_config_that_transformers_refuses_is_one_sentence(tmp_path):
    path = _tokenizer_dir(tmp_path / "tok")
    (path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="tok: transformers cannot load its tokenizer"):
        load_tokenizer(path)


# ----------------------------------------------------------------------------------------- jaxpatience info


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from jaxpatience.model.weights import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt")


def _damage_weights(path):
    os.truncate(path / "model.safetensors", (path / "model.safetensors").stat().st_size - 4)


def _drop_tokenizer_json(path):
    (path / "tokenizer.json").unlink()


def _shrink_vocab(path):
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"vocab_size": config["vocab_size"] - 8}))


def _grow_tokenizer(path):
    tokenizer = load_tokenizer(path)
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(8)])
    tokenizer.save_pretrained(path)


@pytest.mark.parametrize(
    "damage, message",
    [
        (_damage_weights, "model.safetensors is truncated: tensor"),
        (_drop_tokenizer_json, "has no tokenizer.json"),
        (_shrink_vocab, "weight 'model.embed_tokens.weight' has shape (320, 64), the config implies (312, 64)"),
        (_grow_tokenizer, "token ids up to 327, past the model's vocab_size 320"),
    ],
)
def test_info_and_load_refuse_a_damaged_checkpoint(tiny_dir, tmp_path, capsys, monkeypatch, damage, message):
    from jaxpatience.model import weights

    path = shutil.copytree(tiny_dir, tmp_path / "ckpt")
    assert main(["info", str(path)]) == 0
    capsys.readouterr()
    damage(path)
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("jaxpatience: error: ") and message in err and len(err.splitlines()) == 1
    monkeypatch.setattr(weights, "fill_model", lambda *a, **k: pytest.fail("a weight was read before the check"))
    with pytest.raises(CheckpointError, match=re.escape(message)):
        weights.load_pretrained(path)


# ----------------------------------------------------------------------------------------- fingerprint


def test_fingerprint_names_the_files_that_define_the_model(tiny_dir, tmp_path):
    path = shutil.copytree(tiny_dir, tmp_path / "ckpt")
    (path / "README.md").write_text("notes")
    (path / ".cache").write_text("x")
    fingerprint = model_fingerprint(path)
    assert set(fingerprint) == {p.name for p in tiny_dir.iterdir()}  # config, tokenizer, template, weights
    assert "model.safetensors" in fingerprint and "README.md" not in fingerprint
    copy = shutil.copytree(path, tmp_path / "copy")  # content, not names or times, is what counts
    assert model_fingerprint(copy) == fingerprint
    (path / "chat_template.jinja").write_text("{{ messages }}")
    (path / "generation_config.json").unlink()
    (path / "merges.txt").write_text("a b")
    assert describe_fingerprint_change(fingerprint, model_fingerprint(path)) == (
        "chat_template.jinja changed, merges.txt appeared, generation_config.json disappeared"
    )
    assert describe_fingerprint_change(fingerprint, fingerprint) is None
    with pytest.raises(ConfigError, match="does not exist"):
        model_fingerprint(tmp_path / "nope")


def test_fingerprint_change_lists_three_files_then_a_count():
    saved = {f"model-{i}.safetensors": "x" for i in range(5)}
    current = {name: "y" for name in saved}
    assert describe_fingerprint_change(saved, current) == (
        "model-0.safetensors changed, model-1.safetensors changed, model-2.safetensors changed, 2 more files differ"
    )


def test_sampled_digest_of_a_large_weight_file(tmp_path, monkeypatch):
    """Above FULL_HASH_BELOW a weight file is sampled: a change in the header, a sampled block or the size shows;
    a byte between samples does not (the documented price), and a non-weight file is always hashed in full."""
    monkeypatch.setattr(identity, "FULL_HASH_BELOW", 1 << 20)
    monkeypatch.setattr(identity, "SAMPLES", 4)  # blocks at 0, 1/3, 2/3 and the end
    size, block = 4 << 20, identity.BLOCK
    path = tmp_path / "model.safetensors"
    safetensors_numpy.save_file({"w": np.zeros(size // 4, np.float32)}, str(path))
    digest = identity.file_digest(path)
    assert digest.startswith(f"size:{path.stat().st_size};sampled-sha256:")

    def changed_at(offset: int, content: bytes = b"\x01") -> bool:
        original = path.read_bytes()
        with path.open("r+b") as f:
            f.seek(offset)
            f.write(content)
        result = identity.file_digest(path) != digest
        path.write_bytes(original)
        return result

    total = path.stat().st_size
    assert changed_at(20)  # the header (tensor names and shapes)
    assert changed_at(total - 1)  # the last block
    assert changed_at((total - block) // 3 + 5)  # inside a sampled block
    assert not changed_at(block + 10)  # between samples: not read
    other = tmp_path / "tokenizer.json"
    shutil.copy(path, other)
    assert identity.file_digest(other).startswith("sha256:")
