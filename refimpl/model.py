"""``PaliGemmaBackbone``: the glue between the towers, and the keras-hub-shaped public API.

    x   = concat(vit(images), embed_text(token_ids))        f[B, L, D], L = image tokens + T
    m   = prefix_lm_mask(padding_mask, response_mask)       bool[B, L, L]
    x   = decoder_block_i(x, m) for every block i           (even blocks AND a sliding band if configured)
    out = rms_norm(x, final scale, layer_norm_epsilon)      the backbone output, image tokens included
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from refimpl import gemma, presets as presets_lib
from refimpl.attention import prefix_lm_mask
from refimpl.config import ConfigError, PaliGemmaConfig, count_params
from refimpl.dtypes import Policy, policy_from_keras
from refimpl.files import check_serialized_class, read_json_limited
from refimpl.init import random_params
from refimpl.inputs import validate_inputs
from refimpl.kernels import Kernels, get_kernels
from refimpl.params import PaliGemmaParams
from refimpl.taps import NO_TAPS, Recorder
from refimpl.vit import vit_forward

# Class names a config file may name; anything else is refused before any argument is read.
ALLOWED_CLASS_NAMES = ("PaliGemmaBackbone",)
ALLOWED_REGISTERED_NAMES = ("keras_hub>PaliGemmaBackbone", "keras_nlp>PaliGemmaBackbone", None)
MAX_CONFIG_BYTES = 1 << 20  # a backbone config.json is about 1 KB
# How from_preset holds the weights, by the name the command lines use: read into memory (the default), mapped
# from the file where stored as used, or read block by block as the forward pass reaches them.
WEIGHT_MODES = {"read": {}, "mmap": {"mmap": True}, "stream": {"stream": True}}


def forward(inputs, params: PaliGemmaParams, config: PaliGemmaConfig, policy: Policy, kernels: Kernels,
            rec: Recorder = NO_TAPS) -> np.ndarray:
    """The backbone forward pass on validated ``BackboneInputs``; returns f[B, L, D]."""
    image_tokens = vit_forward(inputs.images, params.vit, config, policy, kernels, rec)
    text = gemma.embed_text(inputs.token_ids, params.token_embedding, config, policy)
    rec("llm/embed_text", text)
    x = np.concatenate([image_tokens, text], axis=1)
    rec("llm/input", x)
    mask = prefix_lm_mask(inputs.padding_mask, inputs.response_mask, config.image_sequence_length)
    rec("llm/mask", mask)
    positions = np.arange(x.shape[1])
    for i, block in enumerate(params.blocks):
        name = f"llm/layer{i:02d}"
        x = gemma.decoder_block(x, block, config, policy, kernels, gemma.layer_mask(mask, i, positions, config),
                                positions, rec, name)
        rec(f"{name}/out", x)
    x = gemma.rms_norm(x, params.final_norm, config.layer_norm_epsilon, policy, kernels)
    rec("llm/final_norm", x)
    if rec.wants("llm/logits"):
        rec("llm/logits", gemma.lm_head(x[:, config.image_sequence_length:], params.token_embedding, config,
                                        policy, kernels))
    return x


class TokenEmbedding:
    """keras' ReversibleEmbedding: ``embed(ids)`` gathers rows, ``reverse(hidden)`` is the tied LM head."""

    def __init__(self, model: "PaliGemmaBackbone"):
        self._model = model

    @property
    def embeddings(self) -> np.ndarray:  # f[V, D]
        return self._model.params.token_embedding

    def __call__(self, token_ids: np.ndarray) -> np.ndarray:
        """Rows of the table (without the sqrt(D) factor the backbone applies), in the compute dtype."""
        return self._model.policy.cast(self.embeddings[np.asarray(token_ids)])

    def reverse(self, hidden: np.ndarray) -> np.ndarray:
        m = self._model
        return gemma.lm_head(np.asarray(hidden, dtype=m.policy.dtype), self.embeddings, m.config, m.policy,
                             m.kernels)


class _PresetTable(dict):
    """``PaliGemmaBackbone.presets``: name -> {description, config, params, kaggle_handle}."""


class PaliGemmaBackbone:
    """NumPy PaliGemma backbone with keras-hub's constructor, ``from_preset`` and call convention.

    ``model({"images", "token_ids", "padding_mask", "response_mask"})`` returns f[B, L, hidden_dim]: the final-norm
    hidden states of the image tokens then the text tokens. Keyword-only extras: ``seed`` for the random weights,
    ``kernels`` ("numpy", the readable spec, or "numba", the fast twins), and ``params`` to supply weights.
    """

    presets = _PresetTable({name: {"description": p.description, "config": p.config.to_keras_config(),
                                   "params": p.parameter_count, "kaggle_handle": p.kaggle_handle}
                            for name, p in presets_lib.PRESETS.items()})

    def __init__(self, vocabulary_size, image_size, num_layers, num_query_heads, num_key_value_heads, hidden_dim,
                 intermediate_dim, head_dim, vit_patch_size, vit_num_heads, vit_hidden_dim, vit_num_layers,
                 vit_intermediate_dim=None, vit_pooling=None, vit_classifier_activation=None, vit_name=None,
                 include_rescaling=True, query_head_dim_normalize=True, use_post_ffw_norm=False,
                 use_post_attention_norm=False, attention_logit_soft_cap=None, final_logit_soft_cap=None,
                 use_sliding_window_attention=False, sliding_window_size=4096, layer_norm_epsilon=1e-6,
                 dropout=0, dtype=None, *, seed: int = 0, kernels: str | Kernels = "numpy",
                 params: PaliGemmaParams | None = None, name: str = "pali_gemma_backbone"):
        args = {key: value for key, value in locals().items()
                if key not in ("self", "dtype", "seed", "kernels", "params", "name", "__class__")}
        self.config = PaliGemmaConfig(**args)
        self.policy = policy_from_keras(dtype)
        self.kernels = get_kernels(kernels) if isinstance(kernels, str) else kernels
        self.name = name
        self.params = params if params is not None else random_params(self.config, seed=seed,
                                                                      dtype=self.policy.dtype)
        self.token_embedding = TokenEmbedding(self)

    @classmethod
    def from_config_object(cls, config: PaliGemmaConfig, params: PaliGemmaParams | None = None, *,
                           dtype=None, kernels: str | Kernels = "numpy", seed: int = 0) -> "PaliGemmaBackbone":
        return cls(**{k: getattr(config, k) for k in config.__dataclass_fields__}, dtype=dtype, seed=seed,
                   kernels=kernels, params=params)

    @classmethod
    def from_preset(cls, preset: str | Path, load_weights: bool = True, dtype=None, *,
                    kernels: str | Kernels = "numpy", seed: int = 0, stream: bool = False,
                    mmap: bool = False) -> "PaliGemmaBackbone":
        """Load a preset directory, a legacy ``.h5`` file, a built-in preset name, or a kaggle:// / hf:// handle.

        ``dtype=None`` gives float32, like keras-hub's ``from_preset`` (it casts saved float weights to the keras
        default policy). Built-in names with ``load_weights=False`` need no files at all.

        ``stream=True`` keeps the weight file open and reads each ViT and decoder block when the forward pass
        reaches it, and only the gathered rows of the token embedding (the LM head walks it in slabs); see
        ``refimpl.weights.stream_params``. Outputs and taps equal those of ``stream=False`` bit for bit (LM logits
        up to BLAS blocking of the slabs); memory is a block instead of the model (float64 on the 3B model: a few
        GB instead of 23), at the price of re-reading the file every call. Call ``close()`` (or use the model as a
        context manager) to release the file.

        ``mmap=True`` maps the weights whose stored bytes already are the params array (float32 files in the
        float32 policy: all but the re-laid-out attention and patch kernels) read-only into memory instead of
        reading them: loading takes a fraction of a second and only pages that are used become resident (of the
        token table, the gathered rows). Outputs are unchanged. The file must not be modified in place meanwhile.
        """
        from refimpl import weights  # the reader is only needed when files are read

        policy = policy_from_keras(dtype)
        path = Path(preset) if not isinstance(preset, str) or "://" not in preset else None
        if path is None or not path.exists():
            name = str(preset)
            if name in presets_lib.PRESETS and not load_weights:
                return cls.from_config_object(presets_lib.PRESETS[name].config, dtype=policy, kernels=kernels,
                                              seed=seed)
            if name not in presets_lib.PRESETS and "://" not in name:
                raise FileNotFoundError(f"preset {name!r}: not a file, a directory, a built-in preset name "
                                        f"({', '.join(presets_lib.PRESETS)}) or a kaggle:// / hf:// handle")
            path = presets_lib.find_local_dir(name)
        config = read_preset_config(path)
        if not (stream and load_weights):
            params = weights.load_params(path, config, policy, mmap=mmap) if load_weights else None
            return cls.from_config_object(config, params, dtype=policy, kernels=kernels, seed=seed)
        weight_file = weights.open_weight_file(path)
        try:
            model = cls.from_config_object(config, weights.stream_params(weight_file, config, policy, mmap=mmap),
                                           dtype=policy, kernels=kernels, seed=seed)
        except BaseException:
            weight_file.close()
            raise
        model._weight_file = weight_file
        return model

    def close(self) -> None:
        """Close the weight file a streaming model reads from (``from_preset(..., stream=True)``); else nothing."""
        weight_file = getattr(self, "_weight_file", None)
        if weight_file is not None:
            weight_file.close()
            self._weight_file = None

    def __enter__(self) -> "PaliGemmaBackbone":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- keras-like accessors ------------------------------------------------------------------------------
    @property
    def image_sequence_length(self) -> int:
        return self.config.image_sequence_length

    def count_params(self) -> int:
        return count_params(self.config)

    def get_config(self) -> dict[str, Any]:
        """keras' config dict: name, trainable, dtype policy, then the backbone arguments."""
        dtype = {"module": "keras", "class_name": "DTypePolicy", "config": {"name": self.policy.name},
                 "registered_name": None}
        return {"name": self.name, "trainable": True, "dtype": dtype, **self.config.to_keras_config()}

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **kwargs) -> "PaliGemmaBackbone":
        parsed = PaliGemmaConfig.from_keras_config(config)
        return cls.from_config_object(parsed, dtype=kwargs.pop("dtype", config.get("dtype")), **kwargs)

    # ---- calling -------------------------------------------------------------------------------------------
    def __call__(self, inputs: Mapping[str, Any], *, check_image_range: bool = True) -> np.ndarray:
        return self.call_with_taps(inputs, taps=None, check_image_range=check_image_range)[0]

    def call_with_taps(self, inputs: Mapping[str, Any], taps: str | None = ".*", *,
                       check_image_range: bool = True) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Run the backbone and also return the taps whose names match the regex ``taps`` (None: no taps)."""
        checked = validate_inputs(inputs, self.config, check_image_range=check_image_range)
        rec = NO_TAPS if taps is None else Recorder(taps)
        out = forward(checked, self.params, self.config, self.policy, self.kernels, rec)
        return out, dict(rec.taps)


def _read_json(path: Path, what: str) -> Any:
    return read_json_limited(path, what, MAX_CONFIG_BYTES, ConfigError)


def parse_backbone_config(document: Any, source: str) -> PaliGemmaConfig:
    """Check a serialized keras object (``{"class_name", "config", ...}``) and parse its backbone arguments."""
    config = check_serialized_class(document, source, ALLOWED_CLASS_NAMES, ALLOWED_REGISTERED_NAMES, ConfigError)
    return PaliGemmaConfig.from_keras_config(config, source=source)


def read_preset_config(path: Path) -> PaliGemmaConfig:
    """The backbone config of a preset directory (config.json) or a legacy .h5 file (its model_config)."""
    path = Path(path)
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"preset {path}: no config.json in this directory")
        return parse_backbone_config(_read_json(config_file, "config.json"), str(config_file))
    if path.suffix == ".json" and path.name != "config.json":  # a sharded weights index: config sits beside it
        return read_preset_config(path.parent)
    if path.name.endswith(".weights.h5"):
        return read_preset_config(path.parent)
    if path.suffix == ".h5":
        from refimpl.weights import read_legacy_model_config
        return parse_backbone_config(read_legacy_model_config(path), f"{path}:model_config")
    raise ValueError(f"preset {path}: expected a preset directory, a .weights.h5 file or a legacy .h5 file")
