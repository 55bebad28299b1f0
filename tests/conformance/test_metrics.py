"""Metrics and tolerances on values derived by hand."""

import math

import numpy as np
import pytest

from conformance import metrics, tolerances
from conformance.cases import Envelope

pytestmark = pytest.mark.unit


# ---- ULPs ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt, ref, expected", [
    ("float32", 1.0, 2.0 ** -23),   # 24 significant bits: spacing at [1, 2) is 2^-23
    ("float32", 3.0, 2.0 ** -22),   # [2, 4)
    ("float32", 0.75, 2.0 ** -24),  # [0.5, 1)
    ("bfloat16", 1.0, 2.0 ** -7),   # 8 significant bits
    ("bfloat16", 3.0, 2.0 ** -6),
    ("bfloat16", -3.0, 2.0 ** -6),  # sign does not matter
    ("float16", 1.0, 2.0 ** -10),
    ("float64", 1.0, 2.0 ** -52),
    ("float32", 0.0, 2.0 ** -149),  # smallest float32 subnormal
    ("float16", 2.0 ** -20, 2.0 ** -24),  # below the normals (2^-14) the spacing stays 2^-24
])
def test_ulp_by_hand(fmt, ref, expected):
    assert metrics.ulp(np.array([ref]), fmt)[0] == expected


def test_ulp_agrees_with_numpy_spacing():
    values = np.array([1e-30, 1e-3, 0.7, 1.0, 5.5, 1e20], dtype=np.float32)
    assert np.array_equal(metrics.ulp(values, "float32"), np.spacing(values).astype(np.float64))
    halves = np.array([1e-3, 0.7, 1.0, 5.5, 6e4], dtype=np.float16)
    assert np.array_equal(metrics.ulp(halves, "float16"), np.spacing(halves).astype(np.float64))


def test_bf16_ulp_distance_of_neighbours():
    # 3 + 2^-5 is two bf16 steps (2^-6 each) above 3.
    m = metrics.compare(np.array([3.0 + 2 ** -5], dtype=np.float32), np.array([3.0]), atol=1, rtol=0,
                        fmt="bfloat16")
    assert m.max_ulp == 2.0


# ---- float metrics ---------------------------------------------------------------------------------------------
def test_errors_by_hand():
    ref = np.array([3.0, 4.0, -2.0, 1.0])
    x = np.array([3.0, 4.5, -2.0, 0.9])  # d = [0, 0.5, 0, -0.1]
    m = metrics.compare(x, ref, atol=0.2, rtol=0.0, fmt="float64")
    assert m.max_abs == 0.5
    assert m.scale == 4.0
    assert m.max_rel == 0.5 / 4.0
    assert m.max_rel_elementwise == pytest.approx(0.125)  # 0.5 / 4 beats 0.1 / 1
    assert m.n_out == 1 and m.frac_out == 0.25
    assert m.budget_used == pytest.approx(0.5 / 0.2)
    assert m.worst_index == (1,)
    assert m.worst[0] == {"index": (1,), "value": 4.5, "ref": 4.0, "abs_err": 0.5}
    assert m.worst[1]["index"] == (3,)
    # nmse: sum d^2 = 0.26, sum ref^2 = 30
    assert m.nmse_db == pytest.approx(10 * math.log10(0.26 / 30))
    # cosine: <x, ref> = 9 + 18 + 4 + 0.9 = 31.9
    assert m.cosine == pytest.approx(31.9 / (math.sqrt(9 + 20.25 + 4 + 0.81) * math.sqrt(30)))


def test_rtol_term_and_worst_index_in_full_tensor():
    ref = np.array([[1.0, 100.0], [10.0, 0.0]])
    x = np.array([[1.05, 100.5], [10.0, 0.0]])  # bound atol + rtol |ref| = 0.01 + 0.01 |ref|
    m = metrics.compare(x, ref, atol=0.01, rtol=0.01, fmt="float64")
    assert m.n_out == 1  # 0.05 > 0.02 fails; 0.5 <= 1.01 passes
    assert m.worst_index == (0, 1)  # largest |d| is 0.5, even though it is within its bound
    assert m.budget_used == pytest.approx(0.05 / 0.02)


def test_orthogonal_and_identical():
    m = metrics.compare(np.array([0.0, 1.0]), np.array([1.0, 0.0]), atol=0, rtol=0, fmt="float64")
    assert m.cosine == 0.0
    same = metrics.compare(np.array([1.0, 2.0]), np.array([1.0, 2.0]), atol=0, rtol=0, fmt="float64")
    assert same.nmse_db == -math.inf and same.n_out == 0 and same.cosine == pytest.approx(1.0)


def test_zero_reference_elementwise_rel_is_inf():
    m = metrics.compare(np.array([0.0, 1e-9]), np.array([0.0, 0.0]), atol=1, rtol=0, fmt="float64")
    assert m.max_rel_elementwise == math.inf and m.n_out == 0


def test_nan_candidate_is_out_of_tolerance():
    m = metrics.compare(np.array([1.0, np.nan]), np.array([1.0, 2.0]), atol=1e9, rtol=0, fmt="float32")
    assert m.nonfinite == 1 and m.n_out == 1 and m.max_abs == math.inf


def test_keep_mask_excludes_positions():
    ref = np.zeros((2, 3, 2))
    x = ref.copy()
    x[1, 2] = 5.0  # garbage at batch 1, position 2
    keep = np.array([[True, True, True], [True, True, False]])
    m = metrics.compare(x, ref, atol=1e-6, rtol=0, fmt="float32", keep=keep)
    assert m.compared == 10 and m.excluded_elements == 2 and m.n_out == 0
    assert metrics.compare(x, ref, atol=1e-6, rtol=0, fmt="float32").n_out == 2


def test_shape_and_dtype_checks():
    m = metrics.compare(np.zeros((2, 3)), np.zeros((3, 2)), atol=1, rtol=0, fmt="float32")
    assert not m.shape_ok and m.max_abs is None
    assert not metrics.compare(np.zeros(3, dtype=np.int32), np.zeros(3), atol=1, rtol=0, fmt="float32").dtype_ok
    assert not metrics.compare(np.zeros(3), np.zeros(3, dtype=bool), atol=0, rtol=0, fmt="float32").dtype_ok


def test_masks_compare_exactly():
    ref = np.array([[True, False], [True, True]])
    x = np.array([[True, True], [True, True]])
    m = metrics.compare(x, ref, atol=10, rtol=10, fmt="float32")
    assert m.n_out == 1 and m.worst_index == (0, 1) and m.budget_used == math.inf


# ---- logits ----------------------------------------------------------------------------------------------------
def test_logit_metrics_by_hand():
    ref = np.array([[0.0, math.log(3.0)]])  # softmax [1/4, 3/4]
    x = np.array([[0.1, 0.0]])  # argmax 0 versus 1
    top1, overlap, kl = metrics.logit_metrics(x, ref)
    assert top1 == 0.0 and overlap == 1.0  # V = 2: both top-2 sets are {0, 1}
    q = np.exp([0.1, 0.0]) / np.exp([0.1, 0.0]).sum()
    assert kl == pytest.approx(0.25 * math.log(0.25 / q[0]) + 0.75 * math.log(0.75 / q[1]))


def test_top5_overlap_by_hand():
    ref = np.array([[9.0, 8, 7, 6, 5, 4, 3]])  # top 5: {0, 1, 2, 3, 4}
    x = np.array([[9.0, 8, 7, 0, 0, 6, 5]])    # top 5: {0, 1, 2, 5, 6}
    top1, overlap, kl = metrics.logit_metrics(x, ref)
    assert top1 == 1.0 and overlap == pytest.approx(3 / 5) and kl > 0
    assert metrics.logit_metrics(ref, ref)[2] == pytest.approx(0.0, abs=1e-15)


def test_compare_logits_uses_kept_rows():
    ref = np.array([[[1.0, 0.0], [0.0, 1.0]]])  # B=1, T=2, V=2
    x = np.array([[[1.0, 0.0], [1.0, 0.0]]])    # row 1 disagrees, but it is padding
    m = metrics.compare(x, ref, atol=10, rtol=0, fmt="float32", keep=np.array([[True, False]]), logits=True)
    assert m.top1_agreement == 1.0
    assert metrics.compare(x, ref, atol=10, rtol=0, fmt="float32", logits=True).top1_agreement == 0.5


# ---- tolerances ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, kind", [
    ("img/pixels", "input"), ("img/embed", "embedding"), ("img/block01/ln1", "norm"),
    ("img/block01/attn_out", "attention"), ("img/block01/attn_residual", "residual"), ("img/block00/ln2", "norm"),
    ("img/block00/mlp_out", "mlp"), ("img/block00/out", "residual"), ("img/encoded", "norm"),
    ("img/proj", "embedding"), ("llm/embed_text", "embedding"), ("llm/input", "embedding"), ("llm/mask", "mask"),
    ("llm/layer02/pre_attn_norm", "norm"), ("llm/layer02/attn_out", "attention"),
    ("llm/layer02/post_attn_norm", "norm"), ("llm/layer02/attn_residual", "residual"),
    ("llm/layer02/pre_ffw_norm", "norm"), ("llm/layer02/ffw_out", "mlp"), ("llm/layer02/post_ffw_norm", "norm"),
    ("llm/layer02/out", "residual"), ("llm/final_norm", "norm"), ("llm/logits", "logits"),
])
def test_every_tap_pattern_has_a_kind(name, kind):
    assert tolerances.tap_kind(name) == kind


def test_every_defined_tap_has_a_kind():
    from refimpl.taps import TAP_DEFINITIONS, tap_name
    for pattern in TAP_DEFINITIONS:
        assert tolerances.tap_kind(tap_name(pattern, j=3, i=4)) in tolerances.TAP_KINDS


def test_float32_rule_by_hand():
    env = {"float32": Envelope(max_abs=1e-6, max_rel=1e-6, rms=1e-7), "bfloat16": None}
    tol = tolerances.resolve("llm/layer00/out", "float32", 1.0, env)
    assert tol.atol == pytest.approx(8e-6 + 4 * 2.0 ** -23)  # 8 x envelope + 4 ulp_f32(1.0)
    assert tol.rtol == 0 and not tol.exact and "envelope" in tol.source


def test_float64_rule_scales_envelope_by_eps_ratio():
    env = {"float32": Envelope(max_abs=2.0 ** -20, max_rel=0, rms=0)}
    tol = tolerances.resolve("llm/layer00/out", "float64", 3.0, env)
    assert tol.atol == 8 * 2.0 ** -20 * 2.0 ** -29 + 4 * 2.0 ** -51  # ulp_f64(3) = 2^-51


def test_bfloat16_rule_uses_bf16_envelope():
    env = {"float32": Envelope(1e-6, 0, 0), "bfloat16": Envelope(0.01, 0, 0)}
    tol = tolerances.resolve("llm/layer00/attn_out", "bfloat16", 1.0, env)
    assert tol.atol == pytest.approx(4 * 0.01 + 2.0 ** -7)


def test_fallback_without_envelope_is_relative_to_scale():
    tol = tolerances.resolve("llm/layer00/ffw_out", "float16", 2.0, {})
    assert tol.atol == pytest.approx(tolerances.FALLBACK_REL["float16"]["mlp"] * 2.0 + 2 * 2.0 ** -9)
    assert "no envelope" in tol.source


def test_overrides_precedence_and_masks_stay_exact():
    env = {"float32": Envelope(1e-6, 0, 0)}
    case = {"layer0[01]/out$": {"atol": 0.5, "rtol": 0.1}}
    cli = [("layer01", 0.25, 0.0)]
    assert tolerances.resolve("llm/layer00/out", "float32", 1, env, case_overrides=case).source.startswith("case")
    tol = tolerances.resolve("llm/layer01/out", "float32", 1, env, case_overrides=case, cli_overrides=cli)
    assert (tol.atol, tol.rtol, tol.source) == (0.25, 0.0, "command-line override 'layer01'")
    assert tolerances.resolve("llm/mask", "float32", 1, env, cli_overrides=[(".*", 1, 1)]).exact


def test_candidate_format_names():
    assert tolerances.candidate_format("mixed_bfloat16") == "bfloat16"
    assert tolerances.candidate_format(np.dtype(np.float32)) == "float32"
    with pytest.raises(ValueError, match="int8"):
        tolerances.candidate_format("int8")
