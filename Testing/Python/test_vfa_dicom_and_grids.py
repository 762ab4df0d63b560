"""`dcepk t1map` on a multi-flip-angle DICOM folder (flip angles and TR from the headers, against a
known T1), and grids that differ only in a single-slice axis (issue 18)."""

import numpy as np
import pytest

from DCEPKFittingLib.core.errors import DCEPKInputError
from DCEPKFittingLib.core.geometry import Geometry, align_to_grid, check_same_grid
from DCEPKFittingLib.io import read_mask, read_vfa_dicom, read_volume, write_volume
from DCEPKFittingLib.workflows.cli import EXIT_INPUT_ERROR, main as dcepk
from test_dce_io import _write_dicom

FLIP_ANGLES, TR_MS = (2.0, 10.0, 20.0), 5.0
ROW_COSINE, COLUMN_COSINE = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])


def _vfa_folder(folder, t1_s, tr_ms=(TR_MS,) * 3, flip_angles=FLIP_ANGLES):
    """One DICOM series per flip angle, 2 slices of 6 x 8, SPGR signals of a known T1 (written
    here from the SPGR equation, S0 20000, stored as whole numbers)."""
    folder.mkdir()
    for n, (fa, tr) in enumerate(zip(flip_angles, tr_ms)):
        alpha = np.deg2rad(fa)
        e1 = np.exp(-tr / 1000.0 / t1_s)
        signal = 20000.0 * np.sin(alpha) * (1 - e1) / (1 - np.cos(alpha) * e1)
        for k in range(t1_s.shape[0]):
            _write_dicom(folder / f"fa{n}_{k}.dcm", np.rint(signal[k]), series_uid=f"1.2.3.{n}",
                         position=[-10.0, 20.0, 5.0 + 4.0 * k], orientation=np.r_[ROW_COSINE, COLUMN_COSINE],
                         pixel_spacing=(1.5, 1.25), instance=k + 1, fa=fa, tr_ms=tr, series_number=10 + n,
                         description=f"VFA {fa:g}", thickness=4.0)


def _truth():
    return np.linspace(0.4, 2.5, 2 * 6 * 8).reshape(2, 6, 8)


def test_t1map_reads_flip_angles_and_tr_from_the_dicom_headers(tmp_path, capsys):
    t1 = _truth()
    _vfa_folder(tmp_path / "vfa", t1)
    out = tmp_path / "t10.nii.gz"
    assert dcepk(["t1map", str(tmp_path / "vfa"), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "flip angles 2, 10, 20 deg (from the DICOM headers), TR 5 ms (from the DICOM headers)" in said
    fitted, geometry = read_volume(out)
    np.testing.assert_allclose(fitted, t1, rtol=0.01)   # whole-number signals: under 1 % off
    np.testing.assert_allclose(geometry.spacing, [1.25, 1.5, 4.0])
    # a value given on the command line wins over the header, and is said to be given
    assert dcepk(["t1map", str(tmp_path / "vfa"), "--tr", "0.005", "--out", str(tmp_path / "t.nii.gz")]) == 0
    assert "TR 5 ms (given)" in capsys.readouterr().out


def test_vfa_dicom_without_what_t1_mapping_needs_is_a_clear_error(tmp_path, capsys):
    t1 = _truth()
    _vfa_folder(tmp_path / "tr", t1, tr_ms=(5.0, 5.0, 6.0))
    with pytest.raises(DCEPKInputError, match="different repetition times"):
        read_vfa_dicom(tmp_path / "tr")
    _vfa_folder(tmp_path / "one", t1, flip_angles=(10.0, 10.0, 10.0))
    assert dcepk(["t1map", str(tmp_path / "one"), "--out", str(tmp_path / "x.nii.gz")]) == EXIT_INPUT_ERROR
    assert "two or more flip angles" in capsys.readouterr().err
    # files without headers need --fa and --tr, and the error says so
    write_volume(tmp_path / "a.nii.gz", np.ones((2, 6, 8), np.float32), Geometry())
    assert dcepk(["t1map", str(tmp_path / "a.nii.gz"), "--out", str(tmp_path / "y.nii.gz")]) == EXIT_INPUT_ERROR
    assert "--fa" in capsys.readouterr().err and not (tmp_path / "y.nii.gz").exists()


SERIES = Geometry(spacing=(0.8, 0.9, 3.0), origin_lps=(-12.0, 7.0, 30.0))


def test_single_slice_grids_differ_only_in_the_slice_spacing():
    # one-slice series (spacing between slices 3 mm) and a mask whose z spacing is SliceThickness
    thick = Geometry(spacing=(0.8, 0.9, 5.0), origin_lps=SERIES.origin_lps)
    check_same_grid((1, 4, 5), SERIES, (1, 4, 5), thick, "DCE series", "mask")
    # a 2-D mask's geometry (unit slice spacing, any normal) on the same pixels
    flipped = Geometry(spacing=(0.8, 0.9, 1.0), origin_lps=SERIES.origin_lps, direction_lps=np.diag([1.0, 1.0, -1.0]))
    check_same_grid((1, 4, 5), SERIES, (1, 4, 5), flipped, "DCE series", "mask")
    # but not on other pixels: half a voxel off in-plane, or another slice position
    off = Geometry(spacing=(0.8, 0.9, 5.0), origin_lps=SERIES.origin_lps + [0.4, 0.0, 0.0])
    with pytest.raises(DCEPKInputError, match="does not lie on the DCE series's voxel grid.*0.4 mm off"):
        check_same_grid((1, 4, 5), SERIES, (1, 4, 5), off, "DCE series", "mask")
    other_slice = Geometry(spacing=(0.8, 0.9, 5.0), origin_lps=SERIES.origin_lps + [0.0, 0.0, 3.0])
    with pytest.raises(DCEPKInputError, match="resample the mask"):
        check_same_grid((1, 4, 5), SERIES, (1, 4, 5), other_slice, "DCE series", "mask")
    # in-plane spacing still has to agree
    with pytest.raises(DCEPKInputError, match="spacing or orientation along i"):
        check_same_grid((1, 4, 5), SERIES, (1, 4, 5), Geometry(spacing=(0.7, 0.9, 3.0), origin_lps=SERIES.origin_lps),
                        "DCE series", "mask")


def test_a_one_slice_mask_is_placed_on_its_slice_of_the_series(tmp_path):
    mask = np.zeros((1, 4, 5), np.uint8)
    mask[0, 1:3, 2:4] = 1
    on_slice_2 = Geometry(spacing=(0.8, 0.9, 1.0), origin_lps=SERIES.origin_lps + [0.0, 0.0, 6.0])
    path = write_volume(tmp_path / "aif.nii.gz", mask, on_slice_2)
    placed = read_mask(path, SERIES, (4, 4, 5))
    assert placed.shape == (4, 4, 5) and placed.sum() == mask.sum()
    np.testing.assert_array_equal(placed[2], mask[0].astype(bool))
    # between two slices, or beyond the last: a clear error
    for dz in (4.5, 12.0):
        between = Geometry(spacing=(0.8, 0.9, 1.0), origin_lps=SERIES.origin_lps + [0.0, 0.0, dz])
        with pytest.raises(DCEPKInputError, match="voxel index .* of the DCE series"):
            align_to_grid(mask, between, (4, 4, 5), SERIES, "DCE series", "AIF mask")
    # a one-slice mask of another in-plane size is not "a slice of" the series
    with pytest.raises(DCEPKInputError, match="resample"):
        align_to_grid(np.zeros((1, 4, 6)), on_slice_2, (4, 4, 5), SERIES)
