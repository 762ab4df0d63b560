"""Per-label statistics against a direct numpy computation."""

import numpy as np
import pytest

from DCEPKFittingLib.analysis.stats import label_statistics, summarize, write_table
from DCEPKFittingLib.core.errors import DCEPKInputError


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
    from DCEPKFittingLib.analysis.stats import check_label_map
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


def test_statistics_over_fitted_voxels_with_counts_per_status():
    """With a fit's status map: the statistics of the fit's maps are over its fitted voxels only
    (a voxel at a bound holds a limit, not an estimate), every row counts the label's voxels per
    status, and maps that are not the fit's (a ground truth) keep all their voxels."""
    from DCEPKFittingLib.kinetics.fit_result import FitStatus
    labels = np.array([[[1, 1, 1, 1, 1, 2, 2, 2]]])
    status = np.array([[[FitStatus.FITTED, FitStatus.FITTED, FitStatus.AT_BOUND, FitStatus.NOT_ENHANCING,
                         FitStatus.INVALID_INPUT, FitStatus.FITTED, FitStatus.NOT_CONVERGED, FitStatus.MASKED]]])
    ktrans = np.array([[[0.1, 0.3, 5.0, 0.0, np.nan, 0.2, 3.0, np.nan]]])
    rows = label_statistics({"Ktrans": ktrans, "truth": np.ones(ktrans.shape)}, labels, status=status,
                            status_of=["Ktrans"])
    tumour = next(r for r in rows if r["label"] == 1 and r["map"] == "Ktrans")
    assert tumour["voxels"] == "fitted" and tumour["count"] == 2 and tumour["mean"] == pytest.approx(0.2)
    assert (tumour["n_fitted"], tumour["n_at_bound"], tumour["n_not_enhancing"], tumour["n_invalid_input"],
            tumour["n_not_converged"], tumour["n_masked"]) == (2, 1, 1, 1, 0, 0)
    other = next(r for r in rows if r["label"] == 2 and r["map"] == "Ktrans")
    assert other["count"] == 1 and other["mean"] == pytest.approx(0.2) and other["n_not_converged"] == 1
    truth = next(r for r in rows if r["label"] == 1 and r["map"] == "truth")
    assert truth["voxels"] == "all" and truth["count"] == 5
    with pytest.raises(DCEPKInputError, match="status map"):
        label_statistics({"Ktrans": ktrans}, labels, status=status[..., :4])


def test_dcepk_stats_uses_a_status_map_among_the_maps(tmp_path, capsys):
    from DCEPKFittingLib.core.geometry import Geometry
    from DCEPKFittingLib.io import write_volume
    from DCEPKFittingLib.kinetics.fit_result import FitStatus
    from DCEPKFittingLib.workflows.cli import main as dcepk
    labels = np.ones((1, 2, 2), np.uint8)
    write_volume(tmp_path / "labels.nii.gz", labels, Geometry())
    write_volume(tmp_path / "Ktrans.nii.gz", np.array([[[0.1, 0.3], [5.0, 0.0]]], np.float32), Geometry())
    status = np.array([[[FitStatus.FITTED, FitStatus.FITTED], [FitStatus.AT_BOUND, FitStatus.NOT_ENHANCING]]])
    write_volume(tmp_path / "status.nii.gz", status.astype(np.uint8), Geometry())
    assert dcepk(["stats", str(tmp_path / "Ktrans.nii.gz"), str(tmp_path / "status.nii.gz"),
                  "--labels", str(tmp_path / "labels.nii.gz")]) == 0
    header, row = capsys.readouterr().out.splitlines()[:2]
    values = dict(zip(header.split("\t"), row.split("\t")))
    assert values["voxels"] == "fitted" and float(values["mean"]) == pytest.approx(0.2)
    assert values["n_at_bound"] == "1" and values["n_not_enhancing"] == "1"
