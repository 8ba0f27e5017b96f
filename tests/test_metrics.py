"""Retrieval metrics against hand-computed values on toy rankings, plus the evaluation helpers."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import pytest

from stac_rscbir.eval import (
    acg_at_k,
    descriptor_distances,
    evaluate_codes,
    evaluate_float,
    hamming_distances,
    map_at_k,
    multi_label_relevance,
    ndcg_at_k,
    per_query_metrics,
    pr_curve,
    precision_at_k,
    precision_within_hamming_radius,
    random_ranking_baseline,
    rank,
    ranked_relevance,
    recall_at_k,
    save_pr_curve,
    shared_label_counts,
    single_label_relevance,
    weighted_map_at_k,
)
from stac_rscbir.eval.metrics import _popcount_rows_table
from stac_rscbir.extension.codec import pack_bits

# ----------------------------------------------------------------------------- Hamming distances


@pytest.mark.parametrize("n_bytes", [1, 3, 4, 6, 8, 12, 16])
def test_hamming_matches_naive_bit_count(n_bytes: int) -> None:
    rng = np.random.default_rng(n_bytes)
    q = rng.integers(0, 256, (9, n_bytes), dtype=np.uint8)
    d = rng.integers(0, 256, (23, n_bytes), dtype=np.uint8)
    naive = (np.unpackbits(q, axis=1)[:, None, :] != np.unpackbits(d, axis=1)[None, :, :]).sum(-1)
    for chunk in (1, 5, 4096):  # chunking must not change anything
        got = hamming_distances(q, d, chunk_size=chunk)
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, naive)


def test_popcount_table_fallback_counts_bits() -> None:
    values = np.arange(256, dtype=np.uint8)[:, None]
    expected = [bin(v).count("1") for v in range(256)]
    np.testing.assert_array_equal(_popcount_rows_table(values), expected)
    # wider words are counted byte by byte: 0xFFFF0001 has 17 bits set
    assert _popcount_rows_table(np.array([[0xFFFF0001]], dtype=np.uint32))[0] == 17


def test_hamming_on_codec_packed_codes_and_bad_inputs() -> None:
    a = pack_bits([[0] * 32, [1] * 32])
    b = pack_bits([[1] * 16 + [0] * 16])
    np.testing.assert_array_equal(hamming_distances(a, b), [[16], [16]])
    with pytest.raises(ValueError, match="uint8"):
        hamming_distances(a.astype(np.int64), b)
    with pytest.raises(ValueError, match="widths differ"):
        hamming_distances(a, b[:, :2])


# ----------------------------------------------------------------------------- ranking


def test_rank_breaks_ties_by_database_index() -> None:
    dist = np.array([[1, 0, 1, 0, 2], [3, 3, 3, 3, 3]])
    np.testing.assert_array_equal(rank(dist), [[1, 3, 0, 2, 4], [0, 1, 2, 3, 4]])
    # same answer again and with float distances: never depends on chance
    np.testing.assert_array_equal(rank(dist.astype(float)), rank(dist))


def test_rank_random_tie_break_only_reorders_ties_and_is_seeded() -> None:
    dist = np.array([[1, 0, 1, 0, 2, 1, 1, 0]])
    a = rank(dist, tie_break="random", seed=3)
    np.testing.assert_array_equal(a, rank(dist, tie_break="random", seed=3))
    np.testing.assert_array_equal(np.sort(dist[0, a[0]]), dist[0, a[0]])  # still sorted
    with pytest.raises(ValueError, match="tie_break"):
        rank(dist, tie_break="chance")  # type: ignore[arg-type]


def test_rank_self_index_removes_the_query_itself() -> None:
    dist = np.array([[0, 2, 1], [2, 0, 2], [1, 2, 0]])
    order = rank(dist, self_index=np.arange(3))
    np.testing.assert_array_equal(order, [[2, 1], [0, 2], [0, 1]])


def test_rank_exclude_mask_and_unequal_exclusion() -> None:
    dist = np.array([[0, 1, 2, 3], [3, 2, 1, 0]])
    exclude = np.array([[False, True, False, True], [True, False, False, True]])
    np.testing.assert_array_equal(rank(dist, exclude=exclude), [[0, 2], [2, 1]])
    # combined with self_index [0, 0]: query 0 now drops 3 items, query 1 still 2 -> ragged
    with pytest.raises(ValueError, match="same number"):
        rank(dist, exclude=exclude, self_index=np.array([0, 0]))
    # self items that are already excluded change nothing
    np.testing.assert_array_equal(
        rank(dist, exclude=exclude, self_index=np.array([1, 0])), [[0, 2], [2, 1]]
    )


# ----------------------------------------------------------------------------- relevance


def test_relevance_helpers() -> None:
    np.testing.assert_array_equal(single_label_relevance([0, 2], [2, 0, 0]), [[0, 1, 1], [1, 0, 0]])
    yq = np.array([[1, 1, 0], [0, 0, 1]])
    yd = np.array([[1, 1, 1], [0, 1, 0], [0, 0, 0]])
    np.testing.assert_array_equal(shared_label_counts(yq, yd), [[2, 1, 0], [1, 0, 0]])
    np.testing.assert_array_equal(multi_label_relevance(yq, yd), [[1, 1, 0], [1, 0, 0]])
    with pytest.raises(ValueError, match="multi-hot"):
        shared_label_counts(yq * 2, yd)


# ----------------------------------------------------------------------------- mAP variants


def test_map_variant_a_and_truncated_on_1010() -> None:
    ranked = np.array([[1, 0, 1, 0]])
    # hits at ranks 1 and 3: P@1 = 1/1, P@3 = 2/3
    # A: normalised by N_rel@4 = 2 -> (1 + 2/3) / 2 = 5/6
    assert map_at_k(ranked, 4) == pytest.approx((1 / 1 + 2 / 3) / 2)
    # truncated: R = 2, min(k, R) = 2 -> same here
    assert map_at_k(ranked, 4, "truncated") == pytest.approx((1 / 1 + 2 / 3) / 2)
    # k = 2: only rank 1 is a hit -> A = 1/1; truncated divides by min(2, 2) = 2 -> 1/2
    assert map_at_k(ranked, 2) == pytest.approx(1.0)
    assert map_at_k(ranked, 2, "truncated") == pytest.approx(0.5)


def test_map_four_variants_match_reference_toy_check() -> None:
    # deep-hashing.md §4.2 toy check: rel = [1,0,1,0,0,1], k = 4, R = 3
    ranked = np.array([[1, 0, 1, 0, 0, 1]])
    s = 1 / 1 + 2 / 3  # sum of P@i over the hits in the top 4 (ranks 1 and 3)
    assert map_at_k(ranked, 4, "A") == pytest.approx(s / 2)  # 0.833, N_rel@4 = 2
    assert map_at_k(ranked, 4, "B") == pytest.approx(s / 3)  # 0.556, min(4, 3) = 3
    assert map_at_k(ranked, 4, "truncated") == map_at_k(ranked, 4, "B")
    # C: m = min(4, 3) = 3 relevant items at full-ranking positions 1, 3, 6
    assert map_at_k(ranked, 4, "C") == pytest.approx((1 / 1 + 2 / 3 + 3 / 6) / 3)  # 0.722
    assert map_at_k(ranked, 4, "D") == pytest.approx(s / 4)  # 0.417
    # at k = N, A, B and C coincide: (1 + 2/3 + 3/6) / 3
    full = (1 + 2 / 3 + 3 / 6) / 3
    for variant in ("A", "B", "C"):
        assert map_at_k(ranked, 6, variant) == pytest.approx(full)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="variant"):
        map_at_k(ranked, 4, "E")  # type: ignore[arg-type]


def test_map_is_zero_without_relevant_items_and_averages_over_queries() -> None:
    ranked = np.array([[0, 0, 1], [1, 1, 0], [0, 0, 0]])
    # query 0: nothing relevant in the top 2 -> 0 (A) ; query 1: (1 + 1)/2 = 1 ; query 2: R = 0 -> 0
    assert map_at_k(ranked, 2) == pytest.approx((0 + 1 + 0) / 3)
    # truncated: query 0 has R = 1 but no hit in the top 2 -> 0; query 1: 2 / min(2, 2) = 1
    assert map_at_k(ranked, 2, "truncated") == pytest.approx(1 / 3)


def test_precision_recall_and_k_beyond_the_database() -> None:
    ranked = np.array([[1, 0, 1, 1, 0], [0, 0, 0, 0, 1]])
    # P@3: (2/3 + 0/3) / 2 ; R@3: (2/3 + 0/1) / 2 (R = 3 and 1)
    assert precision_at_k(ranked, 3) == pytest.approx((2 / 3 + 0) / 2)
    assert recall_at_k(ranked, 3) == pytest.approx((2 / 3 + 0) / 2)
    # n_relevant overrides R (e.g. when only the top of the ranking is passed): 2/6 and 0/2
    assert recall_at_k(ranked[:, :3], 3, n_relevant=[6, 2]) == pytest.approx((2 / 6 + 0) / 2)
    # k = 10 > N = 5: the missing positions count as non-relevant -> P@10 = (3/10 + 1/10) / 2
    assert precision_at_k(ranked, 10) == pytest.approx(0.2)
    assert recall_at_k(ranked, 10) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="positive"):
        precision_at_k(ranked, 0)


# ----------------------------------------------------------------------------- graded metrics


def test_graded_metrics_on_hand_built_multi_label_case() -> None:
    # query labels {a, b}; database label sets and shared-label counts s:
    #   d0 {a, b} -> 2, d1 {c} -> 0, d2 {a, d} -> 1, d3 {b, c} -> 1, d4 {d} -> 0
    yq = np.array([[1, 1, 0, 0]])
    yd = np.array([[1, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 1], [0, 1, 1, 0], [0, 0, 0, 1]])
    graded = shared_label_counts(yq, yd)
    np.testing.assert_array_equal(graded, [[2, 0, 1, 1, 0]])
    # codes: query 00000000; d0 2 bits set, d1 3, d2 1, d3 3, d4 5 -> ranking d2, d0, d1, d3, d4
    # (d1 and d3 tie at distance 3: database index puts d1 first)
    bits = np.zeros((6, 8), dtype=np.uint8)
    for row, n_set in zip(range(1, 6), (2, 3, 1, 3, 5), strict=True):
        bits[row, :n_set] = 1
    packed = pack_bits(bits)
    dist = hamming_distances(packed[:1], packed[1:])
    np.testing.assert_array_equal(dist, [[2, 3, 1, 3, 5]])
    ranked = ranked_relevance(graded, rank(dist))
    np.testing.assert_array_equal(ranked, [[1, 2, 0, 1, 0]])
    # ACG@3 = (1 + 2 + 0) / 3 = 1
    assert acg_at_k(ranked, 3) == pytest.approx(1.0)
    # DCG@3 = (2^1-1)/log2(2) + (2^2-1)/log2(3) + 0 = 1 + 3/log2(3)
    # ideal order of the whole database [2, 1, 1, 0, 0]: IDCG@3 = 3/1 + 1/log2(3) + 1/log2(4)
    dcg = 1 + 3 / math.log2(3)
    idcg = 3 + 1 / math.log2(3) + 1 / 2
    assert ndcg_at_k(ranked, 3) == pytest.approx(dcg / idcg)
    # WAP@3: ACG@1 = 1, ACG@2 = 3/2, ACG@3 = 1; hits at ranks 1, 2 -> (1 + 3/2) / 2 = 1.25
    assert weighted_map_at_k(ranked, 3) == pytest.approx(1.25)
    # binary view: [1, 1, 0] -> A = (1 + 1) / 2 = 1; truncated: R = 3 -> 2 / min(3, 3) = 2/3
    assert map_at_k(ranked, 3) == pytest.approx(1.0)
    assert map_at_k(ranked, 3, "truncated") == pytest.approx(2 / 3)

    # the same case end to end, with graded metrics and the radius-2 precision (ball {d2, d0})
    out = evaluate_codes(packed[:1], packed[1:], yq, yd, ks=(3,), random_draws=0)
    assert out == pytest.approx(
        {
            "map_at_3": 1.0,
            "map_at_3_truncated": 2 / 3,
            "precision_at_3": 2 / 3,
            "recall_at_3": 2 / 3,
            "ndcg_at_3": dcg / idcg,
            "acg_at_3": 1.0,
            "wmap_at_3": 1.25,
            "precision_within_radius_2": 1.0,
        }
    )


def test_ndcg_is_one_for_the_ideal_ranking_and_zero_without_relevance() -> None:
    rng = np.random.default_rng(0)
    graded = rng.integers(0, 4, (6, 30))
    ideal = -np.sort(-graded, axis=1)
    for k in (1, 5, 30, 50):
        assert ndcg_at_k(ideal, k) == pytest.approx(1.0)
    assert ndcg_at_k(graded, 5) < 1.0
    # IDCG uses the whole database: a short retrieved list of the wrong items is not "ideal"
    assert ndcg_at_k(np.array([[0, 0, 3]]), 2) == 0.0
    assert ndcg_at_k(np.zeros((2, 4)), 3) == 0.0


def test_weighted_map_equals_map_a_for_binary_relevance() -> None:
    rng = np.random.default_rng(1)
    ranked = rng.integers(0, 2, (20, 40))
    assert weighted_map_at_k(ranked, 10) == pytest.approx(map_at_k(ranked, 10))


# ----------------------------------------------------------------------------- Hamming radius


def test_precision_within_radius_and_pr_curve_by_hand() -> None:
    dist = np.array([[0, 1, 1, 3], [2, 2, 3, 1], [0, 0, 0, 0]])
    rel = np.array([[1, 0, 1, 1], [0, 1, 0, 1], [0, 0, 0, 0]])
    # radius 1: q0 ball {0,1,2}, 2 relevant -> 2/3; q1 ball {3} -> 1/1;
    # q2 ball = all, none relevant -> 0; mean (2/3 + 1 + 0) / 3
    assert precision_within_hamming_radius(dist, rel, 1) == pytest.approx(5 / 9)
    # radius 0 for q1: empty ball counts as 0 -> (1/1 + 0 + 0) / 3
    assert precision_within_hamming_radius(dist, rel, 0) == pytest.approx(1 / 3)
    # PR curve over queries with R >= 1 (q0: R = 3, q1: R = 2; q2 is skipped)
    #   r:    0          1              2              3
    #   q0: P 1   R 1/3  P 2/3 R 2/3    P 2/3 R 2/3    P 3/4 R 1
    #   q1: P 0   R 0    P 1   R 1/2    P 2/3 R 1      P 1/2 R 1
    precision, recall = pr_curve(dist, rel, bits=3)
    np.testing.assert_allclose(precision, [1 / 2, 5 / 6, 2 / 3, 5 / 8])
    np.testing.assert_allclose(recall, [1 / 6, 7 / 12, 5 / 6, 1.0])
    with pytest.raises(ValueError, match="exceed"):
        pr_curve(dist, rel, bits=2)


def test_radius_metrics_respect_self_exclusion() -> None:
    # the query is database item 0 at distance 0: with it, the radius-0 ball is {self}
    dist = np.array([[0, 1, 2]])
    rel = np.array([[1, 1, 0]])
    assert precision_within_hamming_radius(dist, rel, 0) == 1.0
    assert precision_within_hamming_radius(dist, rel, 0, self_index=[0]) == 0.0  # empty ball
    assert precision_within_hamming_radius(dist, rel, 2, self_index=[0]) == pytest.approx(0.5)
    precision, recall = pr_curve(dist, rel, bits=2, self_index=[0])
    np.testing.assert_allclose(precision, [0.0, 1.0, 0.5])
    np.testing.assert_allclose(recall, [0.0, 1.0, 1.0])


# ----------------------------------------------------------------------------- random baseline


def test_random_baseline_matches_analytic_precision() -> None:
    rng = np.random.default_rng(2)
    rates = rng.uniform(0.05, 0.6, (40, 1))
    relevance = (rng.random((40, 300)) < rates).astype(np.int32)
    # under a uniformly random ranking, E[P@k] = R / N for every query and every k
    analytic = float(relevance.mean())
    result = random_ranking_baseline(relevance, 20, precision_at_k, n_draws=200, seed=0)
    assert result.mean == pytest.approx(analytic, abs=0.01)
    assert 0.0 < result.std < 0.05
    again = random_ranking_baseline(relevance, 20, precision_at_k, n_draws=200, seed=0)
    assert again == result  # seeded
    # variant A is far above the precision on random rankings (the §0 warning), B is not
    a = random_ranking_baseline(relevance, 20, map_at_k, n_draws=20).mean
    b = random_ranking_baseline(
        relevance, 20, functools.partial(map_at_k, variant="B"), n_draws=20
    ).mean
    assert a > analytic + 0.05
    assert b < a


def test_random_baseline_excludes_self() -> None:
    # each query is relevant only to itself: once excluded, nothing relevant remains
    relevance = np.eye(5, dtype=np.int32)
    assert random_ranking_baseline(relevance, 2, precision_at_k, n_draws=5).mean > 0
    result = random_ranking_baseline(
        relevance, 2, precision_at_k, n_draws=5, self_index=np.arange(5)
    )
    assert result == (0.0, 0.0)


# ----------------------------------------------------------------------------- evaluation


def test_evaluate_codes_single_label_self_exclusion_by_hand() -> None:
    # 4 items, classes [0, 0, 1, 1], codes with 0, 1, 2, 3 low bits set, all queries vs all
    labels = np.array([0, 0, 1, 1])
    bits = np.zeros((4, 8), dtype=np.uint8)
    for i in range(4):
        bits[i, :i] = 1
    packed = pack_bits(bits)
    # distances |i - j|. Rankings without self (ties -> lower database index first):
    #   q0: 1, 2, 3 -> rel [1, 0, 0]      q1: 0, 2 (tie at 1), 3 -> [1, 0, 0]
    #   q2: 1, 3 (tie at 1), 0 -> [0, 1, 0]   q3: 2, 1, 0 -> [1, 0, 0]
    out = evaluate_codes(
        packed, packed, labels, labels, ks=(1, 2), self_index=np.arange(4), random_draws=0
    )
    assert out["precision_at_1"] == pytest.approx(3 / 4)
    # AP A@2: 1, 1, (1/2)/1, 1 -> 0.875 ; truncated (R = 1): the same here
    assert out["map_at_2"] == pytest.approx(0.875)
    assert out["map_at_2_truncated"] == pytest.approx(0.875)
    assert out["recall_at_2"] == pytest.approx(1.0)
    assert "ndcg_at_2" not in out  # graded metrics only for multi-label
    # radius 2 without self: q0 {1, 2} -> 1/2, q1 {0, 2, 3} -> 1/3, q2 {0, 1, 3} -> 1/3,
    # q3 {1, 2} -> 1/2
    assert out["precision_within_radius_2"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 3 + 1 / 2) / 4)
    # keeping the query in its own database inflates everything (it ranks first, relevant)
    with_self = evaluate_codes(packed, packed, labels, labels, ks=(1,), random_draws=0)
    assert with_self["precision_at_1"] == 1.0


def test_evaluate_float_shares_the_ranking_code_with_codes() -> None:
    rng = np.random.default_rng(3)
    bits = rng.integers(0, 2, (60, 16)).astype(np.uint8)
    labels = rng.integers(0, 4, 60)
    # on 0/1 vectors, Euclidean distance = sqrt(Hamming): identical rankings, ties included
    kwargs = {"ks": (5, 20), "self_index": np.arange(60), "random_draws": 2, "seed": 7}
    codes = evaluate_codes(pack_bits(bits), pack_bits(bits), labels, labels, **kwargs)
    floats = evaluate_float(
        bits.astype(np.float32), bits.astype(np.float32), labels, labels, **kwargs
    )
    assert set(codes) - set(floats) == {"precision_within_radius_2"}
    for key, value in floats.items():
        assert codes[key] == pytest.approx(value), key
    for key in ("map_at_20", "map_at_20_truncated", "precision_at_5"):
        assert 0.0 <= codes[key] <= 1.0
        assert f"random_{key}" in codes


def test_evaluate_float_takes_a_method_distance_per_query_block() -> None:
    x = np.array([[0.0], [1.0], [3.0], [10.0]])
    labels = np.array([0, 1, 0, 1])
    seen = []

    def farthest_first(q: np.ndarray, d: np.ndarray) -> np.ndarray:
        seen.append(len(q))
        return -descriptor_distances(q, d)

    kwargs = {"ks": (1,), "self_index": np.arange(4), "random_draws": 0, "query_block": 3}
    out = evaluate_float(x, x, labels, labels, metric=farthest_first, **kwargs)
    assert seen == [3, 1]  # called per query block, with the whole database
    # farthest other point: 0 -> 10 (class 1, miss), 1 -> 10 (hit), 3 -> 10 (miss), 10 -> 0 (miss)
    assert out["precision_at_1"] == pytest.approx(1 / 4)
    # nearest other point: 0 -> 1, 1 -> 0, 3 -> 1, 10 -> 3: all misses
    assert evaluate_float(x, x, labels, labels, **kwargs)["precision_at_1"] == 0.0


def test_evaluate_multi_label_blocks_and_keys() -> None:
    rng = np.random.default_rng(4)
    labels = (rng.random((50, 6)) < 0.3).astype(np.int32)
    codes = pack_bits(rng.integers(0, 2, (50, 32)))
    full = evaluate_codes(codes, codes, labels, labels, self_index=np.arange(50), random_draws=0)
    blocked = evaluate_codes(
        codes, codes, labels, labels, self_index=np.arange(50), random_draws=0, query_block=7
    )
    assert blocked == pytest.approx(full)
    for key in (
        "map_at_20",
        "map_at_20_truncated",
        "precision_at_10",
        "ndcg_at_20",
        "acg_at_20",
        "wmap_at_20",
        "precision_within_radius_2",
        "recall_at_100",
    ):
        assert key in full
    # per-query values average to the reported means
    dist = hamming_distances(codes, codes)
    ranked = ranked_relevance(shared_label_counts(labels, labels), rank(dist, self_index=range(50)))
    per_query = per_query_metrics(ranked, (20,))
    assert per_query["wmap_at_20"].shape == (50,)
    assert float(per_query["ndcg_at_20"].mean()) == pytest.approx(full["ndcg_at_20"])
    with pytest.raises(ValueError, match="multi_label"):
        evaluate_codes(codes, codes, labels, labels, multi_label=False)


def test_descriptor_distances_cosine_and_euclidean() -> None:
    q = np.array([[1.0, 0.0], [0.0, 0.0]])
    d = np.array([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]])
    np.testing.assert_allclose(descriptor_distances(q, d, "cosine"), [[0, 1, 2], [1, 1, 1]])
    np.testing.assert_allclose(descriptor_distances(q, d), [[1, math.sqrt(10), 2], [2, 3, 1]])


# ----------------------------------------------------------------------------- plots


def test_save_pr_curve_writes_a_png(tmp_path: Path) -> None:
    dist = np.array([[0, 1, 1, 3], [2, 2, 3, 1]])
    rel = np.array([[1, 0, 1, 1], [0, 1, 0, 1]])
    curve = pr_curve(dist, rel, bits=3)
    out = save_pr_curve({"toy": curve, "ideal": ([1, 1], [0, 1])}, tmp_path / "figs" / "pr.png")
    assert out == tmp_path / "figs" / "pr.png"
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000
