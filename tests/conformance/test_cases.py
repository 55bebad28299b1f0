"""Golden case integrity and loading: any tampering is refused (IntegrityError, exit code 2), never a pass."""

import json

import numpy as np
import pytest

from conformance.cases import (CaseError, IntegrityError, SchemaError, list_cases, load_case, load_npz,
                               verify_case_files)
from conformance.cli import main

pytestmark = pytest.mark.conformance


def _check(golden, *extra) -> int:
    # A dump of the exact golden taps: the case would pass if it were intact.
    return main(["check", "--golden", str(golden), "--case", "tiny", "--backend",
                 "_conformance_cases:seeded_backend", *extra])


def test_intact_copy_passes(golden_copy):
    verify_case_files(golden_copy, "tiny")
    assert _check(golden_copy) == 0


def _flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("relative", ["taps.npz", "inputs.npz", "case.json", "preset/config.json"])
def test_one_flipped_byte_is_refused(golden_copy, relative, capsys):
    path = golden_copy / "tiny" / relative
    _flip_byte(path, len(path.read_bytes()) // 2)
    with pytest.raises(IntegrityError, match=f"{relative}: sha256"):
        load_case(golden_copy, "tiny")
    assert _check(golden_copy) == 2
    assert "IntegrityError" in capsys.readouterr().out


def test_truncated_file_is_refused(golden_copy):
    path = golden_copy / "tiny" / "taps.npz"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(IntegrityError, match="taps.npz"):
        load_case(golden_copy, "tiny")
    assert _check(golden_copy) == 2


def test_extra_file_is_refused(golden_copy):
    (golden_copy / "tiny" / "preset" / "model.weights.h5").write_bytes(b"not listed")
    with pytest.raises(IntegrityError, match="extra file preset/model.weights.h5"):
        load_case(golden_copy, "tiny")
    assert _check(golden_copy) == 2


def test_missing_file_is_refused(golden_copy):
    (golden_copy / "tiny" / "inputs.npz").unlink()
    with pytest.raises(IntegrityError, match="missing file inputs.npz"):
        load_case(golden_copy, "tiny")
    assert _check(golden_copy) == 2


def test_unlisted_case_is_refused(golden_copy):
    manifest = json.loads((golden_copy / "MANIFEST.json").read_text())
    manifest["files"] = {k: v for k, v in manifest["files"].items() if not k.startswith("tiny/")}
    (golden_copy / "MANIFEST.json").write_text(json.dumps(manifest))
    assert "tiny" in list_cases(golden_copy)  # still found on disk, so it is checked and refused
    with pytest.raises(IntegrityError, match="not listed"):
        load_case(golden_copy, "tiny")
    assert _check(golden_copy) == 2


def test_all_problems_are_listed_at_once(golden_copy):
    (golden_copy / "tiny" / "inputs.npz").unlink()
    (golden_copy / "tiny" / "stray.txt").write_text("x")
    with pytest.raises(IntegrityError) as raised:
        load_case(golden_copy, "tiny")
    assert "missing file inputs.npz" in str(raised.value) and "extra file stray.txt" in str(raised.value)


def _rewrite_case_json(golden, name, change):
    from _conformance_cases import write_manifest
    path = golden / name / "case.json"
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document))
    write_manifest(golden)  # a consistently regenerated manifest: integrity passes, the content is checked


def test_other_schema_version_names_the_regenerating_command(golden_copy, capsys):
    _rewrite_case_json(golden_copy, "tiny", lambda d: d.update(schema_version=2))
    with pytest.raises(SchemaError, match="python -m tools.make_goldens"):
        load_case(golden_copy, "tiny")
    assert _check(golden_copy) == 2
    assert "python -m tools.make_goldens" in capsys.readouterr().out


def test_manifest_schema_version_is_checked(golden_copy):
    manifest = json.loads((golden_copy / "MANIFEST.json").read_text())
    manifest["schema_version"] = 0
    (golden_copy / "MANIFEST.json").write_text(json.dumps(manifest))
    with pytest.raises(SchemaError, match="tools.make_goldens"):
        list_cases(golden_copy)
    assert _check(golden_copy) == 2


@pytest.mark.parametrize("change, message", [
    (lambda d: d["taps"].remove("llm/final_norm"), "taps.npz keys differ|lacks the required"),
    (lambda d: d["taps"].append("llm/layer00/nonsense"), "unknown tap"),
    (lambda d: d.update(preset="../../elsewhere"), "inside the case"),
    (lambda d: d["float32_envelope"]["llm/input"].update(max_abs=-1), "non-negative"),
    (lambda d: d.update(tolerance_overrides={"(": {"atol": 1, "rtol": 0}}), "valid regex"),
    (lambda d: d["config"].update(num_query_heads=3), "multiple of num_key_value_heads"),
    (lambda d: d.pop("taps"), "missing key 'taps'"),
])
def test_malformed_case_json_is_a_case_error(golden_copy, change, message):
    _rewrite_case_json(golden_copy, "tiny", change)
    with pytest.raises(CaseError, match=message):
        load_case(golden_copy, "tiny")


def test_npz_with_object_array_or_huge_header_is_refused(tmp_path):
    np.savez(tmp_path / "objects.npz", a=np.array([{"x": 1}], dtype=object))
    with pytest.raises(CaseError, match="object dtype"):
        load_npz(tmp_path / "objects.npz")
    np.savez(tmp_path / "big.npz", a=np.zeros(1000))
    with pytest.raises(CaseError, match="would need 8000 bytes"):
        load_npz(tmp_path / "big.npz", max_bytes=100)
    (tmp_path / "junk.npz").write_bytes(b"PK junk")
    with pytest.raises(CaseError, match="not a readable .npz"):
        load_npz(tmp_path / "junk.npz")


def test_loaded_case_fields(tiny_case):
    assert tiny_case.taps[0] == "img/pixels" and tiny_case.taps[-1] == "llm/logits"
    assert set(tiny_case.golden) == set(tiny_case.taps)
    assert all(a.dtype in (np.float64, bool) for a in tiny_case.golden.values())
    assert tiny_case.image_tokens == 9 and tiny_case.keras_dtype == "float32"
    assert tiny_case.float32_envelope["llm/final_norm"].max_abs > 0


def test_nested_case_names(tmp_path):
    from _conformance_cases import build_case
    build_case(tmp_path, "tiny/nested")
    assert list_cases(tmp_path) == ["tiny/nested"]
    assert load_case(tmp_path, "tiny/nested").name == "tiny/nested"
    assert main(["--golden", str(tmp_path), "--backend", "_conformance_cases:seeded_backend"]) == 0
