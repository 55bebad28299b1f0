"""The CLI's exit codes and the JSON / JUnit / HTML / terminal reports."""

import json
import xml.etree.ElementTree as ET

import h5py
import numpy as np
import pytest

from _conformance_cases import run_taps, scale_decoder_weight, stored_params
from conformance import report
from conformance.cli import main
from conformance.harness import check_case
from refimpl.config import PaliGemmaConfig

pytestmark = pytest.mark.conformance


def _dump(case, directory, edit=None, policy="float32"):
    """What an external port would write: its float32 taps for the case's inputs, one file per case."""
    config = PaliGemmaConfig.from_keras_config(case.config)
    params = stored_params(config, case.provenance["seed"])
    taps = run_taps(config, edit(params) if edit else params, policy, dict(case.inputs))
    directory.mkdir(exist_ok=True)
    np.savez(directory / f"{case.name}.npz", **taps)
    return taps


@pytest.fixture
def dumps(tmp_path, tiny_case, pg2_case):
    """Dumps for both cases: tiny conforms, pg2 has a broken FFN in decoder block 1."""
    directory = tmp_path / "dumps"
    _dump(tiny_case, directory)
    _dump(pg2_case, directory, scale_decoder_weight(1, "w_gate", 1.02))
    return directory


# ---- exit codes ------------------------------------------------------------------------------------------------
def test_exit_0_when_conforming(golden_root, dumps, capsys):
    assert main(["check", "--golden", str(golden_root), "--candidate", str(dumps), "--case", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "PASS  tiny" in out and "3 padded positions excluded" in out


def test_exit_1_when_diverging(golden_root, dumps, capsys):
    assert main(["--golden", str(golden_root), "--candidate", str(dumps)]) == 1
    out = capsys.readouterr().out
    assert "FAIL  pg2" in out and "first divergence llm/layer01/ffw_out (mlp)" in out and "introduced" in out
    assert "PASS  tiny" in out


def test_exit_0_for_a_python_backend_given_as_module_factory(golden_root):
    assert main(["--golden", str(golden_root), "--backend", "_conformance_cases:seeded_backend"]) == 0


@pytest.mark.parametrize("argv, message", [
    (["--case", "nope"], "unknown case"),
    (["--backend", "nope"], "is unknown"),
    (["--backend", "dump"], "needs --candidate"),
    (["--taps", "("], "invalid"),
    (["--tolerance", "x", "a", "0"], "must be numbers"),
    (["--no-such-flag"], ""),
])
def test_exit_2_on_usage_errors(golden_root, argv, message, capsys):
    assert main(["--golden", str(golden_root), *argv]) == 2
    assert message in capsys.readouterr().err


def test_exit_2_without_golden_cases(tmp_path, capsys):
    assert main(["--golden", str(tmp_path)]) == 2
    assert "python -m tools.make_goldens" in capsys.readouterr().err


def test_exit_2_when_one_dump_file_meets_several_cases(golden_root, dumps, capsys):
    assert main(["--golden", str(golden_root), "--candidate", str(dumps / "tiny.npz")]) == 2
    assert "holds one case" in capsys.readouterr().err
    assert main(["--golden", str(golden_root), "--candidate", str(dumps / "tiny.npz"), "--case", "tiny"]) == 0


def test_exit_2_when_a_case_has_no_dump(golden_root, tmp_path, tiny_case):
    _dump(tiny_case, tmp_path / "only_tiny")
    assert main(["--golden", str(golden_root), "--candidate", str(tmp_path / "only_tiny")]) == 2


def test_cli_tolerance_override_and_xfail(golden_root, dumps, capsys):
    argv = ["--golden", str(golden_root), "--candidate", str(dumps), "--case", "pg2"]
    assert main([*argv, "--tolerance", ".", "1", "0"]) == 0
    assert main([*argv, "--xfail", "layer0[12]/|final_norm|logits", "known FFN bug"]) == 0
    assert "xfail llm/layer01/ffw_out: known FFN bug" in capsys.readouterr().out


def test_hdf5_dump_with_bf16_datasets(golden_root, tmp_path, tiny_case):
    taps = _dump(tiny_case, tmp_path / "npz", policy="bfloat16")  # bf16-valued float32 arrays
    with h5py.File(tmp_path / "tiny.h5", "w") as handle:
        for name, value in taps.items():
            if value.dtype == bool:
                handle[name] = value
            else:  # the upper 16 bits of each float32: the bf16 bit pattern, as keras stores it
                handle[name] = (value.view(np.uint32) >> 16).astype(np.uint16)
                handle[name].attrs["dtype"] = "bfloat16"
    argv = ["--golden", str(golden_root), "--candidate", str(tmp_path / "tiny.h5"), "--case", "tiny"]
    assert main(argv) == 0  # detected as bf16: the bf16 row applies
    assert main([*argv, "--candidate-dtype", "float32"]) == 1  # the float32 row is far too strict for bf16


# ---- reports ---------------------------------------------------------------------------------------------------
def test_json_junit_html_reports(golden_root, dumps, tmp_path, tiny_case, pg2_case):
    paths = {kind: tmp_path / f"report.{kind}" for kind in ("json", "xml", "html")}
    code = main(["--golden", str(golden_root), "--candidate", str(dumps), "--json", str(paths["json"]),
                 "--junit", str(paths["xml"]), "--html", str(paths["html"])])
    assert code == 1
    document = json.loads(paths["json"].read_text())
    assert document["schema_version"] == 1 and document["summary"]["exit_code"] == 1
    cases = {c["case"]: c for c in document["cases"]}
    assert cases["tiny"]["status"] == "pass" and cases["tiny"]["first_divergence"] is None
    divergence = cases["pg2"]["first_divergence"]
    assert divergence["tap"] == "llm/layer01/ffw_out" and divergence["verdict"] == "introduced"
    assert [u["tap"] for u in divergence["upstream"]] == ["llm/layer01/pre_ffw_norm"]
    taps = {t["name"]: t for t in cases["pg2"]["taps"]}
    assert taps["llm/layer01/ffw_out"]["status"] == "fail" and taps["llm/layer01/ffw_out"]["metrics"]["n_out"] > 0
    assert taps["llm/logits"]["metrics"]["top1_agreement"] is not None
    assert taps["llm/final_norm"]["excluded_positions"] == 3

    suites = ET.parse(paths["xml"]).getroot()
    assert int(suites.get("tests")) == len(tiny_case.taps) + len(pg2_case.taps)
    pg2_suite = next(s for s in suites if s.get("name") == "pg2")
    failures = [c for c in pg2_suite if c.find("failure") is not None]
    assert int(pg2_suite.get("failures")) == len(failures) > 0
    first = next(c for c in failures if c.get("name") == "llm/layer01/ffw_out")
    assert first.find("failure").get("message").startswith("FIRST DIVERGENCE")

    page = paths["html"].read_text()
    assert page.count("<svg") == 2 and "llm/layer01/ffw_out" in page and "</html>" in page


def test_junit_for_an_unreadable_case(golden_copy, tmp_path):
    (golden_copy / "tiny" / "inputs.npz").unlink()
    main(["--golden", str(golden_copy), "--backend", "_conformance_cases:seeded_backend",
          "--junit", str(tmp_path / "j.xml"), "--json", str(tmp_path / "j.json")])
    suite = next(s for s in ET.parse(tmp_path / "j.xml").getroot() if s.get("name") == "tiny")
    assert suite.get("errors") == "1" and "IntegrityError" in suite.find("testcase/error").get("message")
    assert json.loads((tmp_path / "j.json").read_text())["summary"]["errors"] == 1


def test_terminal_detail_leads_with_the_first_divergence(pg2_case):
    from _conformance_cases import refimpl_backend
    result = check_case(pg2_case, refimpl_backend(scale_decoder_weight(2, "wk", 1.05)))
    text = report.format_terminal([result])
    lines = text.splitlines()
    assert lines[0].startswith("FAIL  pg2") and "llm/layer02/attn_out" in lines[0]
    assert lines[1].startswith("  first divergence: llm/layer02/attn_out")
    table_header = next(i for i, line in enumerate(lines) if line.strip().startswith("status"))
    assert "llm/layer02/attn_out" in lines[table_header + 1]  # first row of the table
    assert "upstream llm/layer02/pre_attn_norm: pass" in text and "upstream llm/mask: pass" in text


def test_json_encodes_non_finite_numbers():
    assert report.jsonable({"a": float("inf"), "b": [float("-inf"), float("nan")], "c": (1, 2)}) == {
        "a": "inf", "b": ["-inf", "nan"], "c": [1, 2]}


def test_json_keys_match_the_documented_schema(tiny_case):
    from _conformance_cases import refimpl_backend
    from conformance.harness import CheckOptions
    document = json.loads(report.dumps_json([check_case(tiny_case, refimpl_backend(), CheckOptions())],
                                            CheckOptions()))
    doc = report.__doc__
    for key in list(document) + list(document["summary"]) + list(document["options"]):
        assert f'"{key}"' in doc or f"{key}," in doc or f"{key}}}" in doc, key
    case = document["cases"][0]
    for key in list(case) + list(case["taps"][0]) + list(case["taps"][0]["metrics"]):
        assert key in doc, key
