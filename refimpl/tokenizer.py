"""``PaliGemmaTokenizer``: keras-hub's SentencePiece tokenizer for PaliGemma, on the ``sentencepiece`` package.

keras-hub's ``PaliGemmaTokenizer`` is a ``GemmaTokenizer`` is a ``SentencePieceTokenizer`` (spec section 8.1). Without
TensorFlow it runs exactly this: ``SentencePieceProcessor(model_proto=...).Encode(texts, add_bos, add_eos)``, with
``add_bos = add_eos = False`` (the preprocessor's packer adds bos/eos). Special tokens are looked up **by piece**:
``<bos>``, ``<eos>`` and ``<pad>`` (ids 2, 1, 0 in the Gemma vocabulary), and all three must exist.

A preset stores the tokenizer as two files (``tokenizer.save_to_preset``):

    tokenizer.json                      {"class_name": "PaliGemmaTokenizer", "config": {..., "proto": null}}
    assets/tokenizer/vocabulary.spm     the SentencePiece model proto (4.2 MB for the real 257152-piece vocabulary)

Non-goals: string outputs (keras' ``dtype="string"``), the TensorFlow-text path, SentencePiece sampling.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from refimpl import files
from refimpl.files import read_bytes_limited, read_json_limited

# The pieces keras-hub's GemmaTokenizer registers as special tokens (attribute name -> piece).
START_TOKEN, END_TOKEN, PAD_TOKEN = "<bos>", "<eos>", "<pad>"
TOKENIZER_CONFIG_FILE = "tokenizer.json"
VOCABULARY_ASSET = Path("assets") / "tokenizer" / "vocabulary.spm"
# The real PaliGemma proto is 4.2 MB; anything past this is not a tokenizer.
MAX_PROTO_BYTES = 64 << 20
MAX_CONFIG_BYTES = 1 << 20
ALLOWED_CLASS_NAMES = ("PaliGemmaTokenizer", "GemmaTokenizer")
ALLOWED_REGISTERED_NAMES = ("keras_hub>PaliGemmaTokenizer", "keras_nlp>PaliGemmaTokenizer",
                            "keras_hub>GemmaTokenizer", "keras_nlp>GemmaTokenizer", None)
# tokenizer.json config keys: the ones that change behaviour, and the ones that do not.
CONFIG_KEYS = ("proto", "sequence_length", "add_bos", "add_eos")
IGNORED_CONFIG_KEYS = ("name", "trainable", "dtype", "config_file")


class TokenizerError(ValueError):
    """A tokenizer file or config that cannot be used."""


def read_small_file(path: Path, what: str, limit: int) -> bytes:
    return read_bytes_limited(path, what, limit, TokenizerError)


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from a small file; a clear error for anything else."""
    document = read_json_limited(path, what, MAX_CONFIG_BYTES, TokenizerError)
    if not isinstance(document, dict):
        raise TokenizerError(f"{what} {path}: expected a JSON object, found {type(document).__name__}")
    return document


def check_serialized_class(document: dict[str, Any], source: str, class_names: Sequence[str],
                           registered_names: Sequence[str | None]) -> dict[str, Any]:
    return files.check_serialized_class(document, source, class_names, registered_names, TokenizerError)


def _load_processor(proto: bytes, source: str):
    import sentencepiece as spm  # the one third-party dependency of this module

    processor = spm.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(proto)
    except Exception as error:  # sentencepiece raises RuntimeError or OSError with a parser message
        raise TokenizerError(f"{source}: not a SentencePiece model proto ({error})") from None
    return processor


class PaliGemmaTokenizer:
    """SentencePiece tokenizer with keras-hub's PaliGemma behaviour.

    ``tokenizer("caption en\\n")`` gives int32[n]; a list of strings gives a list of id lists (or int32[B, L] padded
    with ``<pad>`` when ``sequence_length`` is set, truncating longer rows). ``detokenize`` reverses it.
    """

    def __init__(self, proto: bytes | str | Path, *, sequence_length: int | None = None, add_bos: bool = False,
                 add_eos: bool = False):
        if isinstance(proto, (str, Path)):
            source = str(proto)
            proto = read_small_file(Path(proto), "SentencePiece proto", MAX_PROTO_BYTES)
        elif isinstance(proto, (bytes, bytearray)):
            source = "SentencePiece proto bytes"
            if len(proto) > MAX_PROTO_BYTES:
                raise TokenizerError(f"{source}: {len(proto)} bytes; expected at most {MAX_PROTO_BYTES}")
        else:
            raise TokenizerError(f"proto: expected a file path or bytes, found {type(proto).__name__}")
        if sequence_length is not None and (not isinstance(sequence_length, int) or sequence_length < 1):
            raise TokenizerError(f"sequence_length={sequence_length!r}: expected None or a positive integer")
        self.proto = bytes(proto)
        self.sequence_length = sequence_length
        self.add_bos, self.add_eos = bool(add_bos), bool(add_eos)
        self._sp = _load_processor(self.proto, source)
        self._vocabulary = [self._sp.IdToPiece(i) for i in range(self._sp.GetPieceSize())]
        self._token_to_id = {piece: i for i, piece in enumerate(self._vocabulary)}
        missing = [p for p in (START_TOKEN, END_TOKEN, PAD_TOKEN) if p not in self._token_to_id]
        if missing:
            raise TokenizerError(f"{source}: special tokens {missing} are not pieces of this vocabulary "
                                 f"({len(self._vocabulary)} pieces); PaliGemma needs <bos>, <eos> and <pad>")
        self.start_token_id = self._token_to_id[START_TOKEN]
        self.end_token_id = self._token_to_id[END_TOKEN]
        self.pad_token_id = self._token_to_id[PAD_TOKEN]

    # ---- loading --------------------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, preset: str | Path) -> "PaliGemmaTokenizer":
        """Read ``tokenizer.json`` and ``assets/tokenizer/vocabulary.spm`` from a preset directory."""
        preset = Path(preset)
        config_path = preset / TOKENIZER_CONFIG_FILE
        document = read_json_object(config_path, "tokenizer config")
        config = check_serialized_class(document, str(config_path), ALLOWED_CLASS_NAMES, ALLOWED_REGISTERED_NAMES)
        return cls.from_config(config, preset / VOCABULARY_ASSET, source=str(config_path))

    @classmethod
    def from_config(cls, config: dict[str, Any], proto: bytes | str | Path, *,
                    source: str = "tokenizer config") -> "PaliGemmaTokenizer":
        """Build from the inner config of ``tokenizer.json`` plus the vocabulary asset."""
        unknown = sorted(set(config) - set(CONFIG_KEYS) - set(IGNORED_CONFIG_KEYS))
        if unknown:
            raise TokenizerError(f"{source}: unknown keys {unknown}; expected {CONFIG_KEYS + IGNORED_CONFIG_KEYS}")
        if config.get("proto") is not None:
            raise TokenizerError(f"{source}: 'proto' must be null (a preset keeps the vocabulary in "
                                 f"{VOCABULARY_ASSET}), found a {type(config['proto']).__name__}")
        dtype = config.get("dtype")
        dtype_name = dtype.get("config", {}).get("name") if isinstance(dtype, dict) else dtype
        if dtype_name not in (None, "int32", "int64"):
            raise TokenizerError(f"{source}: dtype {dtype_name!r} is not supported; expected int32 token ids")
        for key in ("add_bos", "add_eos"):
            if not isinstance(config.get(key, False), bool):
                raise TokenizerError(f"{source}: {key}={config[key]!r}; expected true or false")
        return cls(proto, sequence_length=config.get("sequence_length"), add_bos=config.get("add_bos", False),
                   add_eos=config.get("add_eos", False))

    def get_config(self) -> dict[str, Any]:
        return {"proto": None, "sequence_length": self.sequence_length, "add_bos": self.add_bos,
                "add_eos": self.add_eos}

    # ---- vocabulary -----------------------------------------------------------------------------------------
    def vocabulary_size(self) -> int:
        return len(self._vocabulary)

    def get_vocabulary(self) -> list[str]:
        return list(self._vocabulary)

    @property
    def special_token_ids(self) -> list[int]:
        """The ids keras' ``generate_postprocess`` strips: bos, eos and pad."""
        return sorted({self.start_token_id, self.end_token_id, self.pad_token_id})

    def id_to_token(self, id: int) -> str:
        if not isinstance(id, (int, np.integer)) or isinstance(id, bool) or not 0 <= id < len(self._vocabulary):
            raise ValueError(f"id_to_token: id must be an integer in [0, {len(self._vocabulary) - 1}], found {id!r}")
        return self._vocabulary[int(id)]

    def token_to_id(self, token: str | bytes) -> int:
        """The id of a piece; like keras-hub, an unknown piece maps to the ``<unk>`` id."""
        if isinstance(token, bytes):
            token = token.decode("utf-8")
        return self._token_to_id.get(token, self._sp.unk_id())

    # ---- tokenizing -----------------------------------------------------------------------------------------
    def tokenize(self, inputs: str | bytes | Sequence[str] | np.ndarray):
        """int32[n] for one string; a list of id lists (int32[B, sequence_length] if set) for a batch."""
        texts, batched = _canonical_texts(inputs)
        rows = self._sp.Encode(texts, add_bos=self.add_bos, add_eos=self.add_eos)
        if self.sequence_length:
            length = self.sequence_length
            rows = [row[:length] + [self.pad_token_id] * (length - len(row[:length])) for row in rows]
            out = np.asarray(rows, dtype=np.int32).reshape(len(rows), length)
            return out if batched else out[0]
        if not batched:
            return np.asarray(rows[0], dtype=np.int32)
        return rows

    __call__ = tokenize

    def detokenize(self, ids) -> str | list[str]:
        """A string for one id sequence (or a single id), a list of strings for a batch."""
        rows, batched = _canonical_ids(ids, len(self._vocabulary))
        texts = self._sp.Decode(rows)
        return texts if batched else texts[0]


def _canonical_texts(inputs) -> tuple[list[str], bool]:
    """(list of str, batched?) from a string, bytes, a list/tuple of them, or a 0-/1-D array of them."""
    if isinstance(inputs, np.ndarray):
        if inputs.ndim > 1:
            raise ValueError(f"tokenize: expected a string or a 1-D batch of strings, found shape {inputs.shape}")
        batched = inputs.ndim == 1
        inputs = inputs.tolist() if batched else inputs.item()
    else:
        batched = isinstance(inputs, (list, tuple))
    items = list(inputs) if batched else [inputs]
    texts = []
    for i, item in enumerate(items):
        if isinstance(item, bytes):
            item = item.decode("utf-8")
        if not isinstance(item, str):
            where = f"element {i}" if batched else "input"
            raise ValueError(f"tokenize: {where} must be a string, found {type(item).__name__}")
        texts.append(item)
    return texts, batched


def _canonical_ids(ids, vocabulary_size: int) -> tuple[list[list[int]], bool]:
    """(list of id lists, batched?) from an int, a flat sequence, a list of sequences or a 0/1/2-D array."""
    if isinstance(ids, (int, np.integer)) and not isinstance(ids, bool):
        rows, batched = [[int(ids)]], False
    elif isinstance(ids, np.ndarray):
        if ids.ndim > 2 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
            raise ValueError(f"detokenize: expected integer ids of rank 0, 1 or 2, found {ids.dtype} {ids.shape}")
        batched = ids.ndim == 2
        rows = ids.tolist() if batched else [np.atleast_1d(ids).tolist()]
    elif isinstance(ids, (list, tuple)):
        batched = bool(ids) and not isinstance(ids[0], (int, np.integer))
        rows = [list(map(_as_int, row)) for row in ids] if batched else [list(map(_as_int, ids))]
    else:
        raise ValueError(f"detokenize: expected an int, a sequence of ints or a batch of them, "
                         f"found {type(ids).__name__}")
    for row in rows:
        for value in row:
            if not 0 <= value < vocabulary_size:
                raise ValueError(f"detokenize: token id {value} is outside [0, {vocabulary_size})")
    return rows, batched


def _as_int(value) -> int:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    raise ValueError(f"detokenize: expected integer token ids, found {type(value).__name__} {value!r}")
