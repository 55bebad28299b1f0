"""Harness self-tests: a broken weight in block k must be named as the first divergence, at the right sub-step."""

import numpy as np
import pytest

from _conformance_cases import refimpl_backend, scale_decoder_weight, scale_vit_weight
from conformance.backend import DumpBackend, numba_importable
from conformance.harness import CheckOptions, check_case, exit_code, producers

pytestmark = pytest.mark.conformance


# ---- a correct backend passes ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
def test_refimpl_conforms(tiny_case, dtype):
    result = check_case(tiny_case, refimpl_backend(dtype=dtype))
    assert result.status == "pass", result.divergence
    assert [t.name for t in result.taps] == list(tiny_case.taps)
    assert all(t.status == "pass" for t in result.taps)
    # Not trivially passing: in float32 / bf16 the error is nonzero (float64 runs the reference's own code).
    assert max(t.budget for t in result.taps) <= 1
    assert dtype == "float64" or max(t.budget for t in result.taps) > 0
    assert result.excluded_positions == 3  # row 1 of the batch has 3 padded text tokens


@pytest.mark.numba
@pytest.mark.skipif(not numba_importable(), reason="numba not installed (pip install numba)")
def test_numba_kernels_conform_within_the_float32_rule(pg2_case):
    # Other summation orders than the envelope's own (numpy) run: the table's multiple must absorb them.
    result = check_case(pg2_case, refimpl_backend(kernels="numba"))
    assert result.status == "pass", result.divergence


# ---- broken weights are located -------------------------------------------------------------------------------
@pytest.mark.parametrize("block, field, first_tap", [
    (0, "ln1_gamma", "ln1"), (1, "ln1_beta", "ln1"), (0, "wk", "attn_out"), (1, "bo", "attn_out"),
    (1, "ln2_gamma", "ln2"), (0, "mlp1_kernel", "mlp_out"), (1, "mlp2_bias", "mlp_out"),
])
def test_broken_vit_weight_is_named(tiny_case, block, field, first_tap):
    result = check_case(tiny_case, refimpl_backend(scale_vit_weight(block, field, 1.01)))
    assert result.status == "fail" and exit_code([result]) == 1
    assert result.divergence.tap == f"img/block{block:02d}/{first_tap}"
    assert result.divergence.verdict == "introduced"
    # Everything upstream of the broken block passes.
    first = result.tap(result.divergence.tap).index
    assert all(t.status == "pass" for t in result.taps if t.index < first)


@pytest.mark.parametrize("block, field, first_tap", [
    (0, "pre_attention_norm", "pre_attn_norm"), (1, "wq", "attn_out"), (2, "wv", "attn_out"),
    (1, "wo", "attn_out"), (2, "pre_ffw_norm", "pre_ffw_norm"), (0, "w_gate", "ffw_out"),
    (1, "w_down", "ffw_out"),
])
def test_broken_decoder_weight_is_named(tiny_case, block, field, first_tap):
    result = check_case(tiny_case, refimpl_backend(scale_decoder_weight(block, field, 1.01)))
    assert result.divergence.tap == f"llm/layer{block:02d}/{first_tap}"
    assert result.divergence.verdict == "introduced"
    upstream = {u["tap"] for u in result.divergence.upstream}
    expected = {"pre_attn_norm": {"llm/input" if block == 0 else f"llm/layer{block - 1:02d}/out"},
                "attn_out": {f"llm/layer{block:02d}/pre_attn_norm", "llm/mask"},
                "pre_ffw_norm": {f"llm/layer{block:02d}/attn_residual"},
                "ffw_out": {f"llm/layer{block:02d}/pre_ffw_norm"}}[first_tap]
    assert upstream == expected
    assert all(u["status"] == "pass" and u["budget"] <= 1 for u in result.divergence.upstream)


@pytest.mark.parametrize("field, first_tap", [("post_attention_norm", "post_attn_norm"),
                                              ("post_ffw_norm", "post_ffw_norm")])
def test_broken_post_norm_is_named(pg2_case, field, first_tap):
    result = check_case(pg2_case, refimpl_backend(scale_decoder_weight(2, field, 1.01)))
    assert result.divergence.tap == f"llm/layer02/{first_tap}"
    assert result.divergence.verdict == "introduced"


def test_pg2_dataflow_uses_post_norms(pg2_case, tiny_case):
    assert producers("llm/layer01/out", pg2_case) == ("llm/layer01/attn_residual", "llm/layer01/post_ffw_norm")
    assert producers("llm/layer01/out", tiny_case) == ("llm/layer01/attn_residual", "llm/layer01/ffw_out")
    assert producers("llm/final_norm", pg2_case) == ("llm/layer02/out",)
    assert producers("img/encoded", tiny_case) == ("img/block01/out",)


# ---- inherited versus introduced -------------------------------------------------------------------------------
def test_xfailed_divergence_makes_the_next_tap_inherited(tiny_case):
    options = CheckOptions(xfail=(("layer01/ffw_out", "known bug #12"),))
    result = check_case(tiny_case, refimpl_backend(scale_decoder_weight(1, "w_up", 1.01)), options)
    assert result.tap("llm/layer01/ffw_out").status == "xfail"
    assert result.tap("llm/layer01/ffw_out").xfail_reason == "known bug #12"
    assert result.divergence.tap == "llm/layer01/out"
    assert result.divergence.verdict == "inherited"


def _shifted_dump(case, tmp_path, shifts: dict, dtype=np.float32) -> DumpBackend:
    """A dump holding golden taps shifted by constants: hand-controlled errors."""
    arrays = {name: (case.golden[name] + shift).astype(dtype) for name, shift in shifts.items()}
    np.savez(tmp_path / "dump.npz", **arrays)
    return DumpBackend(tmp_path / "dump.npz")


@pytest.mark.parametrize("upstream_shift, verdict", [(0.9e-3, "inherited"), (0.1e-3, "introduced")])
def test_verdict_compares_budgets(tiny_case, tmp_path, upstream_shift, verdict):
    # With atol = 1e-3 everywhere: layer00/out uses 0.9 (or 0.1) of its budget, layer01/out 1.2.
    # 1.2 <= 4 x 0.9 is drift carried in; 1.2 > 4 x 0.1 is new error.
    dump = _shifted_dump(tiny_case, tmp_path, {"llm/layer00/out": upstream_shift, "llm/layer01/out": 1.2e-3,
                                               "llm/final_norm": 0.0}, dtype=np.float64)
    result = check_case(tiny_case, dump, CheckOptions(tolerance_overrides=((".", 1e-3, 0.0),)))
    d = result.divergence
    assert d.tap == "llm/layer01/out" and d.verdict == verdict
    assert [u["tap"] for u in d.upstream] == ["llm/layer00/out"]
    assert d.upstream[0]["budget"] == pytest.approx(upstream_shift / 1e-3, rel=1e-9)
    assert d.budget == pytest.approx(1.2, rel=1e-9)


def test_undetermined_without_upstream_taps(tiny_case, tmp_path):
    dump = _shifted_dump(tiny_case, tmp_path, {"llm/final_norm": 1.0})
    result = check_case(tiny_case, dump)
    assert result.divergence.tap == "llm/final_norm" and result.divergence.verdict == "undetermined"
    assert sum(t.status == "not_provided" for t in result.taps) == len(tiny_case.taps) - 1


def test_a_source_tap_is_introduced(tiny_case, tmp_path):
    dump = _shifted_dump(tiny_case, tmp_path, {"llm/embed_text": 0.5, "llm/final_norm": 0.0})
    result = check_case(tiny_case, dump)
    assert result.divergence.tap == "llm/embed_text" and result.divergence.verdict == "introduced"


# ---- teacher forcing -------------------------------------------------------------------------------------------
def test_teacher_forcing_separates_introduced_from_inherited(tiny_case):
    edit = scale_decoder_weight(0, "w_up", 1.01)
    free = check_case(tiny_case, refimpl_backend(edit))
    forced = check_case(tiny_case, refimpl_backend(edit), CheckOptions(teacher_forced=True))
    later = [n for n in tiny_case.taps if n.startswith(("llm/layer01/", "llm/layer02/"))]
    assert any(free.tap(n).status == "fail" for n in later)
    assert all(forced.tap(n).status == "pass" and forced.tap(n).mode == "teacher_forced" for n in later)
    assert forced.divergence.tap == free.divergence.tap == "llm/layer00/ffw_out"
    assert forced.divergence.mode == "teacher_forced" and forced.divergence.verdict == "introduced"
    assert forced.tap("llm/final_norm").mode == "run"  # taps outside blocks still come from the free run


def test_teacher_forced_judges_free_run_taps_by_their_free_run_upstream(tiny_case):
    # Block 0 is broken but not compared: blocks 1-2 pass teacher-forced, the free-run final norm fails, and its
    # upstream (the free run's llm/layer02/out, already far over tolerance) makes it inherited.
    options = CheckOptions(teacher_forced=True, exclude="layer00|logits")
    result = check_case(tiny_case, refimpl_backend(scale_decoder_weight(0, "w_up", 1.01)), options)
    assert all(t.status == "pass" for t in result.taps if t.mode == "teacher_forced")
    d = result.divergence
    assert d.tap == "llm/final_norm" and d.verdict == "inherited"
    assert d.upstream[0]["tap"] == "llm/layer02/out" and d.upstream[0]["mode"] == "run"
    assert d.upstream[0]["budget"] > 1


def test_teacher_forced_vit_block(tiny_case):
    result = check_case(tiny_case, refimpl_backend(scale_vit_weight(1, "wv", 1.01)),
                        CheckOptions(teacher_forced=True))
    assert result.divergence.tap == "img/block01/attn_out"
    assert all(t.status == "pass" for t in result.taps if t.name.startswith("img/block00/"))


def test_teacher_forced_needs_run_block(tiny_case, tmp_path):
    dump = _shifted_dump(tiny_case, tmp_path, {"llm/final_norm": 0.0})
    result = check_case(tiny_case, dump, CheckOptions(teacher_forced=True))
    assert result.status == "error" and "run_block" in result.error and exit_code([result]) == 2


# ---- padding, presence, shapes ---------------------------------------------------------------------------------
def test_padded_positions_are_excluded_by_default(tiny_case, tmp_path):
    final = tiny_case.golden["llm/final_norm"].astype(np.float32)
    mask = tiny_case.golden["llm/mask"].copy()
    padded = ~tiny_case.inputs["padding_mask"]
    p = tiny_case.image_tokens
    final[:, p:][padded] = 1e3  # garbage at padded query positions
    mask[:, p:][padded] = ~mask[:, p:][padded]  # and different mask rows there
    np.savez(tmp_path / "dump.npz", **{"llm/final_norm": final, "llm/mask": mask})
    result = check_case(tiny_case, DumpBackend(tmp_path / "dump.npz"))
    assert result.status == "pass" and result.excluded_positions == int(padded.sum()) == 3
    assert result.tap("llm/final_norm").metrics.excluded_elements == 3 * final.shape[-1]
    strict = check_case(tiny_case, DumpBackend(tmp_path / "dump.npz"), CheckOptions(include_padding=True))
    assert strict.status == "fail" and strict.excluded_positions == 0
    assert strict.divergence.tap == "llm/mask"


def test_missing_required_tap_fails(tiny_case, tmp_path):
    dump = _shifted_dump(tiny_case, tmp_path, {"llm/input": 0.0})
    result = check_case(tiny_case, dump)
    assert result.status == "fail" and result.tap("llm/final_norm").status == "missing"
    assert result.divergence.tap == "llm/final_norm"


def test_wrong_shape_and_dtype_fail(tiny_case, tmp_path):
    final = tiny_case.golden["llm/final_norm"]
    np.savez(tmp_path / "dump.npz", **{"llm/final_norm": final.transpose(1, 0, 2).astype(np.float32),
                                       "llm/input": tiny_case.golden["llm/input"].astype(np.int32)})
    result = check_case(tiny_case, DumpBackend(tmp_path / "dump.npz"))
    assert "shape" in result.tap("llm/final_norm").message
    assert "dtype int32" in result.tap("llm/input").message
    assert result.divergence.tap == "llm/input"


def test_tap_selection(tiny_case):
    result = check_case(tiny_case, refimpl_backend(), CheckOptions(include=r"^llm/", exclude="logits"))
    assert result.taps and all(t.name.startswith("llm/") and "logits" not in t.name for t in result.taps)


def test_a_crashing_backend_is_an_error_not_a_pass(tiny_case):
    class Crashes:
        name = "crashes"

        def prepare(self, case):
            pass

        def run(self, inputs, taps):
            raise RuntimeError("out of memory")

    result = check_case(tiny_case, Crashes())
    assert result.status == "error" and "out of memory" in result.error and exit_code([result]) == 2


def test_backend_may_not_mutate_the_golden_inputs(tiny_case):
    class Mutates:
        name = "mutates"

        def prepare(self, case):
            pass

        def run(self, inputs, taps):
            inputs["images"][...] = 0
            return {"llm/final_norm": np.zeros(1)}

    before = tiny_case.inputs["images"].copy()
    check_case(tiny_case, Mutates())
    assert np.array_equal(tiny_case.inputs["images"], before)
