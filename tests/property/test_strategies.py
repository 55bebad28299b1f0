"""The importable input strategies (conformance/strategies.py) draw what they promise: valid configs, and
batches that refimpl's validator accepts, laid out as prompt, then response, then padding."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from conformance import strategies as strat
from refimpl.inputs import validate_inputs

pytestmark = pytest.mark.property


@given(size=st.sampled_from(strat.SIZES), data=st.data())
def test_valid_batches_are_valid_and_laid_out(size, data):
    config = data.draw(strat.configs(size))
    minimums = data.draw(st.tuples(st.integers(0, 2), st.integers(0, 2)))
    inputs = data.draw(strat.valid_batches(config, min_prompt=minimums[0], min_response=minimums[1]))
    checked = validate_inputs(inputs, config)
    assert inputs["images"].dtype == np.float32 and inputs["token_ids"].dtype == np.int32
    assert checked.token_ids.shape == inputs["padding_mask"].shape == inputs["response_mask"].shape
    seg = strat.segments(inputs)
    text_len = seg.shape[1]
    for row in seg:
        assert np.all(np.diff(row) >= 0), row  # prompt (0), then response (1), then padding (2)
        prompt, response = int((row == strat.PROMPT).sum()), int((row == strat.RESPONSE).sum())
        assert prompt >= min(minimums[0], text_len)
        assert response >= min(minimums[1], text_len - prompt)
    assert not (inputs["response_mask"] & ~inputs["padding_mask"]).any()  # no response on padding


@given(data=st.data())
def test_unknown_size_is_refused(data):
    with pytest.raises(ValueError, match="size='huge'"):
        data.draw(strat.configs("huge"))
