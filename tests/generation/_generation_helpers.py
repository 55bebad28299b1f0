"""Shared pieces of the generation tests: a tiny SentencePiece vocabulary, tiny model configs, keras-hub runs.

keras and keras-hub are imported only inside the functions that need them (after KERAS_BACKEND=jax is set by
tests/conftest.py), so the tests that do not need keras run without it.
"""

from __future__ import annotations

import io
import random
import struct
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from tools.keras_oracle import keras_hub_available

# keras-hub is installed here and in CI; elsewhere the tests that need it skip with this reason.
needs_keras = pytest.mark.skipif(not keras_hub_available(), reason="keras-hub not installed")

VOCABULARY_SIZE = 211  # odd, and distinct from every other size below
SPECIAL_SYMBOLS = ["<loc0000>", "<loc0001>", "<loc1023>", "<seg000>", "<seg127>", "\n"]
IMAGE_SIZE = 28  # 2 x 2 patches of 14: 4 image tokens
SEQUENCE_LENGTH = 12

_COMMON = dict(vocabulary_size=VOCABULARY_SIZE, image_size=IMAGE_SIZE, vit_patch_size=14, vit_num_heads=2,
               vit_hidden_dim=8, vit_num_layers=1, vit_intermediate_dim=12)
CONFIGS = {
    # Gemma-1 style: no post-norms, no soft-caps, no sliding window; K < N (grouped queries).
    "pg1": dict(_COMMON, num_layers=2, num_query_heads=4, num_key_value_heads=2, hidden_dim=16,
                intermediate_dim=26, head_dim=6),
    # Gemma-2 style. Window 3 is far shorter than the 4 + 12 positions; final cap 30 does not saturate the logits
    # (spec 0.3: a cap of 0.3 made greedy ties).
    "pg2": dict(_COMMON, num_layers=3, num_query_heads=4, num_key_value_heads=1, hidden_dim=18,
                intermediate_dim=22, head_dim=8, use_post_ffw_norm=True, use_post_attention_norm=True,
                attention_logit_soft_cap=50.0, final_logit_soft_cap=30.0, use_sliding_window_attention=True,
                sliding_window_size=3),
}
# Ragged prompts (bos included) of lengths 3, 2 and 6, right-padded to SEQUENCE_LENGTH - 1 = 11 text tokens.
PROMPT_IDS = [[2, 20, 30], [2, 21], [2, 5, 6, 7, 8, 9]]


def train_vocabulary(path: Path, seed: int = 0) -> Path:
    """Train a tiny unigram SentencePiece model with the Gemma special ids and write it to ``path``.

    <pad>=0, <eos>=1, <bos>=2, <unk>=3 (as keras-hub's Gemma/PaliGemma tokenizers expect), then the user symbols
    (a few <locXXXX>/<segXXX> and "\\n"), then learned pieces. Identity normalisation and no dummy prefix, like
    Gemma's vocabulary. Takes about 0.1 s.
    """
    import sentencepiece as spm

    rng = random.Random(seed)
    syllables = "ka lo mi ne ru ta se po di gu an en in on the cat dog cow red sky".split()
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(300)]
    sentences = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(3000)]
    buffer = io.BytesIO()
    spm.set_random_generator_seed(seed)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=buffer, vocab_size=VOCABULARY_SIZE, model_type="unigram",
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>", user_defined_symbols=SPECIAL_SYMBOLS, normalization_rule_name="identity",
        add_dummy_prefix=False, remove_extra_whitespaces=False, minloglevel=2, num_threads=1)
    path.write_bytes(buffer.getvalue())
    return path


def prompt_batch(seed: int = 0, batch_rows=(0, 1, 2)) -> dict[str, np.ndarray]:
    """Model-space images f32[B, 28, 28, 3] and right-padded ragged prompts int32[B, 11] with their mask."""
    rng = np.random.default_rng(seed)
    length = SEQUENCE_LENGTH - 1
    ids = np.zeros((len(batch_rows), length), np.int32)
    for row, which in enumerate(batch_rows):
        ids[row, :len(PROMPT_IDS[which])] = PROMPT_IDS[which]
    images = rng.uniform(-1, 1, (len(batch_rows), IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    return {"images": images, "token_ids": ids, "padding_mask": ids != 0}


def raw_image(seed: int, height: int = 37, width: int = 53) -> np.ndarray:
    """A uint8 RGB image of an odd size (the converter crops and resizes it)."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3)).astype(np.uint8)


def write_png(path: Path, pixels: np.ndarray, filters=(0,), color_type: int | None = None, bit_depth: int = 8,
              palette: np.ndarray | None = None) -> Path:
    """A test PNG encoder (the decoder's oracle): rows filtered with ``filters`` in turn, one IDAT chunk.

    Filtering follows the PNG specification directly: each filtered byte is the raw byte minus the filter's
    prediction from a (left, bpp bytes back), b (above) and c (upper left), modulo 256.
    """
    height, width = pixels.shape[:2]
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    if color_type is None:
        color_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    data = pixels.astype(">u2" if bit_depth == 16 else np.uint8).tobytes()
    row_bytes = width * channels * bit_depth // 8
    bpp = max(1, channels * bit_depth // 8)
    rows = [list(data[y * row_bytes:(y + 1) * row_bytes]) for y in range(height)]
    out = bytearray()
    for y, row in enumerate(rows):
        kind = filters[y % len(filters)]
        above = rows[y - 1] if y else [0] * row_bytes
        out.append(kind)
        for i, raw in enumerate(row):
            a = row[i - bpp] if i >= bpp else 0
            b = above[i]
            c = above[i - bpp] if i >= bpp else 0
            out.append((raw - _prediction(kind, a, b, c)) % 256)

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    body = chunk(b"IHDR", header)
    if palette is not None:
        body += chunk(b"PLTE", palette.astype(np.uint8).tobytes())
    body += chunk(b"IDAT", zlib.compress(bytes(out))) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


def _prediction(kind: int, a: int, b: int, c: int) -> int:
    if kind == 0:
        return 0
    if kind == 1:
        return a
    if kind == 2:
        return b
    if kind == 3:
        return (a + b) // 2
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else (b if pb <= pc else c)


# ---- keras-hub runs -------------------------------------------------------------------------------------------
@dataclass
class KerasCase:
    """A keras-hub PaliGemmaCausalLM saved as a full preset, and what keras-hub generated with it."""

    name: str
    preset: Path
    inputs: dict[str, np.ndarray]  # the batched, ragged array inputs (model-space images)
    results: dict[str, object] = field(default_factory=dict)


def recording_greedy_sampler():
    """keras-hub's GreedySampler that also hands each step's logits to Python (``jax.debug.callback``).

    Nothing else changes: keras' compiled generate_step, while loop, call_with_cache and argmax run as usual.
    """
    import jax
    import keras_hub

    class RecordingGreedySampler(keras_hub.samplers.GreedySampler):
        def __init__(self):
            super().__init__()
            self.logits = []

        def compute_probabilities(self, logits):
            jax.debug.callback(self._record, logits, ordered=True)
            return super().compute_probabilities(logits)

        def _record(self, logits):
            self.logits.append(np.asarray(logits, dtype=np.float32))

    return RecordingGreedySampler()


def compiled_call(model, inputs) -> np.ndarray:
    """``model(inputs)`` through ``jax.jit`` of keras' ``stateless_call`` with the model's current variables."""
    import jax

    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    call = jax.jit(lambda t, n, x: model.stateless_call(t, n, x)[0])
    return np.asarray(call(trainable, non_trainable, inputs))


@contextmanager
def numpy_random_initializers():
    """Draw keras' random initial weights with NumPy while building a model.

    On the JAX backend every distinct weight shape otherwise compiles its own XLA program (about 0.7 s each, 15 s
    per tiny model). The initial values do not matter here: ``perturb_weights`` overwrites every weight.
    """
    import jax.numpy as jnp
    from keras.src.backend.jax import random as jax_random

    rng = np.random.default_rng(0)
    fakes = {
        "uniform": lambda shape, minval=0.0, maxval=1.0, dtype=None, seed=None:
            jnp.asarray(rng.uniform(minval, maxval, shape), dtype=dtype or "float32"),
        "normal": lambda shape, mean=0.0, stddev=1.0, dtype=None, seed=None:
            jnp.asarray(rng.normal(mean, stddev, shape), dtype=dtype or "float32"),
        "truncated_normal": lambda shape, mean=0.0, stddev=1.0, dtype=None, seed=None:
            jnp.asarray(np.clip(rng.normal(0, 1, shape), -2, 2) * stddev + mean, dtype=dtype or "float32"),
    }
    originals = {name: getattr(jax_random, name) for name in fakes}
    try:
        for name, fake in fakes.items():
            setattr(jax_random, name, fake)
        yield
    finally:
        for name, original in originals.items():
            setattr(jax_random, name, original)


def build_keras_case(name: str, directory: Path, vocabulary: Path, seed: int) -> KerasCase:
    """Build, perturb and save a keras-hub PaliGemmaCausalLM (with tokenizer and converter); run its generate.

    Each distinct input shape or stop list compiles keras' generate once (about 2 s), so the runs are chosen to
    cover: batched ragged prompts with per-step logits (both cases), stop tokens (pg2), one row of the batch
    (pg1), and unbatched string prompts through the preprocessor (both cases; pg1 also with strip_prompt).
    """
    import keras_hub

    from tools import keras_oracle

    with numpy_random_initializers():
        backbone = keras_oracle.construct_backbone(CONFIGS[name])
    keras_oracle.perturb_weights(backbone, seed)
    tokenizer = keras_hub.models.PaliGemmaTokenizer(proto=vocabulary.read_bytes())
    converter = keras_hub.layers.PaliGemmaImageConverter(image_size=(IMAGE_SIZE, IMAGE_SIZE), scale=1 / 127.5,
                                                          offset=-1.0)
    preprocessor = keras_hub.models.PaliGemmaCausalLMPreprocessor(tokenizer=tokenizer, image_converter=converter,
                                                                  sequence_length=SEQUENCE_LENGTH)
    lm = keras_hub.models.PaliGemmaCausalLM(backbone=backbone, preprocessor=preprocessor)
    lm.save_to_preset(str(directory))
    case = KerasCase(name, directory, prompt_batch(seed))
    results = case.results

    lm.preprocessor = None  # array in, array out
    # Scoring: keras' functional forward, with response tokens after each prompt (compiled: eager ops on the jax
    # backend compile one by one, which takes longer).
    scoring = dict(case.inputs, padding_mask=np.ones_like(case.inputs["padding_mask"]),
                   response_mask=~case.inputs["padding_mask"])
    results["score_inputs"] = scoring
    results["score_logits"] = compiled_call(lm, scoring)
    recorder = recording_greedy_sampler()
    lm.compile(sampler=recorder)
    out = lm.generate(dict(case.inputs), stop_token_ids=None)
    results["ids"] = np.asarray(out["token_ids"])
    results["padding_mask"] = np.asarray(out["padding_mask"])
    results["step_logits"] = np.stack(recorder.logits)
    lm.compile(sampler="greedy")
    if name == "pg2":
        # A stop id keras itself produced first in row 0, so generation stops early in some rows.
        results["stop_ids"] = [int(results["ids"][0, len(PROMPT_IDS[0])])]
        out = lm.generate(dict(case.inputs), stop_token_ids=results["stop_ids"])
        results["ids_stop"] = np.asarray(out["token_ids"])
        results["padding_mask_stop"] = np.asarray(out["padding_mask"])
    if name == "pg1":
        single = {k: v[1:2] for k, v in case.inputs.items()}
        results["ids_single"] = np.asarray(lm.generate(single, stop_token_ids=None)["token_ids"])

    lm.preprocessor = preprocessor
    x = {"images": raw_image(seed), "prompts": "caption en\n"}
    results["text_inputs"] = x
    results["text"] = lm.generate(dict(x))
    if name == "pg1":
        results["text_stripped"] = lm.generate(dict(x), strip_prompt=True, max_length=9)
    return case
