"""The backend-generic properties (conformance/properties.py) against refimpl with both kernel sets, and against
deliberately broken backends, each of which must be caught by the property it breaks.

This file is also the example of running the properties from a port's pytest: a backend fixture, then
``check_property(name, backend)`` per property.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, settings

from conformance.backend import RefimplBackend
from conformance.cases import CaseError
from conformance.properties import PROPERTIES, PROPERTY_NAMES, PropertyRunner, check_property, run_property, main
from refimpl.attention import attention
from refimpl.kernels import NUMPY_KERNELS

pytestmark = pytest.mark.property


@pytest.fixture(scope="module")
def preset_dir(tmp_path_factory):
    """Presets shared by both kernel sets (the ci profile draws the same models for both)."""
    return tmp_path_factory.mktemp("property-presets")


@pytest.fixture(scope="module", params=["numpy", pytest.param("numba", marks=pytest.mark.skipif(
    importlib.util.find_spec("numba") is None, reason="numba not installed: the numba kernel set cannot run"))])
def runner(request, preset_dir):
    with PropertyRunner(RefimplBackend(kernels=request.param, dtype="float32"), workdir=preset_dir) as runner:
        yield runner


@pytest.mark.parametrize("name", PROPERTY_NAMES)
def test_property_holds_for_refimpl(name, runner):
    # Half the profile's examples: each one writes, loads and runs a model a few times (ci: 4, long: 250).
    budget = settings(settings.default, max_examples=max(4, settings.default.max_examples // 2))
    check_property(name, runner.backend, runner=runner, hypothesis_settings=budget)


# ---- broken backends: every property must be able to fail ---------------------------------------------------------
class BrokenBackend(RefimplBackend):
    """refimpl with one port-style bug, chosen by ``bug``."""

    def __init__(self, bug: str):
        super().__init__(kernels="numpy", dtype="float32")
        self.bug = bug

    @property
    def name(self) -> str:
        return f"refimpl with bug {self.bug!r}"

    def prepare(self, case) -> None:
        super().prepare(case)
        m = self.model
        if self.bug == "window ignored":
            m.config = m.config.replace(use_sliding_window_attention=False)
        elif self.bug == "no final soft-cap":
            m.config = m.config.replace(final_logit_soft_cap=None)
        elif self.bug == "window one too narrow":  # |t - s| <= W - 2: hides the last key a fitting window keeps
            m.config = m.config.replace(sliding_window_size=max(1, m.config.sliding_window_size - 1))
        elif self.bug == "kv heads interleaved":  # query head n reads kv head n % K instead of n // G
            def interleaved(q, k, v, mask, **kw):
                group = q.shape[2] // k.shape[2]
                return attention(q, np.tile(k, (1, 1, group, 1)), np.tile(v, (1, 1, group, 1)), mask, **kw)
            m.kernels = dataclasses.replace(NUMPY_KERNELS, attention=interleaved)

    def run(self, inputs, taps):
        inputs = {k: np.array(v, copy=True) for k, v in inputs.items()}
        if self.bug == "padding visible":
            inputs["padding_mask"][:] = True
        elif self.bug == "responses bidirectional":
            inputs["response_mask"][:] = False
        elif self.bug == "all causal":
            inputs["response_mask"] = inputs["padding_mask"].copy()
        out = super().run(inputs, taps)
        if self.bug == "mask transposed" and "llm/mask" in out:
            out["llm/mask"] = out["llm/mask"].transpose(0, 2, 1)
        if self.bug == "off by 1e-4":
            out["llm/final_norm"] = out["llm/final_norm"] * np.float32(1 + 1e-4)
        return out


BUGS = {
    "mask_rule": "mask transposed",
    "padding_invariance": "padding visible",
    "prefix_bidirectional": "all causal",
    "response_causal": "responses bidirectional",
    "padding_hidden": "padding visible",
    "window_fits": "window one too narrow",
    "window_band": "window ignored",
    "gqa_equals_mha": "kv heads interleaved",
    "final_soft_cap": "no final soft-cap",
    "matches_reference": "off by 1e-4",
}
FIND_FAST = settings(max_examples=30, deadline=None, derandomize=True, database=None,
                     phases=[Phase.explicit, Phase.generate],  # a counterexample is enough: no shrinking
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def test_every_property_has_a_bug_to_catch():
    assert set(BUGS) == set(PROPERTY_NAMES)


@pytest.mark.parametrize("name", PROPERTY_NAMES)
def test_property_catches_its_bug(name, tmp_path):
    result = run_property(name, BrokenBackend(BUGS[name]), hypothesis_settings=FIND_FAST)
    assert result.status == "fail", f"{name} did not catch {BUGS[name]!r}: {result}"
    assert name in result.detail


def test_missing_taps_skip_with_a_reason():
    class FinalOnly(RefimplBackend):
        def run(self, inputs, taps):
            return {"llm/final_norm": super().run(inputs, taps)["llm/final_norm"]}

    result = run_property("mask_rule", FinalOnly(kernels="numpy"), hypothesis_settings=FIND_FAST)
    assert result.status == "skip" and "llm/mask" in result.detail
    assert PROPERTIES["final_soft_cap"].needs_taps == ("llm/logits",)


class Gemma1Only(RefimplBackend):
    """A port that can represent PaliGemma 1 models only (as HF cannot represent some PaliGemma 2 mixes): it
    refuses the others the way the protocol says, with a CaseError from ``prepare``."""

    def __init__(self, refuse_all: bool = False):
        super().__init__(kernels="numpy", dtype="float32")
        self.refuse_all = refuse_all

    def prepare(self, case) -> None:
        c = case.parsed_config
        gemma2 = (c.use_post_attention_norm or c.use_post_ffw_norm or c.use_sliding_window_attention
                  or c.attention_logit_soft_cap is not None or c.final_logit_soft_cap is not None)
        if self.refuse_all or gemma2:
            raise CaseError(f"case {case.name!r}: this port has no PaliGemma 2 options")
        super().prepare(case)


def test_models_a_backend_refuses_are_rejected_and_counted():
    result = run_property("response_causal", Gemma1Only(), hypothesis_settings=FIND_FAST)
    assert result.status == "pass" and result.examples > 0 and result.rejected > 0, result


def test_a_backend_that_refuses_every_model_skips_with_its_reason():
    result = run_property("padding_hidden", Gemma1Only(refuse_all=True), hypothesis_settings=FIND_FAST)
    assert result.status == "skip" and "no PaliGemma 2 options" in result.detail, result


def test_command_line(capsys, tmp_path):
    assert main(["--backend", "refimpl-numpy", "--property", "response_causal", "--max-examples", "2",
                 "--seed", "1", "--workdir", str(tmp_path)]) == 0
    assert "PASS response_causal" in capsys.readouterr().out
    assert main(["--backend", "tests.property.test_backend_properties:_broken_causal", "--property",
                 "response_causal", "--max-examples", "10", "--seed", "1", "--no-shrink"]) == 1
    assert "FAIL response_causal" in capsys.readouterr().out
    assert main(["--backend", "no.such.module:factory"]) == 2
    assert main(["--list"]) == 0 and "window_band" in capsys.readouterr().out


def _broken_causal():
    return BrokenBackend("responses bidirectional")
