"""Make keras-hub write real PaliGemma presets and record its own outputs: the project's ground truth.

keras-hub's ``PaliGemmaBackbone`` is the authority (``/work/shared/docs/oracles.md``). This tool builds a tiny backbone
with keras-hub, perturbs every weight (a fresh keras model has RMSNorm scale 0, LayerNorm gamma 1 / beta 0 and zero
biases, which hide ``(1 + scale)`` and bias mistakes), saves it with keras' own writers in one of four file variants,
checks that keras reloads it to bit-identical outputs, and records the named taps of ``refimpl/taps.py`` by calling
keras' own layers eagerly, in the order the backbone calls them.

    python -m tools.keras_oracle --list-cases
    python -m tools.keras_oracle --case pg1_basic --out /tmp/oracle_cases/pg1_basic
    python -m tools.keras_oracle --config '{"vocabulary_size": 97, ...}' --variant plain --dtype float32 \\
        --seed 0 --inputs prefix_padded --batch 2 --text-len 7 --out DIR

A case directory holds the preset files, ``inputs.npz``, ``keras_taps.npz`` and ``keras_provenance.json``.
``keras_generate`` runs keras-hub's greedy ``PaliGemmaCausalLM.generate`` on a backbone and records each step's logits.
Non-goals: writing into ``golden/`` (the caller chooses where cases go), real-size models.

keras and keras-hub are imported only inside functions (``import_keras``), after setting ``KERAS_BACKEND=jax``
unless the caller chose a backend, so importing this module never needs them.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import platform
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from refimpl import taps as tap_names
from refimpl.config import ConfigError, PaliGemmaConfig
from refimpl.dtypes import round_to_bfloat16

VARIANTS = ("plain", "sharded", "bf16", "legacy_h5")
INPUT_KINDS = ("prefix_padded", "all_response", "empty_prompt", "bidirectional")
DTYPES = ("float32", "bfloat16", "mixed_bfloat16")

# Gemma / PaliGemma special ids (spec section 8.1): <pad>=0, <eos>=1, <bos>=2; ordinary pieces start at 3.
PAD_ID, BOS_ID, FIRST_ORDINARY_ID = 0, 2, 3

MAX_CASE_BYTES = 1_000_000  # a case directory must stay well under 1 MB (they may be committed)
MIN_SHARDS = 3  # the "sharded" variant must exercise several shard files, not just one
CHAIN_RTOL = 1e-5  # chained layer calls vs one backbone call: max |diff| <= CHAIN_RTOL * max |output|

# ---- perturbation --------------------------------------------------------------------------------------------
# Chosen so activations stay O(1) through the depth, with nothing saturated and nothing negligible:
# - kernels N(0, 1/fan_in) keep unit-variance inputs at unit variance, so attention logits are O(1) (softmax not
#   one-hot) and GELU sees O(1) arguments;
# - norm multipliers (1 + scale, gamma) stay in about [0.5, 1.5];
# - token embeddings N(0, 1/D): after the sqrt(D) scaling text tokens are N(0, 1) like the image tokens, so
#   neither dominates the residual stream, and LM logits are O(1), where a final soft-cap of a few units bends
#   them without flattening them (N(0, 1) embeddings gave logits of +-50 that a cap of 3 saturates);
# - position embeddings N(0, 0.5^2), the size of the patch-embedding term for images in [-1, 1].
NORM_STD = 0.2  # RMSNorm scale = 0 + N(0, 0.2^2) (multiplier 1 + scale); LayerNorm gamma = 1 + N(0, 0.2^2)
SHIFT_STD = 0.1  # LayerNorm beta and every bias: N(0, 0.1^2)
POSITION_EMBEDDING_STD = 0.5
PERTURBATION_RULES = (
    "variables visited in keras' backbone.weights order, one numpy Generator(seed) drawing standard normals in "
    f"float64, cast to float32, then variable.assign: RMSNorm scale N(0, {NORM_STD}^2); LayerNorm gamma "
    f"1 + N(0, {NORM_STD}^2); LayerNorm beta and biases N(0, {SHIFT_STD}^2); token embeddings (V, D) N(0, 1/D); "
    f"ViT position embeddings N(0, {POSITION_EMBEDDING_STD}^2); kernels N(0, 1/fan_in) with fan_in = D for the "
    "(heads, D, H) q/k/v einsum kernels and the product of all but the last axis otherwise (conv HWIO, dense "
    "(in, out), attention output (N, H, D)). bf16 variables round the float32 draws to nearest even on assign."
)
_EINSUM_QKV_KERNELS = ("attention/query/kernel", "attention/key/kernel", "attention/value/kernel")


def keras_hub_available() -> bool:
    """True if keras-hub can be imported (checked without importing it)."""
    return importlib.util.find_spec("keras_hub") is not None


def import_keras():
    """Import and return ``(keras, keras_hub)``, choosing the jax backend unless KERAS_BACKEND is already set."""
    os.environ.setdefault("KERAS_BACKEND", "jax")
    try:
        import keras
        import keras_hub
    except ImportError as error:
        raise ImportError(f"tools.keras_oracle needs keras and keras-hub (pip install keras-hub): {error}") from error
    return keras, keras_hub


# ---- building and perturbing ---------------------------------------------------------------------------------
def validate_config(config: Mapping[str, Any]) -> PaliGemmaConfig:
    """Check a keras ``PaliGemmaBackbone`` argument dict with refimpl's validator (raises ConfigError)."""
    return PaliGemmaConfig.from_keras_config(config, source="keras_oracle config")


def construct_backbone(config: Mapping[str, Any], *, dtype: str = "float32"):
    """A fresh (keras-initialised) ``PaliGemmaBackbone(**config, dtype=dtype)``; nothing perturbed yet."""
    validate_config(config)
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; expected one of {DTYPES}")
    _, keras_hub = import_keras()
    return keras_hub.models.PaliGemmaBackbone(**dict(config), dtype=dtype)


def variable_specs(backbone) -> list[tuple[str, tuple[int, ...]]]:
    """(path, shape) of every backbone variable in keras' ``backbone.weights`` order."""
    return [(variable.path, tuple(int(n) for n in variable.shape)) for variable in backbone.weights]


def perturbation_rule(path: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(base, std) of the perturbed values of the variable at keras ``path``; see PERTURBATION_RULES."""
    leaf = path.rsplit("/", 1)[-1]
    if leaf == "scale":  # RMSNormalization: y = x_hat * (1 + scale)
        return 0.0, NORM_STD
    if leaf == "gamma":
        return 1.0, NORM_STD
    if leaf in ("beta", "bias"):
        return 0.0, SHIFT_STD
    if path.endswith("position_embedding/embeddings"):
        return 0.0, POSITION_EMBEDDING_STD
    if leaf == "embeddings":  # the token embedding (V, D); scaled by sqrt(D) on lookup
        return 0.0, 1.0 / math.sqrt(shape[-1])
    if leaf == "kernel":
        fan_in = shape[1] if path.endswith(_EINSUM_QKV_KERNELS) else math.prod(shape[:-1])
        return 0.0, 1.0 / math.sqrt(fan_in)
    raise ValueError(f"no perturbation rule for variable {path!r} with shape {shape} "
                     "(expected a leaf named scale, gamma, beta, bias, embeddings or kernel)")


def perturbation_values(specs: list[tuple[str, tuple[int, ...]]], seed: int) -> list[np.ndarray]:
    """The float32 values assigned to each variable: a pure function of (paths and shapes in order, seed)."""
    rng = np.random.default_rng(seed)
    values = []
    for path, shape in specs:
        base, std = perturbation_rule(path, shape)
        values.append((base + std * rng.standard_normal(shape)).astype(np.float32))
    return values


def perturb_weights(backbone, seed: int) -> None:
    """Assign ``perturbation_values`` to every variable, in keras' own order."""
    for variable, value in zip(backbone.weights, perturbation_values(variable_specs(backbone), seed), strict=True):
        variable.assign(value)


def build_backbone(config: Mapping[str, Any], *, dtype: str = "float32", seed: int = 0):
    """Build ``PaliGemmaBackbone(**config, dtype=dtype)`` and perturb every weight deterministically from ``seed``.

    The draws are float32 whatever ``dtype`` is, so a "bfloat16" model holds the same perturbed values rounded
    to bf16 (by ``variable.assign``) and a "mixed_bfloat16" model holds them unchanged.
    """
    backbone = construct_backbone(config, dtype=dtype)
    perturb_weights(backbone, seed)
    return backbone


def variable_values(backbone) -> list[np.ndarray]:
    """Current variable values in ``backbone.weights`` order, widened to float32 (exact for bf16)."""
    keras, _ = import_keras()
    return [_to_float32(keras.ops.convert_to_numpy(variable.value)) for variable in backbone.weights]


def _to_float32(array) -> np.ndarray:
    return np.asarray(array).astype(np.float32)


# ---- saving ------------------------------------------------------------------------------------------------
def variables_nbytes(backbone) -> list[int]:
    """Stored size of each variable in bytes, as keras' sharded writer counts it."""
    return [math.prod(variable.shape) * np.dtype(_numpy_dtype_name(variable.dtype)).itemsize
            for variable in backbone.weights]


def _numpy_dtype_name(keras_dtype: str) -> str:
    return "uint16" if keras_dtype == "bfloat16" else keras_dtype  # same itemsize; numpy has no bfloat16


def shard_size_gb(backbone, *, shards: int = 4) -> float:
    """A ``max_shard_size`` (GB) that makes keras write about ``shards`` shards.

    keras starts a new shard when the next variable would push the current one past the limit, and refuses a
    variable larger than the limit, so the limit is the larger of total/shards and the largest variable (+1 byte
    against float rounding of the GB round trip).
    """
    sizes = variables_nbytes(backbone)
    limit_bytes = max(math.ceil(sum(sizes) / shards), max(sizes)) + 1
    return limit_bytes / 1024 ** 3


def save_variants(backbone, out_dir: str | os.PathLike, variant: str) -> list[str]:
    """Write ``backbone`` into ``out_dir`` with keras-hub's own writers; return the file names written.

    Variants: "plain" (``save_to_preset``: config.json, metadata.json, model.weights.h5), "sharded"
    (``save_to_preset(max_shard_size=tiny)``: model.weights.json plus at least 3 model_0000N.weights.h5),
    "bf16" (``save_to_preset`` of a backbone whose variables are bfloat16) and "legacy_h5" (``backbone.save``
    to the Keras-2 style model.h5, plus the config.json that ``save_to_preset`` writes).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    before = set(os.listdir(out))
    if variant == "plain":
        backbone.save_to_preset(str(out))
    elif variant == "sharded":
        backbone.save_to_preset(str(out), max_shard_size=shard_size_gb(backbone))
    elif variant == "bf16":
        stored = {variable.dtype for variable in backbone.weights}
        if stored != {"bfloat16"}:
            raise ValueError(f"variant 'bf16' needs a backbone built with dtype='bfloat16'; its variables are "
                             f"{sorted(stored)}")
        backbone.save_to_preset(str(out))
    elif variant == "legacy_h5":
        backbone.save(str(out / "model.h5"))
        with tempfile.TemporaryDirectory() as scratch:
            backbone.save_to_preset(scratch)
            shutil.copyfile(Path(scratch) / "config.json", out / "config.json")
    else:
        raise ValueError(f"variant={variant!r} is not known; expected one of {VARIANTS}")
    written = sorted(set(os.listdir(out)) - before)
    _check_variant_files(out, variant, written)
    return written


def _check_variant_files(out: Path, variant: str, written: list[str]) -> None:
    expected = {"plain": {"config.json", "metadata.json", "model.weights.h5"},
                "bf16": {"config.json", "metadata.json", "model.weights.h5"},
                "sharded": {"config.json", "metadata.json", "model.weights.json"},
                "legacy_h5": {"config.json", "model.h5"}}[variant]
    missing = sorted(expected - set(written))
    if missing:
        raise RuntimeError(f"variant {variant!r}: keras did not write {missing} into {out} (wrote {written})")
    if variant == "sharded":
        shards = [name for name in written if name.startswith("model_") and name.endswith(".weights.h5")]
        if len(shards) < MIN_SHARDS or "model.weights.h5" in written:
            raise RuntimeError(f"variant 'sharded': expected at least {MIN_SHARDS} model_0000N.weights.h5 shards "
                               f"and no model.weights.h5 in {out}, found {written}")


# ---- reloading -----------------------------------------------------------------------------------------------
def reload_backbone(out_dir: str | os.PathLike, variant: str, *, dtype: str | None = None):
    """Load what ``save_variants`` wrote, the way a keras user would. Returns (backbone, how, note).

    Presets go through ``PaliGemmaBackbone.from_preset`` (with ``dtype=`` if given). The legacy model.h5 goes
    through ``keras.saving.load_model``; the file names the class "PaliGemmaBackbone" without keras-hub's
    registered prefix, so the class is passed in ``custom_objects``. If that fails too, the note says why and
    the model is rebuilt from config.json and filled by ``load_weights(model.h5)`` (keras' by-layer-order reader).
    """
    keras, keras_hub = import_keras()
    out = Path(out_dir)
    cls = keras_hub.models.PaliGemmaBackbone
    if variant != "legacy_h5":
        kwargs = {} if dtype is None else {"dtype": dtype}
        return cls.from_preset(str(out), **kwargs), f"PaliGemmaBackbone.from_preset({kwargs or ''})", ""
    if dtype is not None:
        raise ValueError("the legacy model.h5 is loaded with the dtype policy stored in it; dtype= is not supported")
    note = ""
    try:
        keras.saving.load_model(str(out / "model.h5"))
    except Exception as error:  # noqa: BLE001 - recorded: keras cannot load it without help
        note = f"plain keras.saving.load_model(model.h5) fails: {type(error).__name__}: {str(error)[:120]}; "
    try:
        loaded = keras.saving.load_model(str(out / "model.h5"), custom_objects={"PaliGemmaBackbone": cls})
        return loaded, "keras.saving.load_model(model.h5, custom_objects={PaliGemmaBackbone})", note
    except Exception as error:  # noqa: BLE001 - recorded, then the weight-only path below
        note += f"with custom_objects it fails too: {type(error).__name__}: {str(error)[:120]}; "
    backbone = keras.saving.deserialize_keras_object(json.loads((out / "config.json").read_text()))
    backbone.load_weights(str(out / "model.h5"))
    return backbone, "deserialize config.json + load_weights(model.h5)", note


def _outputs_compare(backbone, other, inputs) -> tuple[bool, float]:
    expected = _to_float32(backbone(model_inputs(backbone, inputs)))
    found = _to_float32(other(model_inputs(other, inputs)))
    if found.shape != expected.shape:
        return False, math.inf
    return bool(np.array_equal(found, expected)), float(np.max(np.abs(found - expected)))


def verify_reload(out_dir: str | os.PathLike, variant: str, backbone, inputs: Mapping[str, np.ndarray]) -> dict:
    """Reload the saved files and require outputs bit-identical to ``backbone``'s; return a small report.

    ``from_preset`` without ``dtype=`` builds a float32 model even for a bf16 preset (it widens the weights,
    exactly); that is checked and reported, and the bit-identical comparison then reloads with the saved policy.
    """
    reloaded, how, note = reload_backbone(out_dir, variant)
    report = {"default_dtype_policy": reloaded.dtype_policy.name}
    if reloaded.dtype_policy.name != backbone.dtype_policy.name:
        widened_exactly = all(np.array_equal(a, b) for a, b in zip(variable_values(reloaded),
                                                                   variable_values(backbone), strict=True))
        if not widened_exactly:
            raise RuntimeError(f"variant {variant!r}: default reload as {reloaded.dtype_policy.name} changed "
                               "weight values")
        note += (f"default reload builds a {reloaded.dtype_policy.name} model (weights widened exactly); "
                 f"compared after reloading with dtype={backbone.dtype_policy.name!r}; ")
        reloaded, how, _ = reload_backbone(out_dir, variant, dtype=backbone.dtype_policy.name)
    identical, diff = _outputs_compare(backbone, reloaded, inputs)
    report.update({"method": how, "dtype_policy": reloaded.dtype_policy.name, "identical": identical,
                   "max_abs_diff": diff, "note": note.strip()})
    if not identical:
        raise RuntimeError(f"variant {variant!r} in {out_dir}: reloaded model is not bit-identical "
                           f"(max |diff| {diff:.3g}; {report})")
    return report


# ---- inputs --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _RowLayout:
    valid: int  # non-pad tokens, bos included
    prompt: int  # prefix tokens, bos included; the rest of the valid tokens are response


def _row_layouts(kind: str, batch: int, text_len: int) -> list[_RowLayout]:
    """Per-row (valid, prompt) lengths of an input kind; see ``make_inputs``."""
    minimum = {"prefix_padded": 5, "all_response": 2, "empty_prompt": 2, "bidirectional": 1}
    if kind not in minimum:
        raise ValueError(f"input kind {kind!r} is not known; expected one of {INPUT_KINDS}")
    if text_len < minimum[kind]:
        raise ValueError(f"input kind {kind!r} needs text_len >= {minimum[kind]}, found {text_len}")
    rows = []
    for b in range(batch):
        if kind == "prefix_padded":  # row 0 full, later rows 2 shorter each, about a third response
            valid = max(3, text_len - 2 * b)
            rows.append(_RowLayout(valid, valid - max(1, valid // 3)))
        elif kind == "all_response":  # bos then response; row b ends with b pads (at least 1 response token)
            rows.append(_RowLayout(max(2, text_len - b), 1))
        elif kind == "empty_prompt":
            rows.append(_RowLayout(1, 1))
        else:
            rows.append(_RowLayout(text_len, text_len))
    return rows


def _smooth_images(rng: np.random.Generator, batch: int, size: int) -> np.ndarray:  # f32[B, S, S, 3]
    """Bilinear upsampling of a random 5x5 grid in [-1, 1], plus a little noise, clipped to [-1, 1]."""
    knots = 5
    coarse = rng.uniform(-1.0, 1.0, (batch, knots, knots, 3))
    position = np.linspace(0.0, knots - 1.0, size)
    hat = np.maximum(0.0, 1.0 - np.abs(position[:, None] - np.arange(knots)[None, :]))  # [S, knots], rows sum to 1
    image = np.einsum("ik,bklc,jl->bijc", hat, coarse, hat)
    return np.clip(image + 0.05 * rng.standard_normal(image.shape), -1.0, 1.0).astype(np.float32)


def make_inputs(config: Mapping[str, Any], *, batch: int, text_len: int, seed: int, kind: str) -> dict:
    """Deterministic backbone inputs.

    Args:
        config: keras backbone arguments (validated; ``vocabulary_size`` and ``image_size`` are used).
        batch, text_len: B and T.
        seed: numpy Generator seed (a stream separate from the weight perturbation's).
        kind: "prefix_padded" (row 0 full prompt + response; row b is 2b tokens shorter, trailing padding, about
            a third of its tokens response), "all_response" (everything after bos is response; row b has b
            trailing pads), "empty_prompt" (bos only, rest padding, no response), "bidirectional" (no response,
            no padding).

    Returns:
        images f32[B, S, S, 3] in [-1, 1]; token_ids int32[B, T] (bos=2 first, ordinary ids in [3, V), pad id 0);
        padding_mask bool[B, T]; response_mask bool[B, T] (False on padding).
    """
    checked = validate_config(config)
    vocabulary_size, image_size = checked.vocabulary_size, checked.image_size
    if batch < 1:
        raise ValueError(f"batch must be >= 1, found {batch}")
    if vocabulary_size <= FIRST_ORDINARY_ID:
        raise ValueError(f"vocabulary_size must be > {FIRST_ORDINARY_ID} to hold ordinary ids, found "
                         f"{vocabulary_size}")
    rng = np.random.default_rng([seed, 0x1A9])  # salted: not the stream that perturbs the weights
    images = _smooth_images(rng, batch, image_size)
    token_ids = np.full((batch, text_len), PAD_ID, np.int32)
    padding_mask = np.zeros((batch, text_len), bool)
    response_mask = np.zeros((batch, text_len), bool)
    for b, row in enumerate(_row_layouts(kind, batch, text_len)):
        token_ids[b, 0] = BOS_ID
        token_ids[b, 1:row.valid] = rng.integers(FIRST_ORDINARY_ID, vocabulary_size, row.valid - 1)
        padding_mask[b, :row.valid] = True
        response_mask[b, row.prompt:row.valid] = True
    return {"images": images, "token_ids": token_ids, "padding_mask": padding_mask, "response_mask": response_mask}


def model_inputs(backbone, inputs: Mapping[str, np.ndarray]) -> dict:
    """Convert numpy inputs to tensors of the backbone's ``keras.Input`` dtypes, as a functional call does."""
    keras, _ = import_keras()
    _check_inputs(backbone, inputs)
    return {name: keras.ops.convert_to_tensor(inputs[name], dtype=spec.dtype)
            for name, spec in backbone.input.items()}


def _check_inputs(backbone, inputs: Mapping[str, np.ndarray]) -> None:
    missing = [name for name in ("images", "token_ids", "padding_mask", "response_mask") if name not in inputs]
    if missing:
        raise ValueError(f"inputs: missing {missing}; found keys {sorted(inputs)}")
    size = backbone.image_size
    if np.ndim(inputs["token_ids"]) != 2:
        raise ValueError("inputs['token_ids']: expected shape (batch, text_len), found "
                         f"{np.shape(inputs['token_ids'])}")
    batch, text_len = np.shape(inputs["token_ids"])
    expected = {"images": (batch, size, size, 3), "token_ids": (batch, text_len),
                "padding_mask": (batch, text_len), "response_mask": (batch, text_len)}
    for name, shape in expected.items():
        if tuple(np.shape(inputs[name])) != shape:
            raise ValueError(f"inputs[{name!r}]: expected shape {shape}, found {tuple(np.shape(inputs[name]))}")


# ---- taps ----------------------------------------------------------------------------------------------------
class _Taps:
    """Ordered tap store; checks every name against refimpl/taps.py and widens values to float32 numpy."""

    def __init__(self, keras):
        self.keras = keras
        self.arrays: dict[str, np.ndarray] = {}

    def __call__(self, name: str, value) -> None:
        tap_names.definition(name)  # raises KeyError for a name taps.py does not define
        array = np.asarray(self.keras.ops.convert_to_numpy(value))
        self.arrays[name] = array if array.dtype == bool else array.astype(np.float32)


def _check_same(keras, checks: dict, name: str, chained, called) -> None:
    """Record max |chained - called| under ``name``; raise if over CHAIN_RTOL * max |called| (oracles.md: 0)."""
    chained, called = (np.asarray(keras.ops.convert_to_numpy(x)).astype(np.float64) for x in (chained, called))
    diff, scale = float(np.max(np.abs(chained - called))), float(np.max(np.abs(called)))
    checks[name] = diff
    if not diff <= CHAIN_RTOL * scale:
        raise AssertionError(f"{name}: chained keras sublayer calls differ from the direct call by {diff:.3g} "
                             f"(> {CHAIN_RTOL} * max |output| = {CHAIN_RTOL * scale:.3g})")


def _record_vit_block(keras, block, x, record, checks: dict, j: int):
    """Sub-steps of one ViT encoder block from its own sublayers, then the block call; returns block(x)."""
    prefix = f"img/block{j:02d}"
    ln1 = block.layer_norm_1(x)
    attn = block.compute_attention(ln1)  # what block.call uses: attn(ln1, attention_mask=None)[0]
    attn_residual = attn + x  # keras: x = x + residual
    ln2 = block.layer_norm_2(attn_residual)
    mlp = block.mlp_dense_2(keras.activations.gelu(block.mlp_dense_1(ln2), approximate=True))
    out = block(x)
    for name, value in (("ln1", ln1), ("attn_out", attn), ("attn_residual", attn_residual), ("ln2", ln2),
                        ("mlp_out", mlp), ("out", out)):
        record(f"{prefix}/{name}", value)
    _check_same(keras, checks, f"{prefix}/substeps_vs_call", attn_residual + mlp, out)
    return out


def _record_vit(keras, vit, images, record, checks: dict):
    """ViT taps from img/embed to img/proj; returns img/proj (the vit_encoder output)."""
    encoder, classifier = vit.get_layer("image_encoder"), vit.get_layer("image_classifier")
    x = encoder.vision_embeddings(images)
    record("img/embed", x)
    for j, block in enumerate(encoder.resblocks):
        x = _record_vit_block(keras, block, x, record, checks, j)
    encoded = encoder.encoder_layer_norm(x)
    record("img/encoded", encoded)
    projected = classifier(encoded)
    direct = vit(images)
    _check_same(keras, checks, "img/proj/chain_vs_vit_call", projected, direct)
    record("img/proj", direct)
    return direct


def _record_decoder_block(keras, layer, i: int, x, padding_mask, response_mask, record, checks: dict):
    """Sub-steps of decoder block i from its own sublayers, then the block call; returns the block output."""
    prefix = f"llm/layer{i:02d}"
    normed = layer.pre_attention_norm(x)
    record(f"{prefix}/pre_attn_norm", normed)
    mask = layer._compute_attention_mask(normed, padding_mask, None, 0, response_mask)
    if i == 0:
        record("llm/mask", mask)
    attention = layer.attention(normed, attention_mask=mask)
    record(f"{prefix}/attn_out", attention)
    if layer.use_post_attention_norm:
        attention = layer.post_attention_norm(attention)
        record(f"{prefix}/post_attn_norm", attention)
    if layer.dropout:
        attention = layer.attention_dropout(attention)  # identity at inference
    attn_residual = x + attention
    record(f"{prefix}/attn_residual", attn_residual)
    normed = layer.pre_ffw_norm(attn_residual)
    record(f"{prefix}/pre_ffw_norm", normed)
    gated = keras.activations.gelu(layer.gating_ffw(normed), approximate=True) * layer.gating_ffw_2(normed)
    ffw = layer.ffw_linear(gated)
    record(f"{prefix}/ffw_out", ffw)
    if layer.use_post_ffw_norm:
        ffw = layer.post_ffw_norm(ffw)
        record(f"{prefix}/post_ffw_norm", ffw)
    out = layer(x, padding_mask=padding_mask, response_mask=response_mask)
    record(f"{prefix}/out", out)
    _check_same(keras, checks, f"{prefix}/substeps_vs_call", ffw + attn_residual, out)
    return out


def record_keras_taps(backbone, inputs: Mapping[str, np.ndarray], *, checks: dict | None = None) -> dict:
    """Every tap of refimpl/taps.py, computed by keras-hub eagerly, in forward order.

    Layer outputs come from calling ``backbone.vit_encoder``, ``token_embedding`` (times cast sqrt(D)), each
    ``transformer_layers[i]`` with padding_mask and response_mask, and ``layer_norm``, exactly as the backbone
    does; sub-step taps come from calling each block's own sublayers in order. The chain is checked against one
    ``backbone(inputs)`` call, each block's sub-step chain against the block call and the ViT chain against
    ``vit_encoder(images)``: max |diff| <= CHAIN_RTOL * max |output|, else AssertionError.

    Args:
        backbone: a keras-hub PaliGemmaBackbone (any dtype policy).
        inputs: the dict of ``make_inputs``; converted to the backbone's Input dtypes first.
        checks: if given, filled with the measured max |diff| of every chain check (name -> float).

    Returns:
        tap name -> numpy array: float32 (bf16 values widened exactly), except ``llm/mask`` bool[B, L, L].
    """
    keras, _ = import_keras()
    ops = keras.ops
    checks = {} if checks is None else checks
    tensors = model_inputs(backbone, inputs)
    record = _Taps(keras)
    image_tokens = _record_vit(keras, backbone.vit_encoder, tensors["images"], record, checks)
    text = backbone.token_embedding(tensors["token_ids"])
    text = text * ops.cast(ops.sqrt(backbone.hidden_dim), text.dtype)  # as PaliGemmaBackbone.__init__ does
    record("llm/embed_text", text)
    x = ops.concatenate((image_tokens, text), axis=1)
    record("llm/input", x)
    for i, layer in enumerate(backbone.transformer_layers):
        x = _record_decoder_block(keras, layer, i, x, tensors["padding_mask"], tensors["response_mask"], record,
                                  checks)
    final = backbone.layer_norm(x)
    record("llm/final_norm", final)
    logits = backbone.token_embedding(final, reverse=True)  # applies final_logit_soft_cap
    record("llm/logits", logits[:, backbone.image_sequence_length:])
    called = backbone(tensors)
    _check_same(keras, checks, "llm/final_norm/chain_vs_backbone_call", final, called)
    checks["backbone_output_max_abs"] = float(np.max(np.abs(record.arrays["llm/final_norm"])))
    return record.arrays


# ---- cases ---------------------------------------------------------------------------------------------------
def check_bf16_rounding(backbone, seed: int) -> float:
    """Max |stored - round_to_bfloat16(float32 draw)| over all variables of a bf16 backbone (0 when exact)."""
    draws = perturbation_values(variable_specs(backbone), seed)
    return max(float(np.max(np.abs(stored - round_to_bfloat16(draw))))
               for stored, draw in zip(variable_values(backbone), draws, strict=True))


def _file_record(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def _versions() -> dict:
    keras, keras_hub = import_keras()
    import jax
    return {"keras": keras.__version__, "keras_hub": keras_hub.__version__, "jax": jax.__version__,
            "numpy": np.__version__, "python": platform.python_version(), "backend": keras.backend.backend(),
            "machine": platform.machine(), "platform": platform.platform()}


def write_case(out_dir: str | os.PathLike, config: Mapping[str, Any], *, variant: str, dtype: str, seed: int,
               input_kind: str, batch: int, text_len: int, max_case_bytes: int | None = MAX_CASE_BYTES) -> dict:
    """Build, perturb, save (one variant), verify the reload, record taps; write a case directory.

    ``out_dir`` must be empty or absent (stale preset files would be picked up by keras' loader). Writes the
    preset files, inputs.npz, keras_taps.npz (np.savez_compressed) and keras_provenance.json; returns the
    provenance dict. Raises if the directory ends up larger than ``max_case_bytes`` (None: no limit).
    """
    validate_config(config)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"out_dir {out} is not empty; remove it or choose another directory")
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} is not known; expected one of {VARIANTS}")
    if variant == "bf16" and dtype != "bfloat16":
        raise ValueError(f"variant 'bf16' stores bfloat16 variables and is recorded under dtype 'bfloat16'; "
                         f"found dtype={dtype!r}")
    inputs = make_inputs(config, batch=batch, text_len=text_len, seed=seed, kind=input_kind)
    backbone = build_backbone(config, dtype=dtype, seed=seed)
    preset_files = save_variants(backbone, out, variant)
    reload = verify_reload(out, variant, backbone, inputs)
    checks: dict[str, float] = {}
    taps = record_keras_taps(backbone, inputs, checks=checks)
    np.savez_compressed(out / "inputs.npz", **inputs)
    np.savez_compressed(out / "keras_taps.npz", **taps)
    provenance = {
        "producer": "keras-hub PaliGemmaBackbone, run eagerly by tools.keras_oracle",
        "versions": _versions(),
        "config": dict(config), "dtype": dtype, "seed": seed, "variant": variant, "input_kind": input_kind,
        "batch": batch, "text_len": text_len, "image_tokens": int(backbone.image_sequence_length),
        "perturbation": PERTURBATION_RULES,
        "input_seed": f"numpy default_rng([{seed}, 0x1A9])",
        "chain_vs_call_max_abs_diff": checks["llm/final_norm/chain_vs_backbone_call"],
        "backbone_output_max_abs": checks["backbone_output_max_abs"],
        "chain_checks": checks,
        "bf16_rounding_max_abs_diff": check_bf16_rounding(backbone, seed) if dtype == "bfloat16" else None,
        "reload": reload,
        "taps": list(taps),
        "files": {name: _file_record(out / name) for name in preset_files + ["inputs.npz", "keras_taps.npz"]},
    }
    (out / "keras_provenance.json").write_text(json.dumps(provenance, indent=1) + "\n")
    _check_case_size(out, max_case_bytes)
    return provenance


def case_size_bytes(out_dir: str | os.PathLike) -> int:
    return sum(path.stat().st_size for path in Path(out_dir).rglob("*") if path.is_file())


def _check_case_size(out: Path, max_case_bytes: int | None) -> None:
    size = case_size_bytes(out)
    if max_case_bytes is not None and size > max_case_bytes:
        raise RuntimeError(f"case directory {out} holds {size} bytes, over the limit of {max_case_bytes}; "
                           "use a smaller config")


@dataclass(frozen=True)
class Case:
    """A named oracle case: keras backbone arguments plus how to save and drive them."""

    description: str
    config: dict = field(hash=False)
    variant: str = "plain"
    dtype: str = "float32"
    seed: int = 0
    input_kind: str = "prefix_padded"
    batch: int = 2
    text_len: int = 9


# PaliGemma-1 shape: no post-norms, no caps, no window. Small, mutually distinct sizes (16 image tokens).
# Note N*H = 4*10 = hidden_dim 40, as in the real PaliGemma 1 (8*256 = 2048); pg2_window has N*H = 48 != 36.
PG1_CONFIG = {
    "vocabulary_size": 97, "image_size": 28, "num_layers": 3, "num_query_heads": 4, "num_key_value_heads": 1,
    "hidden_dim": 40, "intermediate_dim": 2 * 29, "head_dim": 10, "vit_patch_size": 7, "vit_num_heads": 3,
    "vit_hidden_dim": 24, "vit_num_layers": 2, "vit_intermediate_dim": 37,
}
# PaliGemma-2 shape: post-norms, both soft-caps, a sliding window of 5 on even layers (9 image + 8 text tokens,
# so the band is active). The attention cap is 5.0, not PaliGemma 2's 50.0: with these O(1) weights attention
# logits reach only a few units, where a cap of 50 changes them by ~1e-3 relative; 5.0 bends them visibly.
PG2_WINDOW_CONFIG = {
    "vocabulary_size": 83, "image_size": 18, "num_layers": 4, "num_query_heads": 6, "num_key_value_heads": 2,
    "hidden_dim": 36, "intermediate_dim": 2 * 23, "head_dim": 8, "vit_patch_size": 6, "vit_num_heads": 4,
    "vit_hidden_dim": 20, "vit_num_layers": 3, "vit_intermediate_dim": 31,
    "use_post_attention_norm": True, "use_post_ffw_norm": True, "attention_logit_soft_cap": 5.0,
    "final_logit_soft_cap": 3.0, "use_sliding_window_attention": True, "sliding_window_size": 5,
}
# PaliGemma-2 shape with plain multi-head attention (N = K = 3), caps on, window off, 16 image tokens of 5 px.
PG2_MHA_CAPS_CONFIG = {
    "vocabulary_size": 71, "image_size": 20, "num_layers": 2, "num_query_heads": 3, "num_key_value_heads": 3,
    "hidden_dim": 22, "intermediate_dim": 2 * 13, "head_dim": 6, "vit_patch_size": 5, "vit_num_heads": 3,
    "vit_hidden_dim": 18, "vit_num_layers": 2, "vit_intermediate_dim": 27,
    "use_post_attention_norm": True, "use_post_ffw_norm": True, "attention_logit_soft_cap": 4.0,
    "final_logit_soft_cap": 5.0, "use_sliding_window_attention": False,
}

CASES: dict[str, Case] = {
    "pg1_basic": Case("PaliGemma-1 shape, float32, prefix-LM batch with padding", PG1_CONFIG),
    "pg2_window": Case("PaliGemma-2 shape: post-norms, soft-caps 5/3, sliding window 5", PG2_WINDOW_CONFIG,
                       text_len=8),
    "pg1_bf16": Case("pg1_basic weights rounded to bf16, stored bf16, run under dtype bfloat16", PG1_CONFIG,
                     variant="bf16", dtype="bfloat16"),
    "pg1_sharded": Case("pg1_basic config, seed 1, saved as >= 3 weight shards", PG1_CONFIG, variant="sharded",
                        seed=1),
    "pg1_legacy_h5": Case("pg1_basic config, seed 2, Keras-2 style model.h5 plus config.json", PG1_CONFIG,
                          variant="legacy_h5", seed=2),
    "pg1_empty_prompt": Case("pg1_basic, bos only then padding, no response", PG1_CONFIG,
                             input_kind="empty_prompt"),
    "pg1_all_response": Case("pg1_basic, everything after bos is response (causal), batch 3", PG1_CONFIG,
                             input_kind="all_response", batch=3),
    "pg2_mha_caps": Case("PaliGemma-2 shape, N = K = 3, soft-caps 4/5, no window, batch 1 bidirectional",
                         PG2_MHA_CAPS_CONFIG, input_kind="bidirectional", batch=1, text_len=6),
}


def write_named_case(name: str, out_dir: str | os.PathLike) -> dict:
    if name not in CASES:
        raise KeyError(f"unknown case {name!r}; known cases: {', '.join(CASES)}")
    case = CASES[name]
    return write_case(out_dir, case.config, variant=case.variant, dtype=case.dtype, seed=case.seed,
                      input_kind=case.input_kind, batch=case.batch, text_len=case.text_len)


# ---- generation ----------------------------------------------------------------------------------------------
def recording_greedy_sampler():
    """keras-hub's ``GreedySampler`` that also hands every step's logits to Python (``jax.debug.callback``).

    Nothing else changes: keras' compiled ``generate_step``, its while loop, ``call_with_cache`` and the argmax run
    as usual. The logits arrive in the compute dtype and are kept as float32 (bf16 widens exactly). JAX backend only.
    """
    import jax
    _, keras_hub = import_keras()

    class RecordingGreedySampler(keras_hub.samplers.GreedySampler):
        def __init__(self):
            super().__init__()
            self.logits: list[np.ndarray] = []

        def compute_probabilities(self, logits):
            jax.debug.callback(self._record, logits, ordered=True)
            return super().compute_probabilities(logits)

        def _record(self, logits) -> None:
            self.logits.append(np.asarray(logits).astype(np.float32))

    return RecordingGreedySampler()


def keras_generate(backbone, inputs: Mapping[str, np.ndarray], stop_token_ids=None) -> dict[str, np.ndarray]:
    """Greedy ``PaliGemmaCausalLM(backbone, preprocessor=None).generate(inputs, stop_token_ids=...)`` of keras-hub.

    Args:
        backbone: a keras-hub PaliGemmaBackbone.
        inputs: images f32[B, S, S, 3], token_ids int32[B, M] (prompts right-padded to the generation length M),
            padding_mask bool[B, M] (True on the prompt, bos included).
        stop_token_ids: None (generate to M) or a list of ids.

    Returns:
        token_ids int32[B, M] and padding_mask bool[B, M] as keras returns them, and (JAX backend only)
        step_logits f32[steps, B, V]: the logits the sampler saw at each step, recorded inside keras' compiled loop.
    """
    keras, keras_hub = import_keras()
    lm = keras_hub.models.PaliGemmaCausalLM(backbone=backbone, preprocessor=None)
    recorder = recording_greedy_sampler() if keras.backend.backend() == "jax" else None
    lm.compile(sampler=recorder or "greedy")
    x = {"images": np.asarray(inputs["images"], np.float32), "token_ids": np.asarray(inputs["token_ids"], np.int32),
         "padding_mask": np.asarray(inputs["padding_mask"], bool)}
    out = lm.generate(x, stop_token_ids=None if stop_token_ids is None else tuple(int(i) for i in stop_token_ids))
    result = {"token_ids": np.asarray(out["token_ids"]).astype(np.int32),
              "padding_mask": np.asarray(out["padding_mask"]).astype(bool)}
    if recorder is not None:
        vocabulary = int(backbone.vocabulary_size)
        result["step_logits"] = (np.stack(recorder.logits) if recorder.logits
                                 else np.zeros((0, len(result["token_ids"]), vocabulary), np.float32))
    return result


# ---- CLI -----------------------------------------------------------------------------------------------------
def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.keras_oracle", description=__doc__.split("\n")[0])
    parser.add_argument("--list-cases", action="store_true", help="print the built-in case names and exit")
    parser.add_argument("--case", choices=sorted(CASES), help="write a built-in case")
    parser.add_argument("--config", help="JSON object of PaliGemmaBackbone arguments")
    parser.add_argument("--variant", choices=VARIANTS, default="plain")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--inputs", choices=INPUT_KINDS, default="prefix_padded")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--text-len", type=int, default=9)
    parser.add_argument("--max-bytes", type=int, default=MAX_CASE_BYTES, help="case size limit (0: none)")
    parser.add_argument("--out", help="case directory to create (must be empty or absent)")
    return parser.parse_args(argv)


def _config_from_json(text: str) -> dict:
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise SystemExit(f"--config: not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise SystemExit(f"--config: expected a JSON object of backbone arguments, found {type(config).__name__}")
    return config


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.list_cases:
        for name, case in CASES.items():
            print(f"{name:18s} {case.variant:9s} {case.dtype:8s} {case.input_kind:13s} {case.description}")
        return 0
    if not args.out or bool(args.case) == bool(args.config):
        raise SystemExit("give --out DIR and exactly one of --case NAME or --config JSON (or use --list-cases)")
    try:
        if args.case:
            provenance = write_named_case(args.case, args.out)
        else:
            provenance = write_case(args.out, _config_from_json(args.config), variant=args.variant,
                                    dtype=args.dtype, seed=args.seed, input_kind=args.inputs, batch=args.batch,
                                    text_len=args.text_len, max_case_bytes=args.max_bytes or None)
    except (ConfigError, ValueError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {case_size_bytes(args.out)} bytes, chain vs call max |diff| "
          f"{provenance['chain_vs_call_max_abs_diff']:.3g}, reload {provenance['reload']['method']} identical")
    return 0


if __name__ == "__main__":
    sys.exit(main())
