"""``PaliGemmaCausalLMPreprocessor``: prompts and responses to the backbone's token layout (spec section 8.2).

keras-hub packs with ``MultiSegmentPacker(start=<bos>, end=<eos>, pad=<pad>, sep=[], truncate="round_robin",
padding_side="right")``. No "\\n" is inserted: a PaliGemma prompt must end with "\\n" itself.

Scoring / training (``preprocessor(x)``), with ``sequence_length`` S, packed to S + 1 and then shifted:

    ids  = [bos] + tok(prompt) + tok(response) + [eos] + [pad]*        length S + 1
    seg  =   0   +    0 ... 0  +    1 ... 1    +   1   +   0*
    x = {token_ids: ids[:-1], padding_mask: ids[:-1] != pad, response_mask: seg[:-1] == 1, images: converted}
    y = ids[1:],   sample_weight = (seg == 1)[1:]                   the loss covers the response and the eos

Generation (``generate_preprocess``): ``[bos] + tok(prompt) [+ tok(response)]`` right-padded to S, no eos.

Truncation: when the segments do not fit the budget (S or S + 1 minus the special tokens), round robin keeps one
token of each segment in turn (prompt first) until the budget is used; segments that run out drop out of the turn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from refimpl.image_converter import IMAGE_CONVERTER_CONFIG_FILE, PaliGemmaImageConverter
from refimpl.tokenizer import (TOKENIZER_CONFIG_FILE, PaliGemmaTokenizer, TokenizerError, check_serialized_class,
                               read_json_object)

PREPROCESSOR_CONFIG_FILE = "preprocessor.json"
DEFAULT_SEQUENCE_LENGTH = 1024  # keras-hub (and keras-nlp >= 0.15); keras-nlp 0.12 used 512
ALLOWED_CLASS_NAMES = ("PaliGemmaCausalLMPreprocessor",)
ALLOWED_REGISTERED_NAMES = ("keras_hub>PaliGemmaCausalLMPreprocessor", "keras_nlp>PaliGemmaCausalLMPreprocessor",
                            None)
CONFIG_KEYS = ("sequence_length", "add_start_token", "add_end_token", "tokenizer", "image_converter")
IGNORED_CONFIG_KEYS = ("name", "trainable", "dtype", "config_file")


# ---- packing (keras-hub's MultiSegmentPacker, python path) ----------------------------------------------------
def round_robin_trim(segments: Sequence[Sequence[int]], budget: int) -> list[list[int]]:
    """Keep at most ``budget`` tokens: one from each segment in turn, skipping exhausted segments."""
    if sum(len(s) for s in segments) <= budget:
        return [list(s) for s in segments]
    kept = [0] * len(segments)
    used = 0
    while used < budget:
        for i, segment in enumerate(segments):
            if used < budget and kept[i] < len(segment):
                kept[i] += 1
                used += 1
    return [list(s[:n]) for s, n in zip(segments, kept)]


def pack(segments: Sequence[Sequence[int]], sequence_length: int, *, start: int, end: int, pad: int,
         add_start: bool = True, add_end: bool = True) -> tuple[list[int], list[int]]:
    """(token ids, segment ids) of one example: [start] seg_0 seg_1 ... [end], right-padded to the length.

    The segment id of a token is the index of its segment; start counts as segment 0, end as the last segment,
    padding as 0. There is no separator between segments (PaliGemma's ``sep_value=[]``).
    """
    budget = sequence_length - int(add_start) - int(add_end)
    if budget < 0:
        raise ValueError(f"sequence_length={sequence_length} leaves no room for the start/end tokens")
    trimmed = round_robin_trim(segments, budget)
    ids, seg = ([start], [0]) if add_start else ([], [])
    for index, segment in enumerate(trimmed):
        ids += segment
        seg += [index] * len(segment)
    if add_end:
        ids.append(end)
        seg.append(len(trimmed) - 1)
    padding = sequence_length - len(ids)
    return ids + [pad] * padding, seg + [0] * padding


class PaliGemmaCausalLMPreprocessor:
    """Tokenize, pack and convert images the way keras-hub's PaliGemma preprocessor does.

    Inputs are dicts: ``{"images", "prompts", "responses"}`` for ``__call__`` and ``{"images", "prompts"[,
    "responses"]}`` for ``generate_preprocess``. ``prompts`` is one string (unbatched outputs) or a list of strings.
    """

    def __init__(self, tokenizer: PaliGemmaTokenizer, image_converter: PaliGemmaImageConverter | None = None,
                 sequence_length: int = DEFAULT_SEQUENCE_LENGTH, add_start_token: bool = True,
                 add_end_token: bool = True):
        _check_length(sequence_length, "sequence_length")
        self.tokenizer = tokenizer
        self.image_converter = image_converter
        self.sequence_length = sequence_length
        self.add_start_token = bool(add_start_token)
        self.add_end_token = bool(add_end_token)

    @classmethod
    def from_preset(cls, preset: str | Path, **overrides) -> "PaliGemmaCausalLMPreprocessor":
        """``preprocessor.json`` if the preset has one, else defaults around its tokenizer and image converter."""
        preset = Path(preset)
        kwargs: dict[str, Any] = {}
        config_path = preset / PREPROCESSOR_CONFIG_FILE
        if config_path.is_file():
            document = read_json_object(config_path, "preprocessor config")
            config = check_serialized_class(document, str(config_path), ALLOWED_CLASS_NAMES,
                                            ALLOWED_REGISTERED_NAMES)
            unknown = sorted(set(config) - set(CONFIG_KEYS) - set(IGNORED_CONFIG_KEYS))
            if unknown:
                raise TokenizerError(f"{config_path}: unknown keys {unknown}")
            kwargs = {key: config[key] for key in ("sequence_length", "add_start_token", "add_end_token")
                      if key in config}
        if "tokenizer" not in overrides:
            if not (preset / TOKENIZER_CONFIG_FILE).is_file():
                raise FileNotFoundError(f"preset {preset}: no {TOKENIZER_CONFIG_FILE}, so no preprocessor")
            kwargs["tokenizer"] = PaliGemmaTokenizer.from_preset(preset)
        if "image_converter" not in overrides and (preset / IMAGE_CONVERTER_CONFIG_FILE).is_file():
            kwargs["image_converter"] = PaliGemmaImageConverter.from_preset(preset)
        return cls(**{**kwargs, **overrides})

    def get_config(self) -> dict[str, Any]:
        return {"sequence_length": self.sequence_length, "add_start_token": self.add_start_token,
                "add_end_token": self.add_end_token}

    # ---- the two layouts -----------------------------------------------------------------------------------
    def __call__(self, x: dict[str, Any], sequence_length: int | None = None):
        """Training / scoring layout: returns ``(x, y, sample_weight)`` (see the module docstring)."""
        _check_keys(x, required=("images", "prompts", "responses"), optional=())
        length = _check_length(sequence_length or self.sequence_length, "sequence_length")
        prompts, batched = self._tokenize(x["prompts"], "prompts")
        responses, responses_batched = self._tokenize(x["responses"], "responses")
        _check_same_batch(prompts, responses, batched, responses_batched)
        ids, seg = self._pack([prompts, responses], length + 1, add_start=self.add_start_token,
                              add_end=self.add_end_token)
        out = {"token_ids": ids[:, :-1], "padding_mask": ids[:, :-1] != self.tokenizer.pad_token_id,
               "response_mask": seg[:, :-1] == 1, "images": self._images(x["images"])}
        y, sample_weight = ids[:, 1:], seg[:, 1:] == 1
        if not batched:
            out = {k: (v if k == "images" else v[0]) for k, v in out.items()}
            y, sample_weight = y[0], sample_weight[0]
        return out, y, sample_weight

    def generate_preprocess(self, x: dict[str, Any], sequence_length: int | None = None) -> dict[str, Any]:
        """Generation layout: ``[bos] + prompt [+ response]``, no eos, right-padded; masks as in ``__call__``."""
        _check_keys(x, required=("images", "prompts"), optional=("responses",))
        length = _check_length(sequence_length or self.sequence_length, "sequence_length")
        prompts, batched = self._tokenize(x["prompts"], "prompts")
        segments = [prompts]
        if "responses" in x:
            responses, responses_batched = self._tokenize(x["responses"], "responses")
            _check_same_batch(prompts, responses, batched, responses_batched)
            segments.append(responses)
        # keras-hub's generate_preprocess calls the packer without add_start_value, so bos is always added.
        ids, seg = self._pack(segments, length, add_start=True, add_end=False)
        out = {"images": self._images(x["images"]), "token_ids": ids,
               "response_mask": seg == 1, "padding_mask": ids != self.tokenizer.pad_token_id}
        if not batched:
            out = {k: (v if k == "images" else v[0]) for k, v in out.items()}
        return out

    def generate_postprocess(self, x: dict[str, Any]) -> str | list[str]:
        """Drop masked positions and bos/eos/pad ids, then detokenize (one string per row)."""
        ids = np.asarray(x["token_ids"])
        mask = np.asarray(x["padding_mask"], dtype=bool)
        for special in self.tokenizer.special_token_ids:
            mask = mask & (ids != special)
        if ids.ndim == 1:
            return self.tokenizer.detokenize(ids[mask].tolist())
        return [self.tokenizer.detokenize(row[keep].tolist()) for row, keep in zip(ids, mask)]

    # ---- helpers -------------------------------------------------------------------------------------------
    def prompt_lengths(self, prompts: str | Sequence[str]) -> list[int]:
        """Tokens each prompt occupies in the generation layout, bos included."""
        rows, _ = self._tokenize(prompts, "prompts")
        return [len(row) + 1 for row in rows]

    def _tokenize(self, texts, what: str) -> tuple[list[list[int]], bool]:
        batched = not isinstance(texts, (str, bytes)) and not (isinstance(texts, np.ndarray) and texts.ndim == 0)
        try:
            rows = self.tokenizer.tokenize(list(texts) if batched else texts)
        except ValueError as error:
            raise ValueError(f"input {what!r}: {error}") from None
        if not batched:
            rows = [np.asarray(rows).tolist()]
        return [list(map(int, row)) for row in rows], batched

    def _pack(self, segments: list[list[list[int]]], length: int, *, add_start: bool,
              add_end: bool) -> tuple[np.ndarray, np.ndarray]:
        t = self.tokenizer
        packed = [pack([seg[b] for seg in segments], length, start=t.start_token_id, end=t.end_token_id,
                       pad=t.pad_token_id, add_start=add_start, add_end=add_end)
                  for b in range(len(segments[0]))]
        ids = np.asarray([p[0] for p in packed], dtype=np.int32).reshape(len(packed), length)
        seg = np.asarray([p[1] for p in packed], dtype=np.int32).reshape(len(packed), length)
        return ids, seg

    def _images(self, images):
        return self.image_converter(images) if self.image_converter is not None else images


def _check_keys(x, required: tuple[str, ...], optional: tuple[str, ...]) -> None:
    if not isinstance(x, dict):
        raise ValueError(f"preprocessor input: expected a dict with keys {required}, found {type(x).__name__}")
    missing = [k for k in required if k not in x]
    unknown = sorted(set(x) - set(required) - set(optional))
    if missing or unknown:
        raise ValueError(f"preprocessor input: expected keys {required} (optional {optional}); "
                         f"missing {missing}, unknown {unknown}")


def _check_length(value, name: str) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r}: expected a positive integer")
    return int(value)


def _check_same_batch(prompts, responses, batched: bool, responses_batched: bool) -> None:
    if batched != responses_batched or len(prompts) != len(responses):
        raise ValueError(f"inputs 'prompts' and 'responses': expected the same batch structure, found "
                         f"{len(prompts)} prompt(s) ({'batched' if batched else 'one string'}) and "
                         f"{len(responses)} response(s) ({'batched' if responses_batched else 'one string'})")
