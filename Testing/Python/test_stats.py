"""Per-label statistics against a direct numpy computation."""

import numpy as np
import pytest

from DCEPKFittingLib.errors import DCEPKInputError
from DCEPKFittingLib.stats import label_statistics, summarize, write_table


def test_label_statistics_match_numpy_and_ignore_nan():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, size=(4, 9, 7))
    ktrans = rng.gamma(2.0, 0.05, size=labels.shape)
    ktrans[0, 0, :3] = np.nan
    rows = label_statistics({"Ktrans": ktrans}, labels, {1: "tumour", 2: "wm", 3: "gm"})
    assert [r["label"] for r in rows] == [1, 2, 3]
    for row in rows:
        inside = ktrans[labels == row["label"]]
        finite = inside[np.isfinite(inside)]
        assert row["count"] == finite.size
        assert row["nan_count"] == inside.size - finite.size
        assert row["mean"] == pytest.approx(np.mean(finite))
        assert row["sd"] == pytest.approx(np.std(finite, ddof=1))
        assert row["median"] == pytest.approx(np.median(finite))
        q1, q3 = np.quantile(finite, [0.25, 0.75])
        assert row["iqr"] == pytest.approx(q3 - q1)
        assert row["p05"] == pytest.approx(np.quantile(finite, 0.05))
        assert row["p95"] == pytest.approx(np.quantile(finite, 0.95))
    assert rows[0]["segment"] == "tumour"


def test_all_nan_label_gives_nan_statistics_not_error():
    row = summarize(np.array([np.nan, np.nan]))
    assert row["count"] == 0 and row["nan_count"] == 2 and np.isnan(row["mean"])


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(DCEPKInputError, match="resample the label map"):
        label_statistics({"ve": np.zeros((2, 2, 2))}, np.zeros((2, 2, 3), int))


def test_write_table_refuses_to_overwrite(tmp_path):
    rows = label_statistics({"ve": np.arange(8.0).reshape(2, 2, 2)}, np.ones((2, 2, 2), int))
    path = write_table(rows, tmp_path / "stats.csv")
    text = path.read_text()
    assert text.splitlines()[0].startswith("label,segment,map,count")
    with pytest.raises(DCEPKInputError, match="exists"):
        write_table(rows, path)
    assert path.read_text() == text
    header, values = (line.split("\t") for line in write_table(rows, tmp_path / "s.tsv").read_text().splitlines())
    assert float(values[header.index("mean")]) == pytest.approx(3.5)


def test_label_maps_are_never_rounded_and_never_empty():
    from DCEPKFittingLib.stats import check_label_map
    ve = np.arange(8.0).reshape(2, 2, 2)
    with pytest.raises(DCEPKInputError, match="not whole numbers.*e.g. 0.5"):
        label_statistics({"ve": ve}, np.full((2, 2, 2), 0.5))  # np.rint made this all background
    with pytest.raises(DCEPKInputError, match="empty"):
        label_statistics({"ve": ve}, np.zeros((2, 2, 2), np.uint8))
    labels = check_label_map(np.array([[[0.0, 2.0], [3.0, 0.0]]] * 2))  # whole floats (NIfTI) are labels
    assert labels.dtype == np.int64 and sorted(np.unique(labels)) == [0, 2, 3]


def test_tables_are_written_only_in_the_formats_their_names_promise(tmp_path):
    rows = label_statistics({"ve": np.arange(8.0).reshape(2, 2, 2)}, np.ones((2, 2, 2), int))
    for name in ("stats.xlsx", "stats.ods", "stats"):
        with pytest.raises(DCEPKInputError, match=r"\.csv.*\.tsv"):
            write_table(rows, tmp_path / name)
    assert list(tmp_path.iterdir()) == []
    header = write_table(rows, tmp_path / "s.txt").read_text().splitlines()[0]
    assert header.split("\t")[:3] == ["label", "segment", "map"]
