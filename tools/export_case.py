"""Export golden cases in the layouts external ports load: Hugging Face safetensors and big_vision ``.npz``.

    python -m tools.export_case --out /tmp/exports                    # every case of golden/
    python -m tools.export_case --out /tmp/exports --case pg1_basic --formats hf

For each case, ``<out>/<case>/`` gets:

    export.json              what was written and from which case: sha256 and size of every file, conventions, notes
    inputs.npz               the case's inputs as the golden store has them (images, token_ids, padding_mask,
                             response_mask), for ports that take keras-style inputs
    keras/                   a copy of the case's Keras preset (config.json, weights), the source of everything here
    hf/config.json           transformers' PaliGemmaConfig for PaliGemmaForConditionalGeneration
    hf/model.safetensors     float32 weights under the Hub's PaliGemma tensor names (lm_head tied, so absent)
    hf/inputs.safetensors    input_ids int64, pixel_values f32 NCHW, attention_mask int64, token_type_ids int64
    hf/inputs.npz            the same four arrays
    big_vision/params.npz    float32 params under big_vision names (spec section 14), per-layer arrays stacked with
                             the layer index as the leading axis
    big_vision/inputs.npz    image f32[B, S, S, 3] in [-1, 1], text int32[B, T], mask_ar int32[B, T] (1 = causal
                             response token), input_mask bool[B, T], as big_vision's PaliGemma model takes them

The weights come from ``refimpl.weights.load_params`` (the one reader of Keras layouts) in float32; the HF names and
re-layouts from ``conformance.hf_backend`` (shared with the transformers backend), so an export loads into
transformers exactly as the backend's in-memory model does. safetensors is written by hand (no dependency): an
8-byte little-endian header length, a JSON header of {name: {dtype, shape, data_offsets}}, then the raw
little-endian bytes. Nothing is ever written inside the golden directory.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from conformance.cases import Case, CaseError, list_cases, load_case
from conformance.hf_backend import (HFConversionError, head_split_check_fails, hf_config_dict, hf_inputs,
                                    hf_state_dict, model_space_images, window_divergence)
from refimpl.config import PaliGemmaConfig
from refimpl.dtypes import Policy
from refimpl.params import PaliGemmaParams
from refimpl.weights import load_params

DEFAULT_GOLDEN = Path(__file__).resolve().parent.parent / "golden"
FORMATS = ("hf", "big_vision")
EXPORT_SCHEMA_VERSION = 1


class ExportError(ValueError):
    """An export that cannot be written (bad output directory, unrepresentable case, unsupported tensor)."""


# ---- safetensors -----------------------------------------------------------------------------------------------
# (numpy kind, item size) -> safetensors dtype; byte order does not matter, data is always written little-endian.
SAFETENSORS_DTYPES = {("f", 8): "F64", ("f", 4): "F32", ("f", 2): "F16", ("i", 8): "I64", ("i", 4): "I32",
                      ("i", 2): "I16", ("i", 1): "I8", ("u", 1): "U8", ("b", 1): "BOOL"}
HEADER_ALIGNMENT = 8  # the header is space-padded so the data starts 8-byte aligned, as the reference writer does


def safetensors_header(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> bytes:
    """The JSON header (space-padded to a multiple of 8 bytes) for ``tensors`` written in sorted-name order."""
    header: dict[str, Any] = {}
    if metadata:
        bad = [k for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))]
        if bad:
            raise ExportError(f"safetensors metadata: keys and values must be strings; offending keys {bad}")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name in sorted(tensors):
        array = tensors[name]
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise ExportError(f"safetensors tensor name {name!r}: expected a non-empty string other than __metadata__")
        dtype = SAFETENSORS_DTYPES.get((array.dtype.kind, array.dtype.itemsize))
        if dtype is None:
            raise ExportError(f"safetensors tensor {name!r}: dtype {array.dtype} is not one of "
                              f"{sorted(SAFETENSORS_DTYPES.values())}")
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return text + b" " * (-len(text) % HEADER_ALIGNMENT)


def write_safetensors(path: str | Path, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> int:
    """Write ``tensors`` to a ``.safetensors`` file; returns the number of bytes written.

    Args:
      path: the file to write (its directory must exist).
      tensors: name -> array of a dtype in SAFETENSORS_DTYPES; written C-ordered, little-endian, in name order.
      metadata: optional string -> string map (HF writes {"format": "pt"}).
    """
    arrays = {name: np.asarray(array) for name, array in tensors.items()}
    header = safetensors_header(arrays, metadata)
    with open(path, "wb") as stream:
        stream.write(len(header).to_bytes(8, "little"))
        stream.write(header)
        for name in sorted(arrays):
            array = arrays[name]
            little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
            stream.write(little.tobytes())
    return 8 + len(header) + sum(a.nbytes for a in arrays.values())


# ---- big_vision ------------------------------------------------------------------------------------------------
_ATTN = "img/Transformer/encoderblock/MultiHeadDotProductAttention_0/"
_MLP = "img/Transformer/encoderblock/MlpBlock_0/"


def big_vision_params(params: PaliGemmaParams, config: PaliGemmaConfig) -> dict[str, np.ndarray]:
    """big_vision's flat PaliGemma parameter names (spec section 14) -> arrays, layer index leading per layer.

    The text attention follows big_vision's Gemma: ``q_einsum`` f[L, N, D, H] and ``kv_einsum`` f[L, 2, K, D, H],
    or one ``qkv_einsum`` f[L, 3, N, D, H] when N == K (multi-head attention).
    """
    out = _big_vision_img(params, config)
    out.update(_big_vision_llm(params, config))
    return {name: np.ascontiguousarray(array) for name, array in out.items()}


def _stack(blocks, attribute: str, reshape=lambda a: a) -> np.ndarray:
    return np.stack([reshape(getattr(block, attribute)) for block in blocks])


def _big_vision_img(params: PaliGemmaParams, c: PaliGemmaConfig) -> dict[str, np.ndarray]:
    vit, blocks, heads, hv = params.vit, params.vit.blocks, c.vit_num_heads, c.vit_head_dim
    p, dv = c.vit_patch_size, c.vit_hidden_dim
    out = {"img/embedding/kernel": vit.patch_kernel.reshape(p, p, 3, dv),  # HWIO, as keras stores it
           "img/embedding/bias": vit.patch_bias,
           "img/pos_embedding": vit.position_embedding[None],  # f[1, N_img, Dv]
           "img/Transformer/encoder_norm/scale": vit.encoder_ln_gamma,
           "img/Transformer/encoder_norm/bias": vit.encoder_ln_beta,
           "img/head/kernel": vit.proj_kernel, "img/head/bias": vit.proj_bias}
    for ours, theirs in (("q", "query"), ("k", "key"), ("v", "value")):  # heads are contiguous feature slices
        out[_ATTN + f"{theirs}/kernel"] = _stack(blocks, f"w{ours}", lambda w: w.reshape(dv, heads, hv))
        out[_ATTN + f"{theirs}/bias"] = _stack(blocks, f"b{ours}", lambda b: b.reshape(heads, hv))
    out[_ATTN + "out/kernel"] = _stack(blocks, "wo", lambda w: w.reshape(heads, hv, dv))
    out[_ATTN + "out/bias"] = _stack(blocks, "bo")
    for n, ours in ((0, "ln1"), (1, "ln2")):
        out[f"img/Transformer/encoderblock/LayerNorm_{n}/scale"] = _stack(blocks, f"{ours}_gamma")
        out[f"img/Transformer/encoderblock/LayerNorm_{n}/bias"] = _stack(blocks, f"{ours}_beta")
    for n, ours in ((0, "mlp1"), (1, "mlp2")):
        out[_MLP + f"Dense_{n}/kernel"] = _stack(blocks, f"{ours}_kernel")
        out[_MLP + f"Dense_{n}/bias"] = _stack(blocks, f"{ours}_bias")
    return out


def _big_vision_llm(params: PaliGemmaParams, c: PaliGemmaConfig) -> dict[str, np.ndarray]:
    blocks, d, h = params.blocks, c.hidden_dim, c.head_dim

    def heads_in(count):  # f[D, count*H] -> f[count, D, H], keras' query/key/value kernel layout
        return lambda w: w.reshape(d, count, h).transpose(1, 0, 2)

    q = _stack(blocks, "wq", heads_in(c.num_query_heads))
    k = _stack(blocks, "wk", heads_in(c.num_key_value_heads))
    v = _stack(blocks, "wv", heads_in(c.num_key_value_heads))
    out = {"llm/embedder/input_embedding": params.token_embedding, "llm/final_norm/scale": params.final_norm,
           "llm/layers/attn/attn_vec_einsum/w": _stack(blocks, "wo", lambda w: w.reshape(c.num_query_heads, h, d)),
           "llm/layers/mlp/gating_einsum": np.stack([_stack(blocks, "w_gate"), _stack(blocks, "w_up")], axis=1),
           "llm/layers/mlp/linear": _stack(blocks, "w_down"),
           "llm/layers/pre_attention_norm/scale": _stack(blocks, "pre_attention_norm"),
           "llm/layers/pre_ffw_norm/scale": _stack(blocks, "pre_ffw_norm")}
    if c.num_query_heads == c.num_key_value_heads:
        out["llm/layers/attn/qkv_einsum/w"] = np.stack([q, k, v], axis=1)
    else:
        out["llm/layers/attn/q_einsum/w"] = q
        out["llm/layers/attn/kv_einsum/w"] = np.stack([k, v], axis=1)
    if c.use_post_attention_norm:
        out["llm/layers/post_attention_norm/scale"] = _stack(blocks, "post_attention_norm")
    if c.use_post_ffw_norm:
        out["llm/layers/post_ffw_norm/scale"] = _stack(blocks, "post_ffw_norm")
    return out


def big_vision_inputs(inputs: Mapping[str, np.ndarray], config: PaliGemmaConfig) -> dict[str, np.ndarray]:
    """big_vision's PaliGemma inputs: its ``make_attn_mask(input_mask, mask_ar)`` with mask_ar = response_mask
    gives keras' prefix-LM mask on every valid query row (prefix tokens share cumsum 0, responses are causal)."""
    return {"image": model_space_images(inputs["images"], config),
            "text": np.asarray(inputs["token_ids"], dtype=np.int32),
            "mask_ar": np.asarray(inputs["response_mask"], dtype=np.int32),
            "input_mask": np.asarray(inputs["padding_mask"], dtype=bool)}


# ---- one case --------------------------------------------------------------------------------------------------
def check_output_dir(out_dir: Path, golden_dir: Path) -> None:
    """Refuse an output directory that is, or is inside, the golden directory."""
    out, golden = out_dir.resolve(), golden_dir.resolve()
    if out == golden or golden in out.parents:
        raise ExportError(f"output directory {out_dir} is inside the golden directory {golden_dir}; exports are "
                          "never written into golden/ (choose a directory outside it)")


def _preset_dir(case: Case) -> Path:
    return case.preset if case.preset.is_dir() else case.preset.parent  # legacy: model.h5 beside config.json


def _write_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    bad = [k for k, v in arrays.items() if np.asarray(v).dtype == object]
    if bad:
        raise ExportError(f"{path}: object arrays cannot be written without pickle: {bad}")
    with open(path, "wb") as stream:  # a file object: np.savez would append ".npz" to a str path without it
        np.savez(stream, **{k: np.asarray(v) for k, v in arrays.items()})


def _export_hf(case: Case, params: PaliGemmaParams, target: Path) -> list[str]:
    config, notes = case.parsed_config, []
    try:
        document, tensors = hf_config_dict(config), hf_state_dict(params, config)
    except HFConversionError as error:
        raise ExportError(f"case {case.name!r}: no HF export: {error}") from None
    target.mkdir(parents=True)
    (target / "config.json").write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    write_safetensors(target / "model.safetensors", tensors, {"format": "pt"})
    inputs = hf_inputs(case.inputs, config)
    write_safetensors(target / "inputs.safetensors", inputs, {"format": "pt"})
    _write_npz(target / "inputs.npz", inputs)
    if head_split_check_fails(config):
        notes.append(f"hf: hidden_size {config.hidden_dim} is not a multiple of num_attention_heads "
                     f"{config.num_query_heads}; transformers 5's config check rejects this config.json although "
                     "the model only uses head_dim (conformance.hf_backend.make_hf_config shows the workaround)")
    reason = window_divergence(case.inputs, config)
    if reason:
        notes.append(f"hf: {reason}; HF's decoder taps will not match the golden taps from layer 0 on")
    return notes


def _export_big_vision(case: Case, params: PaliGemmaParams, target: Path) -> list[str]:
    target.mkdir(parents=True)
    _write_npz(target / "params.npz", big_vision_params(params, case.parsed_config))
    _write_npz(target / "inputs.npz", big_vision_inputs(case.inputs, case.parsed_config))
    return []


EXPORTERS = {"hf": _export_hf, "big_vision": _export_big_vision}


def export_case(case: Case, out_dir: str | Path, *, formats: Sequence[str] = FORMATS,
                overwrite: bool = False) -> dict[str, Any]:
    """Write ``<out_dir>/<case.name>/`` (layout in the module docstring) and return its export.json record.

    Raises:
      ExportError: unknown format, an existing case directory without ``overwrite``, or a case HF cannot represent.
    """
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ExportError(f"formats {list(formats)}: expected a non-empty subset of {FORMATS}")
    target = Path(out_dir) / case.name
    golden_root = case.directory.parents[len(Path(case.name).parts) - 1]  # case names may hold slashes
    check_output_dir(target, golden_root)
    if target.exists():
        if not overwrite:
            raise ExportError(f"{target} already exists; pass overwrite=True (--overwrite) to replace it")
        shutil.rmtree(target)
    params = load_params(case.preset, case.parsed_config, Policy("float32"))
    target.mkdir(parents=True)
    shutil.copytree(_preset_dir(case), target / "keras")
    _write_npz(target / "inputs.npz", case.inputs)
    notes = []
    for fmt in formats:
        notes += EXPORTERS[fmt](case, params, target / fmt)
    record = _record(case, target, list(formats), notes)
    (target / "export.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record


def _record(case: Case, target: Path, formats: list[str], notes: list[str]) -> dict[str, Any]:
    files = {}
    for path in sorted(p for p in target.rglob("*") if p.is_file()):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        files[path.relative_to(target).as_posix()] = {"sha256": digest, "bytes": path.stat().st_size}
    return {"export_schema_version": EXPORT_SCHEMA_VERSION, "case": case.name, "description": case.description,
            "keras_config": case.config, "keras_dtype": case.keras_dtype, "formats": formats,
            "weights_dtype": "float32", "image_tokens": case.image_tokens, "conventions": CONVENTIONS,
            "notes": notes, "files": files}


CONVENTIONS = {
    "inputs.npz": "keras-style inputs of the golden case, unchanged",
    "hf": "input_ids = [<image> = vocabulary_size] * image_tokens + token_ids; attention_mask = [1] * image_tokens "
          "+ padding_mask; token_type_ids = [0] * image_tokens + response_mask; pixel_values NCHW in [-1, 1]; "
          "vocabulary + 1 (zero <image> row); compare llm/final_norm with last_hidden_state of the language model "
          "(or the last entry of output_hidden_states, which is post-norm); "
          "logits [:, image_tokens:, :vocabulary_size]",
    "big_vision": "spec section 14 names; per-layer arrays stacked on axis 0; q/kv_einsum, or qkv_einsum when "
                  "num_query_heads == num_key_value_heads; inputs: image in [-1, 1], mask_ar = response_mask",
}


# ---- command line ----------------------------------------------------------------------------------------------
def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.export_case", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory (never inside golden/)")
    parser.add_argument("--golden", type=Path, default=DEFAULT_GOLDEN, help=f"golden directory ({DEFAULT_GOLDEN})")
    parser.add_argument("--case", action="extend", nargs="+", metavar="NAME", help="export only these cases")
    parser.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated subset of {FORMATS}")
    parser.add_argument("--overwrite", action="store_true", help="replace existing <out>/<case> directories")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Export the selected cases; returns 0, or 2 on a usage, case or export error."""
    args = _parse_args(argv)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    try:
        check_output_dir(args.out, args.golden)
        names = args.case or list_cases(args.golden)
        if not names:
            raise ExportError(f"no golden cases in {args.golden}")
        for name in names:
            record = export_case(load_case(args.golden, name), args.out, formats=formats, overwrite=args.overwrite)
            size = sum(f["bytes"] for f in record["files"].values())
            print(f"{name}: {len(record['files'])} files, {size} bytes -> {args.out / name}")
            for note in record["notes"]:
                print(f"  note: {note}")
    except (ExportError, CaseError, ValueError, OSError) as error:
        print(f"export_case: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
