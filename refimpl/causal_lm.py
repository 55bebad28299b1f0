"""``PaliGemmaCausalLM``: LM logits for scoring, and generation with a KV cache exactly as keras-hub does it.

Scoring (spec 5.1): ``lm(inputs)`` runs the backbone with the prefix-LM mask and returns the tied LM head's logits
(final soft-cap applied) for the text positions only, f[B, T, V]. Logits at text position t predict token t + 1.

Generation (spec 5.2, keras-hub's ``generate_step``), on ``token_ids`` int[B, T] whose ``padding_mask`` marks the
prompt (bos included), right-padded:

1. Image tokens are computed once. The **seed pass** runs all N_img + T positions with the mask
   ``present[s] or s <= t`` (keras calls the layers with ``response_mask=None``), writing every cache slot.
2. ``index`` = the shortest prompt length. For idx = index ... T-1, while some row has not yet produced a stop
   token outside its prompt: feed token ``idx - 1`` at absolute position ``c = N_img + idx - 1`` with a plain causal
   mask ``s <= c`` over the whole cache (plus the sliding band on even layers of PaliGemma 2), overwrite slot c,
   sample from the logits, and write the sample at idx unless ``padding_mask[:, idx]`` (prompt tokens are kept).
3. The returned ``padding_mask`` is all True without stop tokens, else True up to and including each row's first
   stop token after its prompt.

So, for a row with a prompt longer than ``index``, its prompt positions >= index - 1 are recomputed causally while
earlier positions keep what the seed pass computed from the bidirectional view: batched generation is not
row-independent, and no single attention mask over one forward pass reproduces it (the cache holds the seed pass's
values of rows that are later recomputed differently). The full-recompute path (``use_cache=False``) therefore
redoes, for every step, both of keras' passes from scratch: the seed pass over the current sequence, then all of
positions N_img + index - 1 ... c at once under the causal mask. For a batch whose prompts all have the same length
this equals one scoring pass ``lm(inputs)`` with the prompt as prefix and the generated tokens as response.

Golden generation cases can be recorded with ``generate_step(..., return_logits=True)``: it adds the per-step
float32 logits f32[steps, B, V] and the text index each step wrote.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from refimpl import gemma, presets as presets_lib
from refimpl.attention import causal_mask, prefix_lm_mask
from refimpl.inputs import validate_inputs
from refimpl.model import PaliGemmaBackbone
from refimpl.preprocessor import PaliGemmaCausalLMPreprocessor
from refimpl.samplers import Sampler, get_sampler
from refimpl.tokenizer import TOKENIZER_CONFIG_FILE
from refimpl.vit import vit_forward

Progress = Callable[[int, int], None]  # called with (steps done, most steps possible) after each step


# ---- masks ---------------------------------------------------------------------------------------------------
def seed_mask(padding_mask: np.ndarray, num_image_tokens: int) -> np.ndarray:
    """bool[B, L, L] of keras' seed pass: key s is visible if present (image or prompt) or not after the query."""
    present = prefix_lm_mask(padding_mask, None, num_image_tokens)  # response_mask=None: present[s] on every row
    length = present.shape[-1]
    return present | np.tril(np.ones((length, length), dtype=bool))[None]


@dataclass
class KVCache:
    """Keys and values of every decoder layer: f[layers, B, S, K, H] each, S = N_img + T slots."""

    keys: np.ndarray
    values: np.ndarray

    @classmethod
    def zeros(cls, num_layers: int, batch: int, length: int, kv_heads: int, head_dim: int, dtype) -> "KVCache":
        shape = (num_layers, batch, length, kv_heads, head_dim)
        return cls(np.zeros(shape, dtype=dtype), np.zeros(shape, dtype=dtype))


class PaliGemmaCausalLM:
    """keras-hub's ``PaliGemmaCausalLM`` on the NumPy backbone: ``lm(inputs)`` logits and ``lm.generate(...)``."""

    def __init__(self, backbone: PaliGemmaBackbone, preprocessor: PaliGemmaCausalLMPreprocessor | None = None,
                 *, sampler: str | Sampler = "greedy"):
        self.backbone = backbone
        self.preprocessor = preprocessor
        self.sampler = get_sampler(sampler)

    @classmethod
    def from_preset(cls, preset: str | Path, *, load_weights: bool = True, dtype=None, kernels="numpy",
                    preprocessor: bool = True, stream: bool = False, mmap: bool = False) -> "PaliGemmaCausalLM":
        """Backbone from ``config.json`` + weights; preprocessor (tokenizer, image converter) where the preset has
        ``tokenizer.json``. ``dtype=None`` gives float32, as keras-hub's ``from_preset``. ``stream`` and ``mmap``
        are those of ``PaliGemmaBackbone.from_preset`` (generation gives the same tokens with either)."""
        backbone = PaliGemmaBackbone.from_preset(preset, load_weights=load_weights, dtype=dtype, kernels=kernels,
                                                 stream=stream, mmap=mmap)
        directory = Path(preset)
        if not directory.exists() and str(preset) in presets_lib.PRESETS:
            directory = presets_lib.find_local_dir(str(preset))
        has_tokenizer = directory.is_dir() and (directory / TOKENIZER_CONFIG_FILE).is_file()
        pre = PaliGemmaCausalLMPreprocessor.from_preset(directory) if preprocessor and has_tokenizer else None
        return cls(backbone, pre)

    def compile(self, sampler: str | Sampler = "greedy", **sampler_kwargs) -> None:
        """Choose the sampler, as keras' ``compile(sampler=...)`` does (keyword arguments go to its constructor)."""
        self.sampler = get_sampler(sampler, **sampler_kwargs)

    @property
    def config(self):
        return self.backbone.config

    # ---- scoring -------------------------------------------------------------------------------------------
    def __call__(self, inputs: Mapping[str, Any]) -> np.ndarray:
        """LM logits f[B, T, V] at the text positions for the backbone's four inputs (prefix-LM mask)."""
        hidden = self.backbone(inputs)
        return self._lm_head(hidden[:, self.config.image_sequence_length:])

    call = __call__

    def _lm_head(self, hidden: np.ndarray) -> np.ndarray:
        b = self.backbone
        return gemma.lm_head(hidden, b.params.token_embedding, b.config, b.policy, b.kernels)

    # ---- the cached passes (keras' call_with_cache) ---------------------------------------------------------
    def encode_images(self, images: np.ndarray) -> np.ndarray:
        """f[B, N_img, D] image tokens for model-space images f[B, S, S, 3] (validated by the caller)."""
        b = self.backbone
        return vit_forward(images, b.params.vit, b.config, b.policy, b.kernels)

    def seed_cache(self, image_tokens: np.ndarray, token_ids: np.ndarray, padding_mask: np.ndarray) -> KVCache:
        """The seed pass: every position under ``seed_mask``; returns the filled cache."""
        b, c = self.backbone, self.config
        x = np.concatenate([image_tokens, gemma.embed_text(token_ids, b.params.token_embedding, c, b.policy)], 1)
        batch, length, _ = x.shape
        cache = KVCache.zeros(c.num_layers, batch, length, c.num_key_value_heads, c.head_dim, b.policy.dtype)
        mask = seed_mask(padding_mask, c.image_sequence_length)
        positions = np.arange(length)
        for i, block in enumerate(b.params.blocks):
            x = gemma.decoder_block_cached(x, block, c, b.policy, b.kernels, gemma.layer_mask(mask, i, positions, c),
                                           positions, cache.keys[i], cache.values[i])
        return cache

    def step_logits(self, cache: KVCache, tokens: np.ndarray, start: int) -> np.ndarray:
        """Feed tokens int[B, n] at absolute positions start ... start + n - 1, causally over the cache (which they
        update in place); return the logits f[B, V] of the last one. keras feeds one token per step (n = 1)."""
        b, c = self.backbone, self.config
        x = gemma.embed_text(tokens, b.params.token_embedding, c, b.policy)
        positions = np.arange(start, start + tokens.shape[1])
        slots = cache.keys.shape[2]
        mask = np.broadcast_to(causal_mask(positions, slots)[None], (tokens.shape[0], len(positions), slots))
        for i, block in enumerate(b.params.blocks):
            x = gemma.decoder_block_cached(x, block, c, b.policy, b.kernels, gemma.layer_mask(mask, i, positions, c),
                                           positions, cache.keys[i], cache.values[i])
        x = gemma.rms_norm(x[:, -1:], b.params.final_norm, c.layer_norm_epsilon, b.policy, b.kernels)
        return self._lm_head(x)[:, 0]

    def recompute_logits(self, image_tokens: np.ndarray, tokens: np.ndarray, padding_mask: np.ndarray,
                         index: int, idx: int) -> np.ndarray:
        """Logits f[B, V] of generation step ``idx`` recomputed from scratch, with no state kept between steps.

        The seed pass over the current tokens (its rows before N_img + index - 1 see only prompt tokens and tokens
        before them, which never change), then positions N_img + index - 1 ... N_img + idx - 1 in one causal block.
        """
        cache = self.seed_cache(image_tokens, tokens, padding_mask)
        first = index - 1
        return self.step_logits(cache, tokens[:, first:idx], self.config.image_sequence_length + first)

    # ---- generation ----------------------------------------------------------------------------------------
    def generate_step(self, inputs: Mapping[str, Any], stop_token_ids: Sequence[int] | None = None, *,
                      use_cache: bool = True, progress: Progress | None = None,
                      return_logits: bool = False) -> dict[str, np.ndarray]:
        """keras-hub's ``generate_step`` on arrays: ``{"images", "token_ids", "padding_mask"}`` -> the same keys.

        ``images`` are model-space f[B, S, S, 3] (or one [S, S, 3]); ``token_ids`` int[B, T]. With
        ``return_logits`` the result also has ``"logits"`` f32[steps, B, V] and ``"steps"`` int[steps] (the text
        index each step wrote).
        """
        images, token_ids, padding_mask = self._check_generate_inputs(inputs)
        stops = self._check_stop_ids(stop_token_ids)
        n_img = self.config.image_sequence_length
        image_tokens = self.encode_images(images)
        index = int(padding_mask.sum(axis=-1).min())
        tokens = token_ids.copy()
        cache = self.seed_cache(image_tokens, token_ids, padding_mask) if use_cache else None

        def next_logits(idx: int) -> np.ndarray:  # f[B, V] predicting text position idx
            if cache is None:
                return self.recompute_logits(image_tokens, tokens, padding_mask, index, idx)
            return self.step_logits(cache, tokens[:, idx - 1:idx], n_img + idx - 1)

        recorded, steps = [], []
        total = tokens.shape[1] - index
        for idx in range(index, tokens.shape[1]):
            if stops is not None and _all_rows_stopped(tokens, stops, padding_mask):
                break
            logits = np.asarray(next_logits(idx), dtype=np.float32)
            chosen = self.sampler(logits)
            tokens[:, idx] = np.where(padding_mask[:, idx], tokens[:, idx], chosen)
            if return_logits:
                recorded.append(logits)
                steps.append(idx)
            if progress is not None:
                progress(idx - index + 1, total)
        out = {"token_ids": tokens.astype(np.int32),
               "padding_mask": _returned_padding_mask(tokens, stops, padding_mask),
               "images": images}
        if return_logits:
            vocab = self.config.vocabulary_size
            out["logits"] = np.stack(recorded) if recorded else np.zeros((0, len(tokens), vocab), np.float32)
            out["steps"] = np.asarray(steps, dtype=np.int64)
        return out

    def generate(self, inputs: Mapping[str, Any], max_length: int | None = None,
                 stop_token_ids: Sequence[int] | str | None = "auto", strip_prompt: bool = False, *,
                 use_cache: bool = True, progress: Progress | None = None):
        """keras-hub's ``generate``: strings in, strings out with a preprocessor; arrays in and out without.

        With a preprocessor, ``inputs = {"images": raw [0, 255] image(s), "prompts": str or list[str]}`` and the
        result is the detokenized prompt plus completion (only the completion with ``strip_prompt``); ``max_length``
        (text tokens, bos included; default the preprocessor's ``sequence_length``) bounds prompt plus completion.
        Without one, ``inputs`` are ``generate_step``'s arrays and ``max_length`` is ignored, as in keras.
        ``stop_token_ids="auto"`` means ``[<eos>]`` and needs a preprocessor; ``None`` runs to the full length.
        """
        if isinstance(stop_token_ids, str):
            if stop_token_ids != "auto":
                raise ValueError(f'stop_token_ids={stop_token_ids!r}: expected "auto", None or a list of token ids')
            if self.preprocessor is None:
                raise ValueError('stop_token_ids="auto" needs a preprocessor (it means the tokenizer\'s <eos>); '
                                 "pass stop_token_ids=None or a list of token ids")
            stop_token_ids = [self.preprocessor.tokenizer.end_token_id]
        if self.preprocessor is not None:
            x, unbatched = self._preprocess(inputs, max_length)
        else:
            x, unbatched = _batched_arrays(inputs)
        out = self.generate_step(x, stop_token_ids, use_cache=use_cache, progress=progress)
        if strip_prompt:
            out = _strip_prompt(out, np.asarray(x["padding_mask"], dtype=bool))
        if self.preprocessor is not None:
            texts = self.preprocessor.generate_postprocess(out)
            return texts[0] if unbatched else texts
        if unbatched:
            return {key: value[0] for key, value in out.items()}
        return out

    # ---- input handling ------------------------------------------------------------------------------------
    def _preprocess(self, inputs: Mapping[str, Any], max_length: int | None) -> tuple[dict[str, Any], bool]:
        pre = self.preprocessor
        if not isinstance(inputs, Mapping) or "prompts" not in inputs or "images" not in inputs:
            raise ValueError("generate inputs: expected a dict with 'images' and 'prompts' (a preprocessor is "
                             f"attached), found {sorted(inputs) if isinstance(inputs, Mapping) else type(inputs)}")
        length = max_length or pre.sequence_length
        prompts = inputs["prompts"]
        unbatched = isinstance(prompts, (str, bytes))
        for i, n in enumerate(pre.prompt_lengths(prompts)):
            if n > length:
                where = "prompt" if unbatched else f"prompt {i}"
                raise ValueError(f"{where} has {n} tokens (with <bos>) but the sequence length is {length}; "
                                 "shorten it or raise max_length (keras would silently truncate it)")
        try:
            x = pre.generate_preprocess(dict(inputs), sequence_length=max_length)
        except ValueError as error:  # the image converter's errors name the images
            raise ValueError(f"generate inputs: {error}") from None
        batched, _ = _batched_arrays(x)
        return batched, unbatched

    def _check_generate_inputs(self, inputs: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not isinstance(inputs, Mapping):
            raise ValueError(f"generate inputs: expected a dict, found {type(inputs).__name__}")
        missing = [k for k in ("images", "token_ids", "padding_mask") if k not in inputs]
        if missing:
            raise ValueError(f"generate inputs: missing {missing}; expected 'images', 'token_ids', 'padding_mask'")
        images = np.asarray(inputs["images"])
        if images.ndim == 3:  # keras adds the batch axis to a single image
            images = images[None]
        checked = validate_inputs({"images": images, "token_ids": inputs["token_ids"],
                                   "padding_mask": inputs["padding_mask"]}, self.config)
        empty = np.flatnonzero(~checked.padding_mask.any(axis=-1))
        if empty.size:
            raise ValueError(f"input 'padding_mask': row {int(empty[0])} has no prompt token; every row needs at "
                             "least its <bos>")
        return checked.images, checked.token_ids, checked.padding_mask

    def _check_stop_ids(self, stop_token_ids) -> np.ndarray | None:
        if stop_token_ids is None:
            return None
        ids = np.asarray(list(stop_token_ids) if not isinstance(stop_token_ids, np.ndarray) else stop_token_ids)
        vocab = self.config.vocabulary_size
        if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer) or \
                ids.min() < 0 or ids.max() >= vocab:
            raise ValueError(f"stop_token_ids: expected None or a non-empty list of token ids in [0, {vocab}), "
                             f"found {stop_token_ids!r}")
        return ids


# ---- helpers of the generation loop --------------------------------------------------------------------------
def _all_rows_stopped(tokens: np.ndarray, stops: np.ndarray, padding_mask: np.ndarray) -> bool:
    """keras' loop condition: every row has a stop token somewhere outside its prompt."""
    return bool((np.isin(tokens, stops) & ~padding_mask).any(axis=-1).all())


def _returned_padding_mask(tokens: np.ndarray, stops: np.ndarray | None, padding_mask: np.ndarray) -> np.ndarray:
    """All True without stop ids; else True up to and including the first stop token outside the prompt."""
    if stops is None:
        return np.ones(tokens.shape, dtype=bool)
    end = (np.isin(tokens, stops) & ~padding_mask).astype(np.int32)
    return (np.cumsum(end, axis=-1) - end) == 0


def _strip_prompt(out: dict[str, np.ndarray], prompt_mask: np.ndarray) -> dict[str, np.ndarray]:
    """keras' ``strip_prompt``: roll each row left by its prompt length and keep only the generated part."""
    lengths = prompt_mask.sum(axis=-1)
    roll = lambda a: np.stack([np.roll(row, -int(n)) for row, n in zip(a, lengths)])  # noqa: E731
    return {**out, "token_ids": roll(out["token_ids"]),
            "padding_mask": roll(prompt_mask) ^ roll(out["padding_mask"])}


def _batched_arrays(inputs: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
    """Arrays with a batch axis, and whether it was added (1-D token_ids mean one unbatched example)."""
    if not isinstance(inputs, Mapping):
        raise ValueError(f"generate inputs: expected a dict, found {type(inputs).__name__}")
    x = dict(inputs)
    token_ids = np.asarray(x.get("token_ids"))
    unbatched = token_ids.ndim == 1
    if unbatched:
        x["token_ids"] = token_ids[None]
        x["padding_mask"] = np.asarray(x.get("padding_mask"))[None]
        if "response_mask" in x:
            x["response_mask"] = np.asarray(x["response_mask"])[None]
        images = np.asarray(x.get("images"))
        x["images"] = images[None] if images.ndim == 3 else images
    return x, unbatched


def stderr_progress(prefix: str = "generating") -> Progress:
    """A progress callback that rewrites one stderr line, ``generating: step 12/50``; the caller ends the line
    (generation may stop before the last step)."""
    def report(done: int, total: int) -> None:
        print(f"\r{prefix}: step {done}/{total}", end="", file=sys.stderr, flush=True)
    return report
