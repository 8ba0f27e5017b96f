"""Issue 19 (h19rows): [4]'s sparse-reconstruction label likelihoods on hand-computed cases, and
the survey table assembled from result JSONs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from stac_rscbir.descriptors.spectral import label_likelihoods, likelihood_distance

# three orthonormal atoms: e1 carries label A, e2 label B, e3 both
ATOMS = np.eye(3)
LABELS = np.array([[1, 0], [0, 1], [1, 1]])


def test_likelihoods_of_orthonormal_atoms() -> None:
    # x = 0.8 e1 + 0.6 e2: OMP with 2 atoms takes e1 and e2, alpha = (0.8, 0.6, 0);
    # r_A = ||x - 0.8 e1|| = 0.6, r_B = ||x - 0.6 e2|| = 0.8 -> p = (0.4, 0.2)
    x = np.array([[0.8, 0.6, 0.0]])
    np.testing.assert_allclose(label_likelihoods(x, ATOMS, LABELS, nonzero=2), [[0.4, 0.2]])
    # one atom: e1 only (largest correlation) -> r_A = 0.6, r_B = ||x|| = 1
    np.testing.assert_allclose(label_likelihoods(x, ATOMS, LABELS, nonzero=1), [[0.4, 0.0]])
    # scale does not matter (rows and atoms are L2-normalised)
    np.testing.assert_allclose(label_likelihoods(5 * x, 3 * ATOMS, LABELS, nonzero=2), [[0.4, 0.2]])


def test_an_atom_explains_itself_unless_left_out() -> None:
    x = ATOMS[[2]]  # e3, labels A and B
    np.testing.assert_allclose(label_likelihoods(x, ATOMS, LABELS, nonzero=1), [[1.0, 1.0]])
    # without itself e3 is orthogonal to every atom: OMP's least squares gives alpha = 0
    np.testing.assert_allclose(
        label_likelihoods(x, ATOMS, LABELS, nonzero=1, exclude=[2]), [[0.0, 0.0]]
    )


def test_negative_coefficients_are_clipped() -> None:
    # atoms e1 (A) and (e1 + e2)/sqrt2 (B), x = (-0.6, 0.8): OMP takes e1 (|corr| 0.6 > 0.14),
    # alpha_1 = -0.6, residual (0, 0.8); then a2, and the exact solve x = -1.4 e1 + 0.8 sqrt2 a2:
    # r_A = ||x + 1.4 e1|| = ||(0.8, 0.8)|| = 1.13, r_B = ||x - (0.8, 0.8)|| = 1.4 -> p = (0, 0)
    atoms, labels = np.array([[1.0, 0.0], [1.0, 1.0]]), np.array([[1, 0], [0, 1]])
    x = [[-0.6, 0.8]]
    np.testing.assert_allclose(label_likelihoods(x, atoms, labels, nonzero=2), [[0, 0]], atol=1e-12)
    # one atom: e1 alone, r_A = ||(0, 0.8)|| = 0.8 -> p_A = 0.2
    np.testing.assert_allclose(label_likelihoods(x, atoms, labels, nonzero=1), [[0.2, 0.0]])


def test_zero_rows_and_bad_labels() -> None:
    np.testing.assert_array_equal(label_likelihoods(np.zeros((1, 3)), ATOMS, LABELS), [[0, 0]])
    with pytest.raises(ValueError, match="atom_labels"):
        label_likelihoods(np.ones((1, 3)), ATOMS, LABELS[:2])


def test_likelihood_distance_is_cosine_with_descriptor_ties() -> None:
    # p(q) = (1, 0): cosine distance 0 to (2, 0) and (1, 0), 1 to (0, 1) and to the zero vector,
    # 1 - 1/sqrt2 to (1, 1); equal likelihoods are ordered by 1e-3 * ||x_q - x_a||
    db_p = [[2.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [1.0, 1.0]]
    db_x = [[3.0], [4.0], [0.0], [0.0], [0.0]]
    d = likelihood_distance([[1.0, 0.0]], db_p, [[0.0]], db_x)
    np.testing.assert_allclose(d, [[0.003, 0.004, 1.0, 1.0, 1.0 - np.sqrt(0.5)]])


def _aid_retrieval():
    """benchmarks/aid_retrieval.py as a module (benchmarks are scripts, not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "aid_retrieval.py"
    spec = importlib.util.spec_from_file_location("aid_retrieval", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _result(method: str, bits: int | None, map20: float, describe: float) -> dict:
    return {
        "method": method,
        "bits": bits,
        "map_at_20": map20,
        "map_at_20_truncated": map20 / 2,
        "precision_at_10": map20,
        "train_seconds": 2.0,
        "n_train": 6,
        "n_queries": 4,
        "describe_seconds": describe,
        "metrics": {"random_map_at_20": 0.1},
    }


def test_survey_table_from_two_result_jsons(tmp_path: Path) -> None:
    lbp = _result("lbp", None, 0.4, 80.0) | {"descriptor_dim": 20}
    (tmp_path / "lbp-float.json").write_text(json.dumps(lbp))
    (tmp_path / "lbp+itq-64.json").write_text(json.dumps(_result("lbp+itq", 64, 0.3, 0.0)))
    aid = _aid_retrieval()
    aid.main(["--survey", "--reuse", "--out", str(tmp_path)])
    table = json.loads((tmp_path / "survey_table.json").read_text())
    rows = {(r["method"], r["bits"]): r for r in table["rows"]}
    assert set(rows) == {("lbp", None), ("lbp+itq", 64)}
    assert rows["lbp", None]["ref"] == rows["lbp+itq", 64]["ref"] == "[3]"
    # describing: 80 s / 10 images; the hashed row read the cache: its float row's s/img,
    # its own total (counted once in the sum: 82 + 2)
    assert rows["lbp", None]["seconds_per_image"] == rows["lbp+itq", 64]["seconds_per_image"] == 8
    assert (rows["lbp", None]["total_seconds"], rows["lbp+itq", 64]["total_seconds"]) == (82, 2)
    assert table["rows_total_seconds"] == 84
    assert "lbp-float.json" not in table["missing"]
    assert {"bosv-float.json", "prh-64.json"} <= set(table["missing"])
    # a 20-d descriptor cannot have 32-bit ITQ codes: listed as not applicable
    assert "lbp+itq-32.json (n/a: ITQ gives at most 20 bits on 20-d lbp)" in table["missing"]
    md = (tmp_path / "survey_table.md").read_text()
    assert "| [3] | lbp | float | 0.400 | 0.200 | 0.400 |  | 0.100 | 8.0000 | 2.0 | 82.0 |" in md
    assert "Missing (" in md and (tmp_path / "survey_table.png").stat().st_size > 0
    # the plain AID table still assembles (same row format), and is a separate file
    aid.main(["--reuse", "--methods", "lbp", "--bits", "64", "--out", str(tmp_path)])
    assert "| [3] | lbp | float | 0.400 |" in (tmp_path / "aid_table.md").read_text()
    assert json.loads((tmp_path / "aid_table.json").read_text())["missing"] == []


def test_method_reference_joins_descriptor_and_hasher() -> None:
    from stac_rscbir.eval.retrieval_bench import method_reference

    assert method_reference("sift-bovw+plsh") == "[1]+[23]"
    assert method_reference("bosv+itq") == "[4]"  # ITQ is no survey system
    assert (method_reference("kslh"), method_reference("adversarial")) == ("[8]", "[29]")
    assert method_reference("float-knn") == ""
