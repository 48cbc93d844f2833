"""Tokenizers: load a checkpoint's (with Qwen's ChatML as the default chat template), build one from GGUF
metadata, or train a small byte-level BPE with ChatML special tokens (tests and the toy demo).

All of them are transformers `PreTrainedTokenizerFast` objects, so `apply_chat_template`, `encode`, `decode`
and `save_pretrained` behave as users expect. None needs torch.

A checkpoint's tokenizer is checked as it is loaded (`check_tokenizer`), because a broken one fails quietly:
transformers builds a 2-token tokenizer for a directory that has tokenizer_config.json but no tokenizer.json, and
every text then encodes to [] while training and evaluation run to the end; ids past the model's vocab_size would
index past the embedding. The rules: SANITY_TEXT encodes to tokens and decodes back with its numbers, every id is
below the model's vocab_size, and the eos and pad tokens are in the vocabulary.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from jaxpatience.config import ModelConfig
from jaxpatience.model.checkpoint_files import CheckpointError

# Qwen2-Instruct's chat template (ChatML with a default system prompt).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# Qwen2's pre-tokenisation regex: digits one by one, words with a leading space, punctuation runs, newlines.
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The same, except that a number and its leading space stay one piece (" 12" rather than " ", "1", "2").
NUMBERS_SPLIT_REGEX = QWEN2_SPLIT_REGEX.replace(r"|\p{N}|", r"| ?\p{N}+|")


# Files that hold a vocabulary: tokenizer.json (fast), vocab.json + merges.txt (BPE) or tokenizer.model (SentencePiece).
VOCABULARY_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")
SANITY_TEXT = "What is 12 + 7? The answer is 19."  # what every tokenizer must encode and decode back
SANITY_NUMBERS = ("12", "7", "19")


def load_tokenizer(path: str | Path, vocab_size: int | None = None) -> PreTrainedTokenizerBase:
    """The checkpoint's own tokenizer; ChatML when it has no chat template; a pad token when it has none.

    It is checked (`check_tokenizer`) against `vocab_size`, the model's number of embedding rows; when None, that
    of the directory's config.json if it has a readable one. Any problem is a one-sentence CheckpointError.

    transformers 5 builds a Qwen2 checkpoint's tokenizer as `Qwen2Tokenizer`, which replaces the pre-tokeniser of
    tokenizer.json by Qwen2's own. When the file's differs (the toy demo's keeps whole numbers together), the file
    is what the tokenizer was trained with, so it is loaded as it is."""
    path = Path(path)
    if path.is_dir() and not any((path / name).is_file() for name in VOCABULARY_FILES):
        raise CheckpointError(
            f"{path} has no tokenizer.json (nor vocab.json or tokenizer.model), so its tokenizer "
            "would encode every text to nothing."
        )
    file = path / "tokenizer.json"
    saved, defined = _read_tokenizer_json(file) if file.is_file() else (None, None)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        if saved is not None and getattr(tokenizer, "backend_tokenizer", None) is not None:
            if saved.get("pre_tokenizer") != json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer"):
                tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path))
    except Exception as err:  # transformers reads config.json and tokenizer_config.json too, and raises anything
        reason = f"{type(err).__name__}: {err}"
        raise CheckpointError(f"{path}: transformers cannot load its tokenizer ({reason}).") from None
    tokenizer = with_defaults(tokenizer)
    vocab_size = vocab_size if vocab_size is not None else _config_vocab_size(path)
    check_tokenizer(tokenizer, vocab_size, str(path), defined)
    return tokenizer


def _read_tokenizer_json(file: Path) -> tuple[dict, set[str]]:
    """(the parsed file, the tokens it defines). The tokens are its model's vocabulary (a dict, or Unigram's
    [piece, score] list) and its added tokens: transformers adds an eos or pad token named in tokenizer_config.json
    but absent from the file as a new id, one the model never learnt (it would never stop), so check_tokenizer
    checks against these."""
    try:
        saved = json.loads(file.read_text(encoding="utf-8"))
        vocab = saved["model"].get("vocab") or {}
        tokens = set(vocab) if isinstance(vocab, dict) else {entry[0] for entry in vocab}
        tokens |= {added["content"] for added in saved.get("added_tokens") or []}
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{file} is not valid JSON ({err.msg} at line {err.lineno}).") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{file} is not UTF-8 text.") from None
    except (KeyError, TypeError, AttributeError, IndexError):
        raise CheckpointError(f"{file} is not a tokenizers file (it lacks a model with a vocabulary).") from None
    return saved, tokens


def _config_vocab_size(path: Path) -> int | None:
    """The vocab_size of the config.json beside a tokenizer, or None (none there, or one the loader will refuse)."""
    if not (path / "config.json").is_file():
        return None
    try:
        return ModelConfig.from_hf(path).vocab_size
    except ValueError:
        return None


def check_tokenizer(
    tokenizer: PreTrainedTokenizerBase, vocab_size: int | None, source: str, defined: Collection[str] | None = None
) -> None:
    """Refuse, in one sentence naming `source`, a tokenizer that would make training or decoding quietly wrong.

    `defined` is the set of tokens its files define (default: its vocabulary now). A vocabulary smaller than
    `vocab_size` is fine (Qwen2 pads its embedding past the tokenizer's last id)."""
    ids = tokenizer.encode(SANITY_TEXT, add_special_tokens=False)
    if not ids:
        raise CheckpointError(f"{source}: its tokenizer encodes {SANITY_TEXT!r} to no tokens at all.")
    decoded = tokenizer.decode(ids)
    if not all(number in decoded for number in SANITY_NUMBERS):
        raise CheckpointError(f"{source}: its tokenizer does not decode {SANITY_TEXT!r} back (got {decoded!r}).")
    vocabulary = tokenizer.get_vocab()
    defined = vocabulary if defined is None else defined
    for role, token in (("eos", tokenizer.eos_token), ("pad", tokenizer.pad_token)):
        if token is None:
            raise CheckpointError(
                f"{source}: its tokenizer names no {role} token (set {role}_token in tokenizer_config.json)."
            )
        if token not in defined:
            raise CheckpointError(f"{source}: its tokenizer's {role} token {token!r} is not in its vocabulary.")
    largest = max(vocabulary.values())
    if vocab_size is not None and largest >= vocab_size:
        raise CheckpointError(
            f"{source}: its tokenizer has token ids up to {largest}, past the model's vocab_size "
            f"{vocab_size} (ids past the embedding would be garbage)."
        )


def with_defaults(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _byte_level_bpe(
    vocab: dict[str, int] | None = None,
    merges: list[tuple[str, str]] | None = None,
    split_regex: str = QWEN2_SPLIT_REGEX,
) -> Tokenizer:
    """A byte-level BPE with Qwen2's pre-tokeniser (empty when vocab/merges are None, for training)."""
    tokenizer = Tokenizer(models.BPE(vocab, merges) if vocab is not None else models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split_regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _wrap(
    tokenizer: Tokenizer, eos_token: str, pad_token: str, chat_template: str | None, bos_token: str | None = None
) -> PreTrainedTokenizerFast:
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=eos_token, pad_token=pad_token, bos_token=bos_token
    )
    wrapped.chat_template = chat_template or CHATML_TEMPLATE
    return wrapped


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 512,
    special_tokens: Sequence[str] = CHATML_SPECIAL_TOKENS,
    split_regex: str = QWEN2_SPLIT_REGEX,
) -> PreTrainedTokenizerFast:
    """Train a small byte-level BPE with ChatML special tokens (eos = <|im_end|>, pad = <|endoftext|>).

    `split_regex` is the pre-tokeniser's pattern: Qwen2's by default (digits one by one); NUMBERS_SPLIT_REGEX keeps
    a number and its leading space together, so that BPE can learn whole numbers as tokens (the toy demo's)."""
    tokenizer = _byte_level_bpe(split_regex=split_regex)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return _wrap(tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML_TEMPLATE)


# GGUF token types (llama.cpp's llama_token_type): 3 = control (special), 4 = user-defined (added).
_GGUF_CONTROL, _GGUF_USER_DEFINED = 3, 4


def tokenizer_from_gguf(metadata: dict) -> PreTrainedTokenizerFast:
    """Build the tokenizer of a qwen2 GGUF file from its `tokenizer.ggml.*` metadata (a gpt2-style BPE)."""
    model_kind = metadata.get("tokenizer.ggml.model")
    if model_kind != "gpt2":
        raise ValueError(f"the GGUF tokenizer is of kind {model_kind!r}; only byte-level BPE ('gpt2') is supported.")
    tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    types: list[int] = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges", [])]
    special = [t for t, kind in zip(tokens, types, strict=True) if kind in (_GGUF_CONTROL, _GGUF_USER_DEFINED)]
    # Every token keeps its GGUF id: special tokens sit in the BPE vocab too, and add_* then marks them as
    # added/special (reusing the existing id) so that they are never split.
    tokenizer = _byte_level_bpe({t: i for i, t in enumerate(tokens)}, merges)
    tokenizer.add_special_tokens([t for t, kind in zip(tokens, types, strict=True) if kind == _GGUF_CONTROL])
    tokenizer.add_tokens([t for t, kind in zip(tokens, types, strict=True) if kind == _GGUF_USER_DEFINED])
    for t in special:
        if tokenizer.token_to_id(t) != tokens.index(t):
            raise ValueError(f"GGUF token {t!r} changed id while rebuilding the tokenizer.")

    def token(key: str) -> str | None:
        index = metadata.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[index] if index is not None else None

    eos = token("eos") or "<|endoftext|>"
    return _wrap(
        tokenizer,
        eos_token=eos,
        pad_token=token("padding") or eos,
        chat_template=metadata.get("tokenizer.chat_template"),
        bos_token=token("bos"),
    )
