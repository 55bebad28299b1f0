"""Hugging Face transformers' ``PaliGemmaForConditionalGeneration`` as a conformance backend (torch, CPU, eager).

    python -m conformance check --backend transformers            # alias: hf
    python -m conformance check --backend conformance.hf_backend:transformers_float64

The case's Keras preset is read with ``refimpl.weights.load_params`` (the one reader of Keras layouts), its params
are renamed and re-laid out to HF's state dict (``hf_state_dict``), the HF config is derived from the Keras config
(``hf_config_dict``) and the inputs are translated to HF's (``hf_inputs``). Taps are read with forward hooks on HF's
own modules, so every tap is a tensor HF computed, not a recomputation.

The module imports torch and transformers only inside ``TransformersBackend``; the conversions are NumPy-only and
are shared with ``tools/export_case.py``.

Facts this relies on (transformers 5.25, checked by tests/conformance/test_hf_backend.py and oracles.md):
- Text tower: Gemma for PaliGemma 1 configs, Gemma 2 (post-norms, soft-caps, window) for PaliGemma 2 configs.
  HF's vocabulary has one more row than keras' (``<image>`` = vocabulary_size); its embedding row is zero and its
  logit column is dropped. ``intermediate_size`` is keras' ``intermediate_dim // 2``.
- ``query_pre_attn_scalar = head_dim``: keras always scales q by 1/sqrt(head_dim) (spec 4.4 quirk Q1).
- ``token_type_ids`` (0 = prefix, 1 = response) make HF's mask keras' prefix-LM mask; without them HF is causal.
- Image features are not rescaled by 1/sqrt(D) in transformers 5 (4.x divided them, then multiplied back); the
  ``img/proj`` tap is the projector module's output, which is unscaled in every version.
- ``output_hidden_states`` returns (decoder input, layer 0 out, ..., layer L-2 out, final-norm output): the last
  entry is post-norm and layer L-1's raw output is not in it. So taps come from hooks, not from hidden_states.
- RoPE positions start at 1 in HF and at 0 in keras; attention depends on position differences only.
- Known semantic difference (``window_divergence``): HF's sliding-window layers keep the prefix fully
  bidirectional (``(causal AND band) OR same-prefix-block``); keras ANDs a symmetric band onto the prefix-LM mask.
  They differ when two prefix positions of a row are ``sliding_window_size`` or more apart. The backend then
  declares every decoder tap downstream of the first windowed attention as xfail (``TransformersBackend.xfail``).
"""

from __future__ import annotations

import importlib.util
import math
from typing import Any, Mapping, Sequence

import numpy as np

from conformance.backend import BackendUnavailable, Capabilities, exact_names_regex
from conformance.cases import Case, CaseError
from refimpl.config import PaliGemmaConfig
from refimpl.dtypes import Policy
from refimpl.inputs import validate_inputs
from refimpl.params import PaliGemmaParams

DTYPES = ("float32", "float64", "bfloat16")
HF_DECODER_EPS = 1e-6  # keras fixes the decoder-block RMSNorm eps at 1e-6; HF has one eps for all text norms
ROPE_THETA = 10000.0  # keras' RotaryEmbedding max_wavelength (spec 4.2)
UNAVAILABLE = "transformers/torch not installed (pip install torch==2.13.0 transformers)"


class HFConversionError(ValueError):
    """A keras PaliGemma config or input that HF's PaliGemma cannot represent."""


def transformers_available() -> bool:
    try:
        return all(importlib.util.find_spec(name) is not None for name in ("torch", "transformers"))
    except (ImportError, ValueError):  # a broken install, or a module blocked with sys.modules[name] = None
        return False


# ---- config ----------------------------------------------------------------------------------------------------
def text_family(config: PaliGemmaConfig) -> str:
    """"gemma2" when the config uses any PaliGemma 2 feature, else "gemma"; raises if HF has no matching tower."""
    c = config
    pg2 = {"use_post_attention_norm": c.use_post_attention_norm, "use_post_ffw_norm": c.use_post_ffw_norm,
           "attention_logit_soft_cap": c.attention_logit_soft_cap is not None,
           "final_logit_soft_cap": c.final_logit_soft_cap is not None,
           "use_sliding_window_attention": c.use_sliding_window_attention}
    if not any(pg2.values()):
        return "gemma"
    if c.use_post_attention_norm and c.use_post_ffw_norm:
        return "gemma2"
    raise HFConversionError(f"config: HF's Gemma 2 decoder always has both post-norms, but use_post_attention_norm="
                            f"{c.use_post_attention_norm} and use_post_ffw_norm={c.use_post_ffw_norm} while "
                            f"{[k for k, v in pg2.items() if v]} need Gemma 2; HF cannot represent this config")


def hf_config_dict(config: PaliGemmaConfig, *, dtype: str = "float32") -> dict[str, Any]:
    """The ``PaliGemmaConfig`` of HF (as its ``config.json`` holds it) equivalent to a keras backbone config.

    Raises:
      HFConversionError: the config uses something HF's PaliGemma cannot express (see ``text_family``; a final-norm
        eps other than the decoder's 1e-6).
    """
    c, family = config, text_family(config)
    if not math.isclose(c.layer_norm_epsilon, HF_DECODER_EPS, rel_tol=0, abs_tol=0):
        raise HFConversionError(f"config: layer_norm_epsilon={c.layer_norm_epsilon} reaches keras' final norm only "
                                f"(decoder norms use {HF_DECODER_EPS}); HF has one rms_norm_eps for all text norms")
    vocab = c.vocabulary_size + 1  # one more row: the <image> placeholder token
    text = {"model_type": family, "vocab_size": vocab, "hidden_size": c.hidden_dim,
            "intermediate_size": c.ffw_dim, "num_hidden_layers": c.num_layers,
            "num_attention_heads": c.num_query_heads, "num_key_value_heads": c.num_key_value_heads,
            "head_dim": c.head_dim, "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": HF_DECODER_EPS,
            "rope_parameters": {"rope_type": "default", "rope_theta": ROPE_THETA},
            "max_position_embeddings": 8192, "attention_bias": False, "pad_token_id": 0, "eos_token_id": 1,
            "bos_token_id": 2, "tie_word_embeddings": True, "dtype": dtype}
    if family == "gemma2":
        text.update(_gemma2_fields(c))
    vision = {"model_type": "siglip_vision_model", "hidden_size": c.vit_hidden_dim,
              "intermediate_size": c.vit_intermediate_dim, "num_hidden_layers": c.vit_num_layers,
              "num_attention_heads": c.vit_num_heads, "num_channels": 3, "image_size": c.image_size,
              "patch_size": c.vit_patch_size, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
              "vision_use_head": False, "projection_dim": c.hidden_dim, "dtype": dtype}
    return {"architectures": ["PaliGemmaForConditionalGeneration"], "model_type": "paligemma",
            "vision_config": vision, "text_config": text, "image_token_index": c.vocabulary_size,
            "vocab_size": vocab, "projection_dim": c.hidden_dim, "hidden_size": c.hidden_dim,
            "tie_word_embeddings": True, "dtype": dtype}


def _gemma2_fields(c: PaliGemmaConfig) -> dict[str, Any]:
    # keras windows even-indexed layers only (refimpl.config.uses_sliding_window); HF reads layer_types.
    layer_types = ["sliding_attention" if c.uses_sliding_window(i) else "full_attention" for i in range(c.num_layers)]
    return {"query_pre_attn_scalar": c.head_dim,  # keras quirk Q1: always 1/sqrt(head_dim)
            "sliding_window": c.sliding_window_size, "layer_types": layer_types,
            "attn_logit_softcapping": c.attention_logit_soft_cap,
            "final_logit_softcapping": c.final_logit_soft_cap}


# ---- weights ---------------------------------------------------------------------------------------------------
HUB_VISION = "vision_tower.vision_model."
HUB_TEXT = "language_model.model."
HUB_PROJECTOR = "multi_modal_projector."


def hf_state_dict(params: PaliGemmaParams, config: PaliGemmaConfig) -> dict[str, np.ndarray]:
    """HF tensors named as in the Hub's PaliGemma ``model.safetensors`` (``language_model.model.layers.0...``).

    Linear weights are [out, in] (our matrices transposed), the patch conv is OIHW, and the embedding gets a zero
    row for ``<image>``. ``lm_head.weight`` is left out: it is tied to the embedding, as in Hub checkpoints.
    Arrays keep ``params``' dtype and are C-contiguous.
    """
    out: dict[str, np.ndarray] = {}
    out.update(_vision_tensors(params, config))
    out[HUB_PROJECTOR + "linear.weight"] = params.vit.proj_kernel.T
    out[HUB_PROJECTOR + "linear.bias"] = params.vit.proj_bias
    out.update(_text_tensors(params, config))
    return {name: np.ascontiguousarray(array) for name, array in out.items()}


def _vision_tensors(params: PaliGemmaParams, config: PaliGemmaConfig) -> dict[str, np.ndarray]:
    vit, p, dv = params.vit, config.vit_patch_size, config.vit_hidden_dim
    # patch_kernel rows are a patch flattened (row, col, channel): back to HWIO, then to torch's OIHW.
    out = {"embeddings.patch_embedding.weight": vit.patch_kernel.reshape(p, p, 3, dv).transpose(3, 2, 0, 1),
           "embeddings.patch_embedding.bias": vit.patch_bias,
           "embeddings.position_embedding.weight": vit.position_embedding,
           "post_layernorm.weight": vit.encoder_ln_gamma, "post_layernorm.bias": vit.encoder_ln_beta}
    for j, b in enumerate(vit.blocks):
        layer = f"encoder.layers.{j}."
        out.update({layer + "layer_norm1.weight": b.ln1_gamma, layer + "layer_norm1.bias": b.ln1_beta,
                    layer + "layer_norm2.weight": b.ln2_gamma, layer + "layer_norm2.bias": b.ln2_beta,
                    layer + "mlp.fc1.weight": b.mlp1_kernel.T, layer + "mlp.fc1.bias": b.mlp1_bias,
                    layer + "mlp.fc2.weight": b.mlp2_kernel.T, layer + "mlp.fc2.bias": b.mlp2_bias})
        for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "out_proj")):
            out[layer + f"self_attn.{theirs}.weight"] = getattr(b, f"w{ours}").T
            out[layer + f"self_attn.{theirs}.bias"] = getattr(b, f"b{ours}")
    return {HUB_VISION + name: array for name, array in out.items()}


def _text_tensors(params: PaliGemmaParams, config: PaliGemmaConfig) -> dict[str, np.ndarray]:
    table = params.token_embedding  # f[V, D]
    image_row = np.zeros((1, table.shape[1]), dtype=table.dtype)  # <image>: replaced by image features anyway
    out = {"embed_tokens.weight": np.concatenate([table, image_row]), "norm.weight": params.final_norm}
    gemma2 = text_family(config) == "gemma2"
    for i, b in enumerate(params.blocks):
        layer = f"layers.{i}."
        out.update({layer + "input_layernorm.weight": b.pre_attention_norm,
                    layer + "self_attn.q_proj.weight": b.wq.T, layer + "self_attn.k_proj.weight": b.wk.T,
                    layer + "self_attn.v_proj.weight": b.wv.T, layer + "self_attn.o_proj.weight": b.wo.T,
                    layer + "mlp.gate_proj.weight": b.w_gate.T, layer + "mlp.up_proj.weight": b.w_up.T,
                    layer + "mlp.down_proj.weight": b.w_down.T})
        if gemma2:  # Gemma 2 names the post-attention norm what it is, and has two FFW norms
            out.update({layer + "post_attention_layernorm.weight": b.post_attention_norm,
                        layer + "pre_feedforward_layernorm.weight": b.pre_ffw_norm,
                        layer + "post_feedforward_layernorm.weight": b.post_ffw_norm})
        else:  # Gemma 1: HF's "post_attention_layernorm" is keras' pre_ffw_norm
            out[layer + "post_attention_layernorm.weight"] = b.pre_ffw_norm
    return {HUB_TEXT + name: array for name, array in out.items()}


def load_case_params(case: Case, dtype: str = "float32") -> PaliGemmaParams:
    """The case's Keras preset read by refimpl's strict reader (bf16 files widen exactly to float32)."""
    from refimpl.weights import load_params

    return load_params(case.preset, case.parsed_config, Policy("float64" if dtype == "float64" else "float32"))


# ---- inputs ----------------------------------------------------------------------------------------------------
def hf_inputs(inputs: Mapping[str, Any], config: PaliGemmaConfig) -> dict[str, np.ndarray]:
    """HF's four model inputs for keras-style backbone inputs.

    Returns:
      input_ids int64[B, N_img + T]: ``<image>`` (= vocabulary_size) N_img times, then token_ids;
      pixel_values f32[B, 3, S, S]: images channels-first, rescaled x * (1/127.5) - 1 for include_rescaling configs;
      attention_mask int64[B, N_img + T]: 1 for image tokens, then padding_mask;
      token_type_ids int64[B, N_img + T]: 0 for image tokens, then response_mask (0 prefix, 1 causal suffix).
    """
    checked = validate_inputs(inputs, config)
    batch, n_img = checked.token_ids.shape[0], config.image_sequence_length
    image_ids = np.full((batch, n_img), config.vocabulary_size, dtype=np.int64)
    ones, zeros = np.ones((batch, n_img), dtype=np.int64), np.zeros((batch, n_img), dtype=np.int64)
    return {"input_ids": np.concatenate([image_ids, checked.token_ids], axis=1),
            "pixel_values": np.ascontiguousarray(model_space_images(checked.images, config).transpose(0, 3, 1, 2)),
            "attention_mask": np.concatenate([ones, checked.padding_mask.astype(np.int64)], axis=1),
            "token_type_ids": np.concatenate([zeros, checked.response_mask.astype(np.int64)], axis=1)}


def model_space_images(images: np.ndarray, config: PaliGemmaConfig) -> np.ndarray:
    """f32[B, S, S, 3] in [-1, 1]: keras-nlp's in-backbone Rescaling (x * (1/127.5) + (-1), spec 2.1) if configured."""
    x = np.asarray(images, dtype=np.float32)
    if config.include_rescaling:
        x = x * np.float32(1 / 127.5) + np.float32(-1.0)
    return x


def window_divergence(inputs: Mapping[str, Any], config: PaliGemmaConfig) -> str | None:
    """Why HF's sliding window differs from keras' on these inputs, or None when it does not.

    HF's windowed layers let every prefix position see every other; keras' symmetric band cuts prefix pairs
    ``sliding_window_size`` or more apart. The image starts every row, so the two masks differ exactly when a row's
    last valid prefix position (image, bos, prompt) is at index >= sliding_window_size; that needs
    N_img + T > sliding_window_size.
    """
    if not config.use_sliding_window_attention:
        return None
    checked = validate_inputs(inputs, config)
    n_img, window = config.image_sequence_length, config.sliding_window_size
    if n_img + checked.token_ids.shape[1] <= window:
        return None
    prefix = checked.padding_mask & ~checked.response_mask  # bool[B, T]
    last = np.array([n_img + (np.flatnonzero(row)[-1] if row.any() else -1) for row in prefix])  # int[B]
    if (last < window).all():
        return None
    return (f"HF's sliding window keeps the prefix bidirectional, keras bands it (prefix reaches position "
            f"{int(last.max())} >= sliding_window_size {window})")


def window_affected_taps(case_taps: Sequence[str], config: PaliGemmaConfig) -> list[str]:
    """Taps downstream of the first windowed attention (decoder layer 0), in the case's forward order."""
    first = next(i for i in range(config.num_layers) if config.uses_sliding_window(i))
    start = f"llm/layer{first:02d}/attn_out"
    if start not in case_taps:
        start = f"llm/layer{first:02d}/out"
    names = list(case_taps)
    return names[names.index(start):] if start in names else ["llm/final_norm", "llm/logits"]


# ---- the backend -----------------------------------------------------------------------------------------------
class TransformersBackend:
    """HF ``PaliGemmaForConditionalGeneration`` on CPU with eager attention.

    Args:
      dtype: torch dtype of weights and activations: "float32" (default), "float64" (everything but HF's eager
        softmax, which stays float32; judged on the float32 row) or "bfloat16" (HF's own bf16 rounding points,
        judged on the bfloat16 row; no keras-parity claim).

    After ``prepare(case)``: ``xfail`` holds (regex, reason) pairs for taps HF is known to compute differently on
    this case (the harness adds them to its xfail list), ``notes`` holds the lines the report should show.
    """

    def __init__(self, dtype: str = "float32"):
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}: expected one of {DTYPES}")
        if not transformers_available():
            raise BackendUnavailable(UNAVAILABLE)
        import torch
        import transformers

        self.dtype, self._torch, self._transformers = dtype, torch, transformers
        self.model = None
        self.config: PaliGemmaConfig | None = None
        self.xfail: tuple[tuple[str, str], ...] = ()
        self.notes: list[str] = []

    @property
    def name(self) -> str:
        return f"transformers[{self._transformers.__version__}, torch {self._torch.__version__}, {self.dtype}, eager]"

    @property
    def capabilities(self) -> Capabilities:
        # HF's eager attention runs softmax in float32 whatever the model dtype, so a float64 run carries float32
        # rounding (about 1e-7 relative) and is judged on the float32 row.
        row = "float32" if self.dtype == "float64" else self.dtype
        return Capabilities(dtype=row, description="HF PaliGemmaForConditionalGeneration, CPU, eager attention")

    def prepare(self, case: Case) -> None:
        self.model = self.config = None  # nothing half-prepared survives a refused case
        config = case.parsed_config
        try:
            self.model = build_model(load_case_params(case, self.dtype), config, self.dtype)
        except HFConversionError as error:
            raise CaseError(f"case {case.name!r}: {error}") from None
        self.config = config
        self.xfail, self.notes = (), []
        if head_split_check_fails(self.config):
            self.notes.append(f"hidden_dim {self.config.hidden_dim} is not a multiple of num_query_heads "
                              f"{self.config.num_query_heads}: transformers' config check was bypassed (the model "
                              "uses head_dim only); from_pretrained of an exported config.json would reject it")
        reason = window_divergence(case.inputs, self.config) if case.inputs else None  # property cases: no inputs
        if reason:
            affected = window_affected_taps(case.taps, self.config)
            self.xfail = ((exact_names_regex(affected), reason),)
            self.notes.append(f"{len(affected)} taps from {affected[0]} on may fail as xfail: {reason}")

    def run(self, inputs: Mapping[str, np.ndarray], taps: Sequence[str]) -> dict[str, np.ndarray]:
        if self.model is None:
            raise RuntimeError("TransformersBackend.run before prepare(case)")
        torch = self._torch
        arrays = hf_inputs(inputs, self.config)
        tensors = {name: torch.from_numpy(array) for name, array in arrays.items()}
        tensors["pixel_values"] = tensors["pixel_values"].to(_torch_dtype(torch, self.dtype))
        recorder = _HookRecorder(self.model, self.config)
        try:
            with torch.inference_mode():
                logits = self.model(**tensors, use_cache=False).logits
        finally:
            recorder.remove()
        out = recorder.taps(arrays["pixel_values"], logits)
        wanted = set(taps) | {"llm/final_norm"}
        return {name: value for name, value in out.items() if name in wanted}


def transformers_float64() -> TransformersBackend:
    """``--backend conformance.hf_backend:transformers_float64``: HF in float64 (softmax still float32), which
    separates the weight mapping's error (none) from float32 rounding."""
    return TransformersBackend(dtype="float64")


def _torch_dtype(torch, dtype: str):
    return {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}[dtype]


def build_model(params: PaliGemmaParams, config: PaliGemmaConfig, dtype: str = "float32"):
    """An HF PaliGemmaForConditionalGeneration holding ``params``, eager attention, in eval mode.

    Loading is strict: every model tensor must come from ``params`` (only the tied lm_head may be absent).
    """
    import torch
    from transformers import PaliGemmaConfig as HFConfig, PaliGemmaForConditionalGeneration

    hf_config = make_hf_config(HFConfig, config, dtype)
    torch_dtype = _torch_dtype(torch, dtype)
    model = PaliGemmaForConditionalGeneration._from_config(hf_config, attn_implementation="eager", dtype=torch_dtype)
    expected = model.state_dict()
    tensors = {}
    for hub_name, array in hf_state_dict(params, config).items():
        name = module_name(hub_name, expected)
        tensors[name] = torch.from_numpy(np.array(array, copy=True)).to(torch_dtype)
        if tuple(tensors[name].shape) != tuple(expected[name].shape):
            raise HFConversionError(f"{hub_name}: converted shape {tuple(tensors[name].shape)}, HF expects "
                                    f"{tuple(expected[name].shape)}")
    result = model.load_state_dict(tensors, strict=False)
    missing = [k for k in result.missing_keys if k != "lm_head.weight"]
    if missing or result.unexpected_keys:
        raise HFConversionError(f"HF state dict: missing {missing}, unexpected {result.unexpected_keys}")
    model.tie_weights()
    if not torch.equal(model.lm_head.weight, model.get_input_embeddings().weight):
        raise HFConversionError("lm_head.weight is not tied to the token embedding after loading")
    return model.eval()


def head_split_check_fails(config: PaliGemmaConfig) -> bool:
    """transformers 5's strict config check wants hidden_size % num_attention_heads == 0 even with an explicit
    head_dim (which is all the model uses); tiny test configs may break it, real PaliGemma presets do not."""
    return config.hidden_dim % config.num_query_heads != 0


def make_hf_config(config_class, config: PaliGemmaConfig, dtype: str):
    """``config_class`` (transformers' PaliGemmaConfig) built from ``hf_config_dict``.

    When only HF's hidden_size/heads divisibility check stands in the way (``head_split_check_fails``), the text
    config is validated with a stand-in width and then given the real one; nothing in the model reads the ratio.
    """
    document = {k: v for k, v in hf_config_dict(config, dtype=dtype).items() if k != "architectures"}
    if not head_split_check_fails(config):
        return config_class(**document)
    heads = config.num_query_heads
    document["text_config"] = dict(document["text_config"], hidden_size=heads * -(-config.hidden_dim // heads))
    hf_config = config_class(**document)
    hf_config.text_config.hidden_size = config.hidden_dim
    return hf_config


# Module prefixes of the Hub names, newest transformers first (5.x drops SigLIP's "vision_model" wrapper).
_PREFIX_CANDIDATES = {
    HUB_TEXT: ("model.language_model.", HUB_TEXT),
    HUB_VISION: ("model.vision_tower.", "model.vision_tower.vision_model.", HUB_VISION),
    HUB_PROJECTOR: ("model.multi_modal_projector.", HUB_PROJECTOR),
}


def module_name(hub_name: str, expected: Mapping[str, Any]) -> str:
    """The installed transformers' state-dict name for a Hub tensor name."""
    for hub_prefix, candidates in _PREFIX_CANDIDATES.items():
        if hub_name.startswith(hub_prefix):
            for prefix in candidates:
                name = prefix + hub_name[len(hub_prefix):]
                if name in expected:
                    return name
    raise HFConversionError(f"{hub_name}: no matching tensor in this transformers' PaliGemma state dict")


def to_numpy(tensor) -> np.ndarray:
    """A NumPy copy of a torch tensor; bf16 and f16 widen to float32 (NumPy has no bf16)."""
    tensor = tensor.detach()
    if tensor.dtype.is_floating_point and tensor.element_size() < 4:
        tensor = tensor.float()
    return tensor.numpy().copy()


class _HookRecorder:
    """Forward hooks on HF's modules that keep each tap's tensor (as NumPy) under its refimpl/taps.py name."""

    def __init__(self, model, config: PaliGemmaConfig):
        self.config, self.arrays, self.handles = config, {}, []
        inner = model.model
        vision = inner.vision_tower
        vision = getattr(vision, "vision_model", vision)  # transformers 4.x wraps SigLIP once more
        self._vision(vision)
        self._output(inner.multi_modal_projector, "img/proj")
        self._text(inner.language_model)

    def _vision(self, vision) -> None:
        self._output(vision.embeddings, "img/embed")
        for j, layer in enumerate(vision.encoder.layers):
            p = f"img/block{j:02d}/"
            self._output(layer.layer_norm1, p + "ln1")
            self._output(layer.self_attn, p + "attn_out")
            self._input(layer.layer_norm2, p + "attn_residual")
            self._output(layer.layer_norm2, p + "ln2")
            self._output(layer.mlp, p + "mlp_out")
            self._output(layer, p + "out")
        self._output(vision.post_layernorm, "img/encoded")

    def _text(self, lm) -> None:
        self.handles.append(lm.register_forward_pre_hook(self._decoder_inputs, with_kwargs=True))
        self._output(lm.embed_tokens, "llm/embed_text")
        gemma2 = hasattr(lm.layers[0], "pre_feedforward_layernorm") if len(lm.layers) else False
        for i, layer in enumerate(lm.layers):
            p = f"llm/layer{i:02d}/"
            self._output(layer.input_layernorm, p + "pre_attn_norm")
            self._output(layer.self_attn, p + "attn_out")
            self._output(layer.mlp, p + "ffw_out")
            self._output(layer, p + "out")
            if gemma2:
                self._output(layer.post_attention_layernorm, p + "post_attn_norm")
                self._input(layer.pre_feedforward_layernorm, p + "attn_residual")
                self._output(layer.pre_feedforward_layernorm, p + "pre_ffw_norm")
                self._output(layer.post_feedforward_layernorm, p + "post_ffw_norm")
            else:  # Gemma 1's post_attention_layernorm is the pre-FFW norm
                self._input(layer.post_attention_layernorm, p + "attn_residual")
                self._output(layer.post_attention_layernorm, p + "pre_ffw_norm")
        self._output(lm.norm, "llm/final_norm")

    def _keep(self, name: str, tensor) -> None:
        self.arrays[name] = to_numpy(tensor[0] if isinstance(tensor, (tuple, list)) else tensor)

    def _output(self, module, name: str) -> None:
        self.handles.append(module.register_forward_hook(lambda _m, _a, out: self._keep(name, out)))

    def _input(self, module, name: str) -> None:
        self.handles.append(module.register_forward_pre_hook(lambda _m, args: self._keep(name, args[0])))

    def _decoder_inputs(self, _module, args, kwargs) -> None:
        embeds = kwargs.get("inputs_embeds")
        if embeds is not None:
            self._keep("llm/input", embeds)
        mask = kwargs.get("attention_mask")
        mask = mask.get("full_attention") if isinstance(mask, dict) else mask
        if mask is not None and mask.dim() == 4:  # [B, 1, L, L]: bool (True = visible) or additive float (0 = visible)
            visible = mask[:, 0] if not mask.dtype.is_floating_point else mask[:, 0] == 0
            self.arrays["llm/mask"] = to_numpy(visible)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def taps(self, pixel_values: np.ndarray, logits) -> dict[str, np.ndarray]:
        """All recorded taps plus those derived from the model's own inputs and outputs."""
        n_img, vocab = self.config.image_sequence_length, self.config.vocabulary_size
        out = {"img/pixels": pixel_values.transpose(0, 2, 3, 1)}
        out.update(self.arrays)
        if "llm/embed_text" in out:
            out["llm/embed_text"] = out["llm/embed_text"][:, n_img:]
        out["llm/logits"] = to_numpy(logits[:, n_img:, :vocab])  # drop <image>'s column
        return out
