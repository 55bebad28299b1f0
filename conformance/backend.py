"""What a backend implements to be checked, and the backends that ship with the harness.

The protocol, small enough to implement in an afternoon:

    class MyPort:
        name = "my-port"
        capabilities = Capabilities(dtype="float32")          # the number format the port computes in
        def prepare(self, case): ...                          # load case.preset (case.config, case.keras_dtype)
        def run(self, inputs, taps): ...                      # -> {tap name: array}, at least "llm/final_norm"
        def run_block(self, kind, index, block_input, inputs): ...   # optional, for --teacher-forced
        def generate(self, inputs, max_length, stop_token_ids): ...  # optional, for generation records

``run`` gets the case's inputs (images f32[B, S, S, 3], token_ids int32[B, T], padding_mask and response_mask
bool[B, T]) and the tap names wanted, in forward order; it may return any subset (names are those of
``refimpl/taps.py``). ``run_block(kind, index, block_input, inputs)`` runs one ViT block (kind "vit", input
f[B, P, Dv]) or one decoder block (kind "decoder", input f[B, L, D]) on the golden block input and returns that
block's taps under their full names (``img/block01/ln1`` ... ``img/block01/out``), so error introduced in the block
is measured apart from error inherited from earlier blocks.

``generate(inputs, max_length, stop_token_ids)`` is greedy generation with keras-hub's
``PaliGemmaCausalLM.generate`` semantics (spec 5.2: a seed pass over image + prompt, then one token per step from
the shortest prompt length on, longer prompts kept; no preprocessor). ``inputs`` are images f32[B, S, S, 3],
token_ids int32[B, max_length] (each row's prompt, bos included, right-padded with 0) and padding_mask
bool[B, max_length] (True on the prompt); ``stop_token_ids`` is None (generate to max_length) or a list of ids.
It returns ``{"token_ids": int[B, max_length], "padding_mask": bool[B, max_length]}`` as keras' generate returns
them (the mask True up to and including each row's first generated stop id; all True without stop ids) and,
optionally, ``"step_logits": f[steps, B, V]``, the logits each step sampled from (step s predicts text position
first + s, first = the shortest prompt length). Returning None means "no generation here" (reported as not
provided, not as a failure).

Shipped: ``RefimplBackend`` (this repository's NumPy or numba forward pass), ``DumpBackend`` (tensors an external
port wrote to .npz / HDF5 files), ``KerasHubBackend`` (keras-hub itself, via ``tools.keras_oracle``) and
``RecordedKerasBackend`` (keras-hub's outputs stored in the case, checked without running keras).
``make_backend(name)`` builds one from the registry, or from ``module:factory`` for a port's own class.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from conformance.cases import MAX_ARRAY_BYTES, Case, CaseError, load_npz
from conformance.tolerances import candidate_format
from refimpl import taps as tap_defs

BLOCK_KINDS = ("vit", "decoder")


class BackendUnavailable(RuntimeError):
    """The backend cannot run here (a missing package, say); the message says what would make it run."""


@dataclass(frozen=True)
class Capabilities:
    """What a backend offers. ``dtype`` None means: read each tap's format from the returned array's dtype."""

    dtype: str | None = "float32"  # "float32", "float64", "bfloat16" or "float16"
    teacher_forced: bool = False  # implements run_block
    description: str = ""


@runtime_checkable
class Backend(Protocol):
    name: str

    def prepare(self, case: Case) -> None: ...

    def run(self, inputs: Mapping[str, np.ndarray], taps: Sequence[str]) -> dict[str, np.ndarray]: ...


def capabilities_of(backend: Any) -> Capabilities:
    caps = getattr(backend, "capabilities", None) or Capabilities()
    if not isinstance(caps, Capabilities):
        raise TypeError(f"backend {getattr(backend, 'name', backend)!r}: capabilities must be a "
                        f"conformance.backend.Capabilities, found {type(caps).__name__}")
    return caps


def block_prefix(kind: str, index: int) -> str:
    """Tap prefix of one block: ``img/block03/`` (kind "vit") or ``llm/layer03/`` (kind "decoder")."""
    if kind not in BLOCK_KINDS:
        raise ValueError(f"block kind {kind!r} is unknown; expected one of {BLOCK_KINDS}")
    return f"img/block{index:02d}/" if kind == "vit" else f"llm/layer{index:02d}/"


def exact_names_regex(names: Sequence[str]) -> str:
    return "^(" + "|".join(re.escape(n) for n in names) + ")$"


# ---- refimpl ---------------------------------------------------------------------------------------------------
def numba_importable() -> bool:
    return importlib.util.find_spec("numba") is not None


ModelLoader = Callable[[Case, str, str], Any]  # (case, policy name, kernel set name) -> PaliGemmaBackbone


def load_refimpl_model(case: Case, policy: str, kernels: str):
    """``PaliGemmaBackbone.from_preset`` of the case's preset, checked against the case's config."""
    from refimpl.model import PaliGemmaBackbone

    model = PaliGemmaBackbone.from_preset(case.preset, dtype=policy, kernels=kernels)
    if model.config != case.parsed_config:
        differ = [k for k in model.config.__dataclass_fields__
                  if getattr(model.config, k) != getattr(case.parsed_config, k)]
        raise CaseError(f"case {case.name!r}: the preset's config differs from case.json in {differ}")
    return model


def refimpl_generate(model, inputs: Mapping[str, np.ndarray],
                     stop_token_ids: Sequence[int] | None) -> dict[str, np.ndarray]:
    """Greedy generation of refimpl's ``PaliGemmaCausalLM`` on ``model`` (a PaliGemmaBackbone), as keras does it.

    Ids and the returned mask come from ``generate_step``, which samples from float32 logits as keras' samplers do.
    Its recorded logits are that float32 cast, so under the float64 policy each step's logits are recomputed in
    float64 from the generated tokens (``recompute_logits``: the same step from scratch, no cache).

    Returns:
      token_ids int32[B, M], padding_mask bool[B, M], step_logits f[steps, B, V] in the policy's dtype, and steps
      int64[steps] (the text position each step predicted).
    """
    from refimpl.causal_lm import PaliGemmaCausalLM

    lm = PaliGemmaCausalLM(model)
    out = lm.generate_step(inputs, stop_token_ids, return_logits=True)
    logits = out["logits"]
    if model.policy.dtype == np.float64 and len(out["steps"]):
        prompt = np.asarray(inputs["padding_mask"], dtype=bool)
        image_tokens = lm.encode_images(out["images"])
        first = int(prompt.sum(axis=-1).min())
        logits = np.stack([lm.recompute_logits(image_tokens, out["token_ids"], prompt, first, int(idx))
                           for idx in out["steps"]])
    return {"token_ids": out["token_ids"], "padding_mask": out["padding_mask"], "step_logits": logits,
            "steps": out["steps"]}


class RefimplBackend:
    """This repository's forward pass as a candidate (the numba kernels and float32 are the interesting ones).

    Args:
      kernels: "numpy" (the spec), "numba" (compiled twins) or "auto" (numba when importable).
      dtype: refimpl policy ("float32", "float64", "bfloat16", "mixed_bfloat16"), or "case" for the keras dtype
        the case was recorded under.
      model_loader: how to build the model for a case; default ``load_refimpl_model`` (reads the preset files).
    """

    def __init__(self, kernels: str = "auto", dtype: str = "float32", *, model_loader: ModelLoader | None = None):
        if kernels == "auto":
            kernels = "numba" if numba_importable() else "numpy"
        if kernels == "numba" and not numba_importable():
            raise BackendUnavailable("kernel set 'numba' needs the numba package (pip install numba); "
                                     "use --backend refimpl-numpy")
        if kernels not in ("numpy", "numba"):
            raise ValueError(f"kernels={kernels!r}: expected 'numpy', 'numba' or 'auto'")
        self.kernels, self.dtype = kernels, dtype
        self._loader = model_loader or load_refimpl_model
        self.model = None
        self._policy = "float32" if dtype == "case" else dtype

    @property
    def name(self) -> str:
        return f"refimpl[{self.kernels} kernels, {self.dtype}]"

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(dtype=candidate_format(self._policy), teacher_forced=True,
                            description=f"refimpl {self._policy} with {self.kernels} kernels")

    def prepare(self, case: Case) -> None:
        self._policy = case.keras_dtype if self.dtype == "case" else self.dtype
        self.model = self._loader(case, self._policy, self.kernels)

    def run(self, inputs: Mapping[str, np.ndarray], taps: Sequence[str]) -> dict[str, np.ndarray]:
        out, recorded = self.model.call_with_taps(inputs, taps=exact_names_regex(taps) if taps else None)
        recorded["llm/final_norm"] = out
        return recorded

    def run_block(self, kind: str, index: int, block_input: np.ndarray,
                  inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        from refimpl import gemma, vit
        from refimpl.attention import prefix_lm_mask
        from refimpl.inputs import validate_inputs
        from refimpl.taps import Recorder

        m, name = self.model, block_prefix(kind, index).rstrip("/")
        rec, x = Recorder(None), m.policy.cast(block_input)
        if kind == "vit":
            out = vit.encoder_block(x, m.params.vit.blocks[index], m.config, m.policy, m.kernels, rec, name)
        else:
            checked = validate_inputs(inputs, m.config)
            mask = prefix_lm_mask(checked.padding_mask, checked.response_mask, m.config.image_sequence_length)
            positions = np.arange(x.shape[1])
            out = gemma.decoder_block(x, m.params.blocks[index], m.config, m.policy, m.kernels,
                                      gemma.layer_mask(mask, index, positions, m.config), positions, rec, name)
        rec(f"{name}/out", out)
        return rec.taps

    def generate(self, inputs: Mapping[str, np.ndarray], max_length: int,
                 stop_token_ids: Sequence[int] | None) -> dict[str, np.ndarray]:
        """Greedy generation (``refimpl_generate``); the length is that of ``inputs["token_ids"]``."""
        out = refimpl_generate(self.model, inputs, stop_token_ids)
        return {key: out[key] for key in ("token_ids", "padding_mask", "step_logits")}


# ---- dumps from an external port -------------------------------------------------------------------------------
DUMP_SUFFIXES = (".npz", ".h5", ".hdf5")
GEN_TOKEN_IDS, GEN_PADDING_MASK, GEN_STEP_LOGITS = "gen/token_ids", "gen/padding_mask", "gen/step_logits"
GENERATION_DUMP_KEYS = (GEN_TOKEN_IDS, GEN_PADDING_MASK, GEN_STEP_LOGITS)


def _read_h5_dump(path: Path) -> tuple[dict[str, np.ndarray], bool]:
    """Datasets of an HDF5 dump by path; bf16 (2-byte opaque or uint16 with attrs dtype=bfloat16) is widened."""
    import h5py
    from refimpl.dtypes import bfloat16_bits_to_float32

    arrays, saw_bf16 = {}, False
    with h5py.File(path, "r") as handle:
        datasets = []
        handle.visititems(lambda name, obj: datasets.append(name) if isinstance(obj, h5py.Dataset) else None)
        for name in datasets:
            dataset = handle[name]
            nbytes = math.prod(dataset.shape) * dataset.dtype.itemsize
            if nbytes > MAX_ARRAY_BYTES:
                raise CaseError(f"{path}:{name}: {nbytes} bytes (shape {dataset.shape}); limit {MAX_ARRAY_BYTES}")
            tag = dataset.attrs.get("dtype")
            tag = tag.decode() if isinstance(tag, bytes) else tag
            raw = dataset[()]
            if tag == "bfloat16" or (dataset.dtype.kind == "V" and dataset.dtype.itemsize == 2):
                arrays[name], saw_bf16 = bfloat16_bits_to_float32(np.asarray(raw).view(np.uint16)), True
            elif dataset.dtype.kind in "fb" or (name == GEN_TOKEN_IDS and dataset.dtype.kind in "iu"):
                arrays[name] = np.asarray(raw)
            else:
                raise CaseError(f"{path}:{name}: dtype {dataset.dtype} is neither float nor bool"
                                + (" (integers only for gen/token_ids)" if dataset.dtype.kind in "iu" else ""))
    return arrays, saw_bf16


class DumpBackend:
    """Tensors a port wrote under the canonical tap names, one file per case.

    ``path`` is one ``.npz`` / ``.h5`` file (then exactly one case may be checked) or a directory holding
    ``<case>.npz`` or ``<case>.h5`` per case. Write npz files with ``np.savez(path, **{tap name: array})``; in
    HDF5 one dataset per tap, its path the tap name (``f["llm/layer02/out"]``). bf16 tensors: HDF5 datasets of
    2-byte opaque type or uint16 with ``attrs["dtype"] = "bfloat16"``, or any float array plus ``dtype="bfloat16"``.
    Run your port on ``golden/<case>/inputs.npz`` to make the dump.

    Generation (cases with a generation record): run your port's greedy generate on
    ``golden/<case>/generation_inputs.npz`` (stop ids in case.json ``generation``) and add ``gen/token_ids``
    int[B, M], ``gen/padding_mask`` bool[B, M] and, optionally, ``gen/step_logits`` f[steps, B, V] to the dump
    (see ``generate`` in this module's docstring). A dump without ``gen/token_ids`` has no generation to check.
    """

    def __init__(self, path: str | os.PathLike, *, dtype: str | None = None):
        self.path, self.dtype = Path(path), dtype
        if not self.path.exists():
            raise FileNotFoundError(f"candidate dump {self.path} does not exist")
        self.arrays: dict[str, np.ndarray] = {}
        self.notes: list[str] = []
        self._bf16 = False

    @property
    def name(self) -> str:
        return f"dump[{self.path}]"

    @property
    def capabilities(self) -> Capabilities:
        dtype = self.dtype or ("bfloat16" if self._bf16 else None)
        return Capabilities(dtype=dtype, description=f"tensors read from {self.path}")

    def file_for(self, case: Case) -> Path:
        if self.path.is_file():
            return self.path
        found = [self.path / f"{case.name}{suffix}" for suffix in DUMP_SUFFIXES
                 if (self.path / f"{case.name}{suffix}").is_file()]
        if len(found) != 1:
            raise CaseError(f"candidate directory {self.path}: expected exactly one of "
                            f"{[case.name + s for s in DUMP_SUFFIXES]} for case {case.name!r}, found "
                            f"{[p.name for p in found] or 'none'}")
        return found[0]

    def prepare(self, case: Case) -> None:
        path = self.file_for(case)
        if path.suffix == ".npz":
            self.arrays, self._bf16 = load_npz(path), False
        elif path.suffix in (".h5", ".hdf5"):
            self.arrays, self._bf16 = _read_h5_dump(path)
        else:
            raise CaseError(f"candidate {path}: expected a {' / '.join(DUMP_SUFFIXES)} file")
        unknown = []
        for name in self.arrays:
            if name in GENERATION_DUMP_KEYS:
                continue
            try:
                tap_defs.definition(name)
            except KeyError:
                unknown.append(name)
        self.notes = [f"{path.name}: ignored {len(unknown)} arrays that are not tap names: {unknown[:5]}"] \
            if unknown else []

    def run(self, inputs: Mapping[str, np.ndarray], taps: Sequence[str]) -> dict[str, np.ndarray]:
        return {name: self.arrays[name] for name in taps if name in self.arrays}

    def generate(self, inputs: Mapping[str, np.ndarray], max_length: int,
                 stop_token_ids: Sequence[int] | None) -> dict[str, np.ndarray] | None:
        """``gen/token_ids``, ``gen/padding_mask`` and ``gen/step_logits`` of the dump; None without gen/token_ids."""
        if GEN_TOKEN_IDS not in self.arrays:
            return None
        names = {GEN_TOKEN_IDS: "token_ids", GEN_PADDING_MASK: "padding_mask", GEN_STEP_LOGITS: "step_logits"}
        return {key: self.arrays[name] for name, key in names.items() if name in self.arrays}


# ---- keras-hub -------------------------------------------------------------------------------------------------
class RecordedKerasBackend:
    """keras-hub's outputs as recorded in the case (``keras_taps.npz``): checks them without running keras."""

    name = "keras-recorded"

    def __init__(self):
        self.arrays: dict[str, np.ndarray] = {}
        self._generation: dict[str, np.ndarray] = {}
        self._dtype = "float32"

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(dtype=self._dtype, description="keras-hub outputs stored in the golden case")

    def prepare(self, case: Case) -> None:
        self.arrays = case.keras_taps()
        if not self.arrays:
            raise CaseError(f"case {case.name!r} has no recorded keras-hub outputs (case.json keras.file)")
        self._generation = case.keras_generation()
        self._dtype = candidate_format(case.keras_dtype)

    def run(self, inputs: Mapping[str, np.ndarray], taps: Sequence[str]) -> dict[str, np.ndarray]:
        return {name: self.arrays[name] for name in taps if name in self.arrays}

    def generate(self, inputs: Mapping[str, np.ndarray], max_length: int,
                 stop_token_ids: Sequence[int] | None) -> dict[str, np.ndarray] | None:
        """keras-hub's recorded generation of the case (``generation_keras.npz``), None if the case has none."""
        return dict(self._generation) or None


class KerasHubBackend:
    """keras-hub's own ``PaliGemmaBackbone`` on the case's preset, taps read by calling its sublayers eagerly.

    Args:
      dtype: keras dtype policy; None uses the dtype the case was recorded under (case.json ``keras.dtype``).
      keras_backend: KERAS_BACKEND to use when keras is not imported yet (default jax).
    """

    def __init__(self, dtype: str | None = None, keras_backend: str = "jax"):
        try:
            from tools import keras_oracle
        except ImportError as error:
            raise BackendUnavailable(f"tools.keras_oracle cannot be imported ({error}); run from a checkout of "
                                     "the repository") from None
        if not keras_oracle.keras_hub_available():
            raise BackendUnavailable("keras-hub is not installed; install it as tools/dev-setup.sh does "
                                     "(pip install keras 'jax[cpu]' ... then pip install --no-deps keras-hub)")
        os.environ.setdefault("KERAS_BACKEND", keras_backend)
        self._oracle, self.dtype, self.backbone = keras_oracle, dtype, None
        self._dtype_used = dtype or "float32"

    @property
    def name(self) -> str:
        return f"keras-hub[{os.environ.get('KERAS_BACKEND', 'jax')}, {self._dtype_used}]"

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(dtype=candidate_format(self._dtype_used), teacher_forced=True,
                            description="keras-hub PaliGemmaBackbone, eager")

    def prepare(self, case: Case) -> None:
        _, keras_hub = self._oracle.import_keras()
        self._dtype_used = self.dtype or case.keras_dtype
        if case.preset.is_file():  # legacy model.h5 beside config.json
            self.backbone, _, _ = self._oracle.reload_backbone(case.preset.parent, "legacy_h5")
        else:
            self.backbone = keras_hub.models.PaliGemmaBackbone.from_preset(str(case.preset), dtype=self._dtype_used)
        self._dtype_used = self.backbone.dtype_policy.name

    def run(self, inputs: Mapping[str, np.ndarray], taps: Sequence[str]) -> dict[str, np.ndarray]:
        recorded = self._oracle.record_keras_taps(self.backbone, inputs)
        return {name: recorded[name] for name in taps if name in recorded}

    def generate(self, inputs: Mapping[str, np.ndarray], max_length: int,
                 stop_token_ids: Sequence[int] | None) -> dict[str, np.ndarray]:
        """keras-hub's ``PaliGemmaCausalLM(backbone, preprocessor=None).generate``, greedy, compiled as keras does;
        step logits recorded inside its loop (JAX backend; other backends return ids and mask only)."""
        return self._oracle.keras_generate(self.backbone, inputs, stop_token_ids)

    def run_block(self, kind: str, index: int, block_input: np.ndarray,
                  inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One block on ``block_input``, through keras_oracle's per-block recorders (its private helpers)."""
        keras, _ = self._oracle.import_keras()
        record, checks = self._oracle._Taps(keras), {}
        x = keras.ops.convert_to_tensor(block_input, dtype=self.backbone.compute_dtype)
        if kind == "vit":
            block = self.backbone.vit_encoder.get_layer("image_encoder").resblocks[index]
            self._oracle._record_vit_block(keras, block, x, record, checks=checks, j=index)
        else:
            tensors = self._oracle.model_inputs(self.backbone, inputs)
            self._oracle._record_decoder_block(keras, self.backbone.transformer_layers[index], index, x,
                                               tensors["padding_mask"], tensors["response_mask"], record, checks)
        return {k: v for k, v in record.arrays.items() if k.startswith(block_prefix(kind, index))}


# ---- registry --------------------------------------------------------------------------------------------------
BACKENDS: dict[str, Callable[..., Any]] = {
    "refimpl": lambda **kw: RefimplBackend(kernels="auto", **kw),
    "refimpl-numpy": lambda **kw: RefimplBackend(kernels="numpy", **kw),
    "refimpl-numba": lambda **kw: RefimplBackend(kernels="numba", **kw),
    "refimpl-float64": lambda **kw: RefimplBackend(kernels="numpy", dtype="float64", **kw),
    "refimpl-bfloat16": lambda **kw: RefimplBackend(kernels="numpy", dtype="bfloat16", **kw),
    "keras-hub": lambda **kw: KerasHubBackend(**kw),
    "keras-recorded": lambda **kw: RecordedKerasBackend(**kw),
    "dump": lambda path, **kw: DumpBackend(path, **kw),
    # HF transformers (torch): imported only when chosen, so the registry needs neither package.
    "transformers": lambda **kw: make_backend("conformance.hf_backend:TransformersBackend", **kw),
}
BACKENDS["keras"] = BACKENDS["keras-hub"]
BACKENDS["hf"] = BACKENDS["transformers"]


def register_backend(name: str, factory: Callable[..., Any]) -> None:
    """Add a backend factory under ``name`` (it then works with ``--backend name``)."""
    BACKENDS[name] = factory


def make_backend(name: str, **kwargs) -> Any:
    """A backend from the registry, or from ``package.module:factory`` (called with ``kwargs``).

    Raises:
      ValueError: unknown name. BackendUnavailable: the backend cannot run here (the message says why).
    """
    if name in BACKENDS:
        return BACKENDS[name](**kwargs)
    if ":" in name:
        module_name, _, attribute = name.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"backend {name!r}: cannot import {attribute!r} from {module_name!r} ({error})") from None
        return factory(**kwargs)
    raise ValueError(f"backend {name!r} is unknown; expected one of {sorted(BACKENDS)} or module:factory")
