"""Backend-generic properties of a PaliGemma backbone, checked with hypothesis on tiny random presets.

    python -m conformance.properties --backend refimpl-numba                 # a registered backend
    python -m conformance.properties --backend my_port.conformance:MyBackend --max-examples 200
    python -m conformance.properties --list

A backend is the conformance protocol of ``conformance.backend`` (``prepare(case)``, ``run(inputs, taps)``). Each
example draws a tiny config and seed (``conformance.strategies``), writes a real keras preset with
``tools/write_preset.py`` (keras' ``.weights.h5`` object-path layout, float32), prepares the backend on it and runs
drawn inputs. Properties compare the backend with itself (padding, masking, window, GQA), with the mask rule of
spec section 4.3 written independently below (``reference_mask``, ``influence``), or with refimpl in float64:

    mask_rule              the ``llm/mask`` tap equals the prefix-LM rule for arbitrary masks (needs the tap)
    padding_invariance     appending padding changes no valid output; a row alone equals the row in a padded batch
    prefix_bidirectional   changing the last prompt token changes every image and earlier prompt output
    response_causal        changing a response token changes no output before it (nor any other row)
    padding_hidden         changing a padding token changes no valid output
    window_fits            a sliding window at least as long as the sequence changes nothing
    window_band            with a window shorter than the sequence, a token influences exactly the positions the
                           banded mask reaches, layer by layer (one layer: exactly the keys inside the band)
    gqa_equals_mha         grouped kv heads equal a multi-head model whose kv heads are repeated per group
    final_soft_cap         |logits| <= final_logit_soft_cap (needs the ``llm/logits`` tap)
    matches_reference      the output equals refimpl float64 within the tolerance table's bound for the example

Bounds come from the tolerance table (``conformance.tolerances``) exactly as for a golden case: on each example
refimpl measures its own float32 (or bf16-emulation) error against float64 (the envelope), and a backend of that
format may be ``8 x envelope + 4 ulp`` (bf16: ``4 x envelope + 1 ulp``) off refimpl float64 (``matches_reference``).
Two outputs of the backend count as "unchanged" within twice that bound, "changed" beyond it. Only valid positions
are compared (image tokens and non-padding text), as the harness does. ``--rel-tol`` replaces the bound.

A backend that cannot represent a drawn model says so as the harness protocol does, with ``CaseError`` from
``prepare``: hypothesis then draws another (the count is reported as "drawn models the backend cannot
represent"), and a property none of whose models it can represent is skipped with the backend's reasons.

From a port's own pytest run (profiles: ``HYPOTHESIS_PROFILE``, see tests/conftest.py):

    import pytest
    from conformance.properties import PROPERTY_NAMES, check_property

    @pytest.mark.parametrize("name", PROPERTY_NAMES)
    def test_property(name, conformance_backend):
        check_property(name, conformance_backend)   # AssertionError on a counterexample, pytest.skip if not testable
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from hypothesis import HealthCheck, Phase, given, reject, settings
from hypothesis.errors import Unsatisfiable
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from conformance.backend import BackendUnavailable, capabilities_of, make_backend
from conformance import strategies as strat
from conformance.cases import Case, CaseError, Envelope
from conformance.tolerances import Tolerance, candidate_format, resolve
from refimpl.config import PaliGemmaConfig
from refimpl.params import PaliGemmaParams

OUTPUT = "llm/final_norm"


class PropertySkipped(Exception):
    """The backend cannot be checked for this property (it does not return a needed tap, or it can represent
    none of the drawn configs)."""


class UnsupportedConfig(Exception):
    """The backend refused to prepare a drawn model (``CaseError`` from ``prepare``: a config it cannot represent,
    such as a Gemma 2 option without Gemma 2's post-norms for Hugging Face). The example is not counted."""


class PropertyFailure(AssertionError):
    """A counterexample: the message names the config, the inputs' layout and the offending positions."""


# ---- independent formulations of the rules ---------------------------------------------------------------------
def reference_mask(padding_mask: np.ndarray, response_mask: np.ndarray | None, num_image_tokens: int) -> np.ndarray:
    """bool[B, L, L] (query, key): keras-hub's prefix-LM rule, element by element as spec section 4.3 words it.

    Key s is visible to query t if s is an image token, or a present non-response token (the prefix: seen by
    every query, both ways), or a response token at or before t (causal). A padding key is seen by nobody (unless
    it is also flagged as a response, which keras-hub then treats as a response).
    """
    padding = np.asarray(padding_mask, bool)
    response = np.zeros_like(padding) if response_mask is None else np.asarray(response_mask, bool)
    batch, text_len = padding.shape
    length = num_image_tokens + text_len
    out = np.zeros((batch, length, length), bool)
    for b in range(batch):
        for t in range(length):
            for s in range(length):
                if s < num_image_tokens:
                    out[b, t, s] = True
                elif response[b, s - num_image_tokens]:
                    out[b, t, s] = s <= t
                else:
                    out[b, t, s] = bool(padding[b, s - num_image_tokens])
    return out


def layer_masks(config: PaliGemmaConfig, padding_mask: np.ndarray, response_mask: np.ndarray) -> list[np.ndarray]:
    """The mask of every decoder layer: ``reference_mask``, AND |t - s| <= W - 1 on even layers with a window."""
    mask = reference_mask(padding_mask, response_mask, config.image_sequence_length)
    length = mask.shape[-1]
    t, s = np.meshgrid(np.arange(length), np.arange(length), indexing="ij")
    band = np.abs(t - s) <= config.sliding_window_size - 1
    windowed = config.use_sliding_window_attention
    return [mask & band if windowed and i % 2 == 0 else mask for i in range(config.num_layers)]


def influence(config: PaliGemmaConfig, padding_mask: np.ndarray, response_mask: np.ndarray, row: int,
              position: int) -> np.ndarray:
    """bool[L]: the positions of ``row`` whose output can depend on the input token at ``position``.

    Layer by layer: a position depends on the token if it did already (the residual stream) or if it attends to a
    position that does. The token's own position always depends on it.
    """
    reached = np.zeros(config.image_sequence_length + padding_mask.shape[1], bool)
    reached[position] = True
    for mask in layer_masks(config, padding_mask, response_mask):
        reached = reached | (mask[row] & reached[None, :]).any(axis=1)
    return reached


def valid_positions(config: PaliGemmaConfig, padding_mask: np.ndarray) -> np.ndarray:
    """bool[B, L]: image tokens and non-padding text tokens, the positions conformance compares."""
    image = np.ones((padding_mask.shape[0], config.image_sequence_length), bool)
    return np.concatenate([image, np.asarray(padding_mask, bool)], axis=1)


# ---- models: tiny presets written for the backend ----------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """A preset to write: ``config`` with the perturbed random weights drawn for ``weights_config`` (default the
    same) from ``seed``; ``variant`` "mha" repeats each kv head once per query head of its group."""

    config: PaliGemmaConfig
    seed: int
    variant: str = "plain"
    weights_config: PaliGemmaConfig | None = None

    @property
    def key(self) -> str:
        document = [self.config.to_keras_config(), self.seed, self.variant,
                    (self.weights_config or self.config).to_keras_config()]
        return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()[:16]

    def params(self) -> PaliGemmaParams:
        from refimpl.init import random_params

        base = self.weights_config or self.config
        params = random_params(base, seed=self.seed, dtype=np.float32, perturb=True)
        if self.variant == "mha":
            params = repeat_kv_heads(params, base)
        elif self.variant != "plain":
            raise ValueError(f"variant {self.variant!r}: expected 'plain' or 'mha'")
        return params


def repeat_kv_heads(params: PaliGemmaParams, config: PaliGemmaConfig) -> PaliGemmaParams:
    """The same model with one kv head per query head: kv head k is copied to query heads k*G ... k*G + G-1."""
    d, k, h, g = config.hidden_dim, config.num_key_value_heads, config.head_dim, config.query_groups

    def widen(w):  # f[D, K*H] -> f[D, N*H], column n*H + j = old column (n // G)*H + j
        return np.repeat(w.reshape(d, k, h), g, axis=1).reshape(d, k * g * h)

    blocks = tuple(dataclasses.replace(b, wk=widen(b.wk), wv=widen(b.wv)) for b in params.blocks)
    return dataclasses.replace(params, blocks=blocks)


def _write_preset(directory: Path, config: PaliGemmaConfig, params: PaliGemmaParams) -> None:
    try:
        from tools.write_preset import write_preset
    except ImportError as error:
        raise BackendUnavailable(f"tools.write_preset cannot be imported ({error}); run the properties from a "
                                 "checkout of the paligemma-ref repository") from None
    write_preset(directory, config, params)


class PropertyRunner:
    """Writes presets for model specs, prepares the backend on them, runs inputs and compares outputs.

    Args:
      backend: a conformance backend. Only ``prepare`` and ``run`` are used.
      workdir: where presets go (default: a temporary directory removed by ``close``).
      rel_tol: replace the table's bound by rel_tol * max |reference output| (see ``reference``).
    """

    def __init__(self, backend: Any, *, workdir: str | Path | None = None, rel_tol: float | None = None):
        self.backend = backend
        self._own_dir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="paligemma-properties-") if workdir is None else workdir)
        self.rel_tol = rel_tol
        self._cases: dict[str, Case] = {}
        self._prepared: str | None = None
        self._format: str | None = None  # the tolerance row: from the backend's capabilities or first output
        self._references: tuple[str | None, dict] = (None, {})  # refimpl models of the last spec asked for
        self.runs = 0
        self.unsupported: dict[str, int] = {}  # why the backend refused drawn models -> how often

    def close(self) -> None:
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "PropertyRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def case(self, spec: ModelSpec) -> Case:
        """A case (no golden taps) whose preset holds ``spec``'s weights; written once per spec."""
        if spec.key not in self._cases:
            directory = self.workdir / spec.key
            if not (directory / "preset" / "config.json").is_file():
                _write_preset(directory / "preset", spec.config, spec.params())
            self._cases[spec.key] = Case(
                name=f"property-{spec.key}", directory=directory, description="conformance.properties model",
                config=spec.config.to_keras_config(), preset=directory / "preset", weights_variant="plain",
                taps=(OUTPUT,), float32_envelope={}, bfloat16_envelope={}, keras={"dtype": "float32"},
                tolerance_overrides={}, provenance={"producer": "tools/write_preset.py", "seed": spec.seed},
                inputs={}, golden={})
        return self._cases[spec.key]

    def run(self, spec: ModelSpec, inputs: Mapping[str, np.ndarray], taps: Sequence[str] = ()) -> dict:
        """The backend's taps (``OUTPUT`` always) on ``inputs``, as float64 arrays (masks stay bool)."""
        case = self.case(spec)
        if self._prepared != spec.key:
            try:
                self.backend.prepare(case)
            except CaseError as error:
                self._prepared = None  # the backend may be half-prepared: prepare again before the next run
                reason = str(error).replace(f"case {case.name!r}: ", "")
                self.unsupported[reason] = self.unsupported.get(reason, 0) + 1
                raise UnsupportedConfig(reason) from None
            self._prepared = spec.key
        wanted = list(dict.fromkeys([*taps, OUTPUT]))
        out = self.backend.run({k: np.array(v, copy=True) for k, v in inputs.items()}, wanted)
        self.runs += 1
        if OUTPUT not in out:
            raise PropertyFailure(f"backend {self.name} returned no {OUTPUT!r} (it returned {sorted(out)})")
        expected = (inputs["token_ids"].shape[0], spec.config.image_sequence_length + inputs["token_ids"].shape[1],
                    spec.config.hidden_dim)
        if np.shape(out[OUTPUT]) != expected:
            raise PropertyFailure(f"backend {self.name}: {OUTPUT} has shape {np.shape(out[OUTPUT])}, expected "
                                  f"{expected} (batch, image tokens + text tokens, hidden_dim)")
        self._format = self._format or self._detect_format(out[OUTPUT])
        return {k: (np.asarray(v) if np.asarray(v).dtype == bool else np.asarray(v, np.float64))
                for k, v in out.items()}

    @property
    def format(self) -> str:
        """The tolerance row ("float32", "bfloat16", ...) of the backend's outputs."""
        return self._format or "float32"

    def _detect_format(self, array) -> str:
        declared = capabilities_of(self.backend).dtype
        try:
            return candidate_format(declared or np.asarray(array).dtype)
        except ValueError:
            return "float32"

    @property
    def name(self) -> str:
        return str(getattr(self.backend, "name", type(self.backend).__name__))

    def reference(self, spec: ModelSpec, inputs: Mapping[str, np.ndarray]) -> tuple[np.ndarray, Tolerance]:
        """refimpl's float64 output f64[B, L, D] for ``spec`` and ``inputs``, and the bound on ``OUTPUT`` a
        candidate of the backend's format gets there: the tolerance table's rule with the envelope measured on
        this very example (refimpl float32, or its bf16 emulation, against float64, over the valid positions),
        as ``tools/make_goldens.py`` measures it for a golden case."""
        models = self._reference_models(spec)
        valid = valid_positions(spec.config, inputs["padding_mask"])
        reference = models["float64"](inputs)
        envelopes = {}
        for fmt in ("float32", "bfloat16"):
            if fmt in models:
                error = np.abs(models[fmt](inputs) - reference)[valid]
                envelopes[fmt] = Envelope(float(error.max()) if error.size else 0.0, 0.0, 0.0)
        scale = float(np.abs(reference[valid]).max()) if valid.any() else 0.0
        tol = resolve(OUTPUT, self.format, scale, envelopes)
        if self.rel_tol is not None:
            tol = Tolerance(self.rel_tol * scale, 0.0, False, f"rel_tol {self.rel_tol} x max|ref|")
        return reference, tol

    def _reference_models(self, spec: ModelSpec) -> dict:
        from refimpl.model import PaliGemmaBackbone

        if self._references[0] != spec.key:
            params = spec.params()
            models = {"float32": PaliGemmaBackbone.from_config_object(spec.config, params, dtype="float32"),
                      "float64": PaliGemmaBackbone.from_config_object(spec.config, params.astype(np.float64),
                                                                      dtype="float64")}
            if self.format == "bfloat16":  # the reader rounds the weights for the bf16 policy
                models["bfloat16"] = PaliGemmaBackbone.from_preset(self.case(spec).preset, dtype="bfloat16")
            self._references = (spec.key, models)
        return self._references[1]

    def unchanged_atol(self, spec: ModelSpec, inputs: Mapping[str, np.ndarray]) -> float:
        """Two outputs of one backend count as equal within twice the bound each may be off the reference."""
        return 2 * self.reference(spec, inputs)[1].atol


# ---- comparisons -----------------------------------------------------------------------------------------------
def _describe(spec: ModelSpec, inputs: Mapping[str, np.ndarray]) -> str:
    rows = ["".join("pr."[v] for v in row) or "(no text)" for row in strat.segments(inputs)]
    return (f"config {json.dumps(spec.config.to_keras_config(), sort_keys=True)}, seed {spec.seed}, variant "
            f"{spec.variant}; text rows (p prompt, r response, . padding) {rows}")


def _position_diffs(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # f[B, L, D] x2 -> f[B, L]
    return np.abs(a - b).max(axis=-1) if a.size else np.zeros(a.shape[:2])


def assert_unchanged(atol: float, what: str, before: np.ndarray, after: np.ndarray, keep: np.ndarray,
                     context: str) -> None:
    """|before - after| <= atol at every position where ``keep`` (bool[B, L]) is set."""
    diffs = np.where(keep, _position_diffs(before, after), 0.0)
    if (diffs > atol).any():
        bad = [tuple(int(i) for i in idx) for idx in np.argwhere(diffs > atol)[:8]]
        raise PropertyFailure(f"{what}: outputs changed at (row, position) {bad}, max |diff| {diffs.max():.3g} > "
                              f"{atol:.3g}; {context}")


def assert_changed(atol: float, what: str, before: np.ndarray, after: np.ndarray, where: np.ndarray,
                   context: str) -> None:
    """|before - after| > atol at every position where ``where`` (bool[B, L]) is set."""
    diffs = _position_diffs(before, after)
    stuck = where & (diffs <= atol)
    if stuck.any():
        bad = [tuple(int(i) for i in idx) for idx in np.argwhere(stuck)[:8]]
        raise PropertyFailure(f"{what}: outputs did not change at (row, position) {bad} (|diff| <= {atol:.3g}) "
                              f"although the mask lets the changed token reach them; {context}")


def _change_token(inputs: dict, row: int, text_pos: int, vocabulary_size: int, draw) -> dict:
    changed = {k: np.array(v, copy=True) for k, v in inputs.items()}
    old = int(changed["token_ids"][row, text_pos])
    changed["token_ids"][row, text_pos] = (old + draw(st.integers(1, vocabulary_size - 1))) % vocabulary_size
    return changed


def check_influence(runner: PropertyRunner, spec: ModelSpec, inputs: dict, row: int, text_pos: int,
                    draw, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Change one token; valid outputs change exactly where ``influence`` says (other rows never).

    Returns (the bool[B, L] positions expected to change, valid positions) for further assertions.
    """
    config = spec.config
    position = config.image_sequence_length + text_pos
    before = runner.run(spec, inputs)[OUTPUT]
    after = runner.run(spec, _change_token(inputs, row, text_pos, config.vocabulary_size, draw))[OUTPUT]
    valid = valid_positions(config, inputs["padding_mask"])
    expected = np.zeros_like(valid)
    expected[row] = influence(config, inputs["padding_mask"], inputs["response_mask"], row, position)
    context = f"changed token at row {row}, position {position}; {_describe(spec, inputs)}"
    atol = runner.unchanged_atol(spec, inputs)
    assert_unchanged(atol, f"{what} (positions the token cannot reach)", before, after, valid & ~expected, context)
    assert_changed(atol, f"{what} (positions the token reaches)", before, after, valid & expected, context)
    return expected, valid


# ---- the properties --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Property:
    name: str
    check: Callable[[PropertyRunner, Callable], None]  # (runner, draw)
    needs_taps: tuple[str, ...] = ()
    cost: int = 1  # forward passes per example / 2, to scale the example count
    doc: str = ""


def _spec(draw, **fixed) -> ModelSpec:
    """A drawn model of calibrated widths ("small"), so that per-example float32 envelopes are stable."""
    return ModelSpec(draw(strat.configs("small", **fixed), label="config"), draw(st.integers(0, 2**16), label="seed"))


def prop_mask_rule(runner: PropertyRunner, draw) -> None:
    spec = _spec(draw, num_layers=1)
    inputs = draw(strat.valid_batches(spec.config), label="inputs")
    padding, response = draw(strat.arbitrary_masks(*inputs["token_ids"].shape), label="masks")
    inputs.update(padding_mask=padding, response_mask=response)
    got = runner.run(spec, inputs, ["llm/mask"])["llm/mask"]
    want = reference_mask(padding, response, spec.config.image_sequence_length)
    if np.shape(got) != want.shape or not np.array_equal(np.asarray(got, bool), want):
        bad = np.argwhere(np.asarray(got, bool) != want)[:8].tolist() if np.shape(got) == want.shape else "shape"
        raise PropertyFailure(f"mask_rule: llm/mask differs from the prefix-LM rule at (row, query, key) {bad}; "
                              f"padding {padding.astype(int).tolist()}, response {response.astype(int).tolist()}, "
                              f"{spec.config.image_sequence_length} image tokens")


def prop_padding_invariance(runner: PropertyRunner, draw) -> None:
    spec = _spec(draw)
    inputs = draw(strat.valid_batches(spec.config, text_lengths=(0, 6)), label="inputs")
    base = runner.run(spec, inputs)[OUTPUT]
    valid = valid_positions(spec.config, inputs["padding_mask"])
    context = _describe(spec, inputs)
    # (a) append padding tokens with random ids
    extra = draw(st.integers(1, 4), label="appended padding")
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    batch = inputs["token_ids"].shape[0]
    padded = {"images": inputs["images"],
              "token_ids": np.concatenate([inputs["token_ids"], rng.integers(
                  0, spec.config.vocabulary_size, (batch, extra)).astype(np.int32)], axis=1),
              "padding_mask": np.concatenate([inputs["padding_mask"], np.zeros((batch, extra), bool)], axis=1),
              "response_mask": np.concatenate([inputs["response_mask"], np.zeros((batch, extra), bool)], axis=1)}
    longer = runner.run(spec, padded)[OUTPUT][:, : base.shape[1]]
    atol = runner.unchanged_atol(spec, inputs)
    assert_unchanged(atol, f"padding_invariance ({extra} padding tokens appended)", base, longer, valid, context)
    # (b) each row alone, its trailing padding removed
    for row in range(batch):
        length = int(np.flatnonzero(inputs["padding_mask"][row]).max() + 1) if inputs["padding_mask"][row].any() else 0
        alone = {"images": inputs["images"][row:row + 1], "token_ids": inputs["token_ids"][row:row + 1, :length],
                 "padding_mask": inputs["padding_mask"][row:row + 1, :length],
                 "response_mask": inputs["response_mask"][row:row + 1, :length]}
        out = runner.run(spec, alone)[OUTPUT]
        width = out.shape[1]
        assert_unchanged(atol, f"padding_invariance (row {row} alone vs in the padded batch)", base[row:row + 1,
                         :width], out, valid[row:row + 1, :width], context)


def prop_prefix_bidirectional(runner: PropertyRunner, draw) -> None:
    spec = _spec(draw, use_sliding_window_attention=False)
    inputs = draw(strat.valid_batches(spec.config, text_lengths=(1, 7), min_prompt=1), label="inputs")
    seg = strat.segments(inputs)
    rows = [r for r in range(seg.shape[0]) if (seg[r] == strat.PROMPT).any()]
    row = draw(st.sampled_from(rows), label="row")
    last_prompt = int(np.flatnonzero(seg[row] == strat.PROMPT).max())
    expected, valid = check_influence(runner, spec, inputs, row, last_prompt, draw, "prefix_bidirectional")
    n_img = spec.config.image_sequence_length
    earlier = np.zeros_like(valid)
    earlier[row, : n_img + last_prompt] = True  # every image token and every earlier prompt token
    if (earlier & ~expected).any():
        raise PropertyFailure("prefix_bidirectional: the independent mask rule does not let the last prompt token "
                              f"reach every earlier prefix position; {_describe(spec, inputs)}")


def prop_response_causal(runner: PropertyRunner, draw) -> None:
    spec = _spec(draw)
    inputs = draw(strat.valid_batches(spec.config, text_lengths=(1, 7), min_response=1), label="inputs")
    seg = strat.segments(inputs)
    rows = [r for r in range(seg.shape[0]) if (seg[r] == strat.RESPONSE).any()]
    row = draw(st.sampled_from(rows), label="row")
    text_pos = draw(st.sampled_from(np.flatnonzero(seg[row] == strat.RESPONSE).tolist()), label="response position")
    expected, _ = check_influence(runner, spec, inputs, row, text_pos, draw, "response_causal")
    if expected[row, : spec.config.image_sequence_length + text_pos].any():
        raise PropertyFailure(f"response_causal: the mask rule lets a response reach an earlier position; "
                              f"{_describe(spec, inputs)}")


def prop_padding_hidden(runner: PropertyRunner, draw) -> None:
    spec = _spec(draw)
    inputs = draw(strat.valid_batches(spec.config, text_lengths=(1, 7)), label="inputs")
    seg = strat.segments(inputs)
    pads = np.argwhere(seg == strat.PADDING)
    if not len(pads):  # no padding drawn: pad the last position of row 0
        inputs["padding_mask"][0, -1], inputs["response_mask"][0, -1] = False, False
        pads = np.array([[0, seg.shape[1] - 1]])
    row, text_pos = (int(v) for v in pads[draw(st.integers(0, len(pads) - 1), label="padding token")])
    expected, valid = check_influence(runner, spec, inputs, row, text_pos, draw, "padding_hidden")
    if (expected & valid).any():
        raise PropertyFailure(f"padding_hidden: the mask rule lets a padding key reach a valid position; "
                              f"{_describe(spec, inputs)}")


def prop_window_fits(runner: PropertyRunner, draw) -> None:
    base = _spec(draw, use_sliding_window_attention=False)
    inputs = draw(strat.valid_batches(base.config, text_lengths=(0, 7)), label="inputs")
    length = base.config.image_sequence_length + inputs["token_ids"].shape[1]
    window = draw(st.integers(length, length + 4), label="window")
    windowed = ModelSpec(base.config.replace(use_sliding_window_attention=True, sliding_window_size=window),
                         base.seed, weights_config=base.config)
    plain = runner.run(base, inputs)[OUTPUT]
    banded = runner.run(windowed, inputs)[OUTPUT]
    assert_unchanged(runner.unchanged_atol(base, inputs), f"window_fits (window {window} >= sequence {length})",
                     plain, banded,
                     valid_positions(base.config, inputs["padding_mask"]), _describe(windowed, inputs))


def prop_window_band(runner: PropertyRunner, draw) -> None:
    base = draw(strat.configs("small", use_sliding_window_attention=False), label="config")
    inputs = draw(strat.valid_batches(base, text_lengths=(2, 8)), label="inputs")
    length = base.image_sequence_length + inputs["token_ids"].shape[1]
    config = base.replace(use_sliding_window_attention=True, sliding_window_size=draw(
        st.integers(1, length - 1), label="window"), num_layers=draw(st.sampled_from([1, 1, 2, 3]), label="layers"))
    spec = ModelSpec(config, draw(st.integers(0, 2**16), label="seed"))
    row = draw(st.integers(0, inputs["token_ids"].shape[0] - 1), label="row")
    text_pos = draw(st.integers(0, inputs["token_ids"].shape[1] - 1), label="text position")
    check_influence(runner, spec, inputs, row, text_pos, draw, "window_band")


def prop_gqa_equals_mha(runner: PropertyRunner, draw) -> None:
    kv_heads, group = draw(st.integers(1, 2), label="kv heads"), draw(st.integers(2, 3), label="group")
    base = _spec(draw, num_key_value_heads=kv_heads, num_query_heads=kv_heads * group)
    inputs = draw(strat.valid_batches(base.config), label="inputs")
    mha = ModelSpec(base.config.replace(num_key_value_heads=base.config.num_query_heads), base.seed, "mha",
                    weights_config=base.config)
    assert_unchanged(runner.unchanged_atol(base, inputs), "gqa_equals_mha", runner.run(base, inputs)[OUTPUT],
                     runner.run(mha, inputs)[OUTPUT], valid_positions(base.config, inputs["padding_mask"]),
                     _describe(base, inputs))


def prop_final_soft_cap(runner: PropertyRunner, draw) -> None:
    cap = draw(st.sampled_from([0.25, 0.5, 1.0, 3.0]), label="final soft-cap")
    spec = _spec(draw, final_logit_soft_cap=cap)
    inputs = draw(strat.valid_batches(spec.config, text_lengths=(1, 6)), label="inputs")
    logits = runner.run(spec, inputs, ["llm/logits"])["llm/logits"]
    bound = cap * (1 + 2 * np.finfo(np.float32).eps) if runner.format != "bfloat16" else cap * (1 + 2 ** -7)
    if logits.size and np.abs(logits).max() > bound:
        raise PropertyFailure(f"final_soft_cap: max |logits| = {np.abs(logits).max()!r} exceeds the cap {cap}; "
                              f"{_describe(spec, inputs)}")


def prop_matches_reference(runner: PropertyRunner, draw) -> None:
    spec = _spec(draw)
    inputs = draw(strat.valid_batches(spec.config), label="inputs")
    got = runner.run(spec, inputs)[OUTPUT]
    reference, tol = runner.reference(spec, inputs)
    error = np.where(valid_positions(spec.config, inputs["padding_mask"]), _position_diffs(got, reference), 0.0)
    if error.max() > tol.atol:
        worst = tuple(int(i) for i in np.unravel_index(np.argmax(error), error.shape))
        raise PropertyFailure(f"matches_reference: max |backend - refimpl float64| = {error.max():.3g} at (row, "
                              f"position) {worst} exceeds {tol.atol:.3g} ({tol.source}); {_describe(spec, inputs)}")


PROPERTIES: dict[str, Property] = {p.name: p for p in [
    Property("mask_rule", prop_mask_rule, ("llm/mask",), 1, "llm/mask equals the prefix-LM rule"),
    Property("padding_invariance", prop_padding_invariance, (), 3, "padding changes no valid output"),
    Property("prefix_bidirectional", prop_prefix_bidirectional, (), 1, "a later prompt token reaches the prefix"),
    Property("response_causal", prop_response_causal, (), 1, "a response token reaches nothing before it"),
    Property("padding_hidden", prop_padding_hidden, (), 1, "a padding token reaches no valid output"),
    Property("window_fits", prop_window_fits, (), 1, "a window as long as the sequence changes nothing"),
    Property("window_band", prop_window_band, (), 1, "a short window hides exactly the keys outside the band"),
    Property("gqa_equals_mha", prop_gqa_equals_mha, (), 1, "GQA equals MHA with repeated kv heads"),
    Property("final_soft_cap", prop_final_soft_cap, ("llm/logits",), 1, "|logits| <= final soft-cap"),
    Property("matches_reference", prop_matches_reference, (), 1, "equals refimpl float64 within the table"),
]}
PROPERTY_NAMES = tuple(PROPERTIES)


# ---- running ---------------------------------------------------------------------------------------------------
@dataclass
class PropertyResult:
    name: str
    status: str  # "pass", "fail" or "skip"
    detail: str = ""
    examples: int = 0
    rejected: int = 0  # drawn models the backend could not represent (UnsupportedConfig), not counted in examples


def _probe(runner: PropertyRunner, prop: Property) -> None:
    """Raise PropertySkipped if the backend does not return a tap the property needs."""
    if not prop.needs_taps:
        return
    config = PaliGemmaConfig(
        vocabulary_size=7, image_size=2, num_layers=1, num_query_heads=2, num_key_value_heads=1, hidden_dim=6,
        intermediate_dim=4, head_dim=2, vit_patch_size=1, vit_num_heads=1, vit_hidden_dim=3, vit_num_layers=1,
        vit_intermediate_dim=5, include_rescaling=False, final_logit_soft_cap=1.0, use_post_attention_norm=True,
        use_post_ffw_norm=True)  # a whole PaliGemma 2 block, which every port can represent
    inputs = strat.batch_from_layouts(config, [(2, 1, 1)], seed=0)
    try:
        out = runner.run(ModelSpec(config, 0), inputs, list(prop.needs_taps))
    except UnsupportedConfig:
        return  # the property's own examples will show what the backend returns
    missing = [t for t in prop.needs_taps if t not in out]
    if missing:
        raise PropertySkipped(f"backend {runner.name} does not return the tap(s) {missing}")


def run_property(name: str, backend: Any, *, hypothesis_settings: settings | None = None,
                 runner: PropertyRunner | None = None, rel_tol: float | None = None,
                 seed: int | None = None) -> PropertyResult:
    """Check one property on ``backend`` with hypothesis; never raises for a counterexample (see the result).

    ``hypothesis_settings`` default to the active profile (``settings()``); ``max_examples`` is divided by the
    property's cost and ``deadline`` is None. ``seed`` fixes hypothesis' random choices.
    """
    if name not in PROPERTIES:
        raise ValueError(f"property {name!r} is unknown; expected one of {PROPERTY_NAMES}")
    prop = PROPERTIES[name]
    own_runner = runner is None
    runner = runner or PropertyRunner(backend, rel_tol=rel_tol)
    base = hypothesis_settings or settings()
    # filter_too_much: drawn models a backend cannot represent are rejected on purpose (counted in the result).
    chosen = settings(base, max_examples=max(1, base.max_examples // prop.cost), deadline=None,
                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                             HealthCheck.filter_too_much])
    counter = {"n": 0, "rejected": 0}

    def example(data):
        try:
            prop.check(runner, data.draw)
        except UnsupportedConfig:
            counter["rejected"] += 1
            reject()  # hypothesis draws another example; the reasons are kept in runner.unsupported
        counter["n"] += 1

    example.__name__ = example.__qualname__ = f"property_{name}"
    try:
        _probe(runner, prop)
        test = given(data=st.data())(chosen(example))
        (test if seed is None else hypothesis_seed(seed)(test))()
        return PropertyResult(name, "pass", examples=counter["n"], rejected=counter["rejected"])
    except PropertySkipped as skip:
        return PropertyResult(name, "skip", str(skip))
    except Unsatisfiable:
        reasons = "; ".join(sorted(runner.unsupported)) or "every drawn example was rejected"
        return PropertyResult(name, "skip", f"backend {runner.name} can represent none of the drawn models: "
                                            f"{reasons}")
    except Exception as error:  # a counterexample (hypothesis re-raises it after shrinking) or a backend crash
        notes = "\n".join(getattr(error, "__notes__", []))
        return PropertyResult(name, "fail", f"{type(error).__name__}: {error}\n{notes}".strip(), counter["n"],
                              counter["rejected"])
    finally:
        if own_runner:
            runner.close()


def check_property(name: str, backend: Any, **kwargs) -> PropertyResult:
    """``run_property`` for a test: AssertionError on failure; ``pytest.skip`` (or PropertySkipped) on skip."""
    result = run_property(name, backend, **kwargs)
    if result.status == "fail":
        raise AssertionError(f"property {name} fails on backend {getattr(backend, 'name', backend)}:\n"
                             f"{result.detail}")
    if result.status == "skip":
        if "pytest" in sys.modules:
            import pytest

            pytest.skip(result.detail)
        raise PropertySkipped(result.detail)
    return result


# ---- command line ----------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conformance.properties",
                                     description="Check backend-generic properties with hypothesis on tiny presets.",
                                     epilog="Exit codes: 0 every property holds (or is skipped), 1 a counterexample, "
                                            "2 usage error or backend unavailable.")
    parser.add_argument("--backend", default="refimpl", help="registered backend name or module:factory")
    parser.add_argument("--property", action="append", choices=PROPERTY_NAMES, metavar="NAME",
                        help="check only these (repeatable); default all")
    parser.add_argument("--max-examples", type=int, default=50, help="examples per property (default 50)")
    parser.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: random)")
    parser.add_argument("--rel-tol", type=float, default=None,
                        help="replace the table's bound by REL_TOL x max|reference| (default: the table)")
    parser.add_argument("--no-shrink", action="store_true", help="report the first counterexample as found")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the written presets here")
    parser.add_argument("--list", action="store_true", help="list the properties and exit")
    args = parser.parse_args(argv)
    if args.list:
        for prop in PROPERTIES.values():
            needs = f" (needs {', '.join(prop.needs_taps)})" if prop.needs_taps else ""
            print(f"{prop.name:22s} {prop.doc}{needs}")
        return 0
    try:
        backend = make_backend(args.backend)
    except (ValueError, BackendUnavailable) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    phases = [Phase.explicit, Phase.reuse, Phase.generate] + ([] if args.no_shrink else [Phase.shrink])
    chosen = settings(max_examples=args.max_examples, deadline=None, database=None, print_blob=True, phases=phases)
    failures = 0
    with PropertyRunner(backend, workdir=args.workdir, rel_tol=args.rel_tol) as runner:
        for name in args.property or PROPERTY_NAMES:
            result = run_property(name, backend, hypothesis_settings=chosen, runner=runner, seed=args.seed)
            failures += result.status == "fail"
            counts = [f"{result.examples} examples"] if result.examples else []
            counts += [f"{result.rejected} drawn models the backend cannot represent"] if result.rejected else []
            print(f"{result.status.upper():4s} {name}" + (f" ({'; '.join(counts)})" if counts else "")
                  + (f": {result.detail}" if result.detail else ""), flush=True)
    print(f"{len(args.property or PROPERTY_NAMES) - failures} of {len(args.property or PROPERTY_NAMES)} properties "
          f"hold for {getattr(backend, 'name', args.backend)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
