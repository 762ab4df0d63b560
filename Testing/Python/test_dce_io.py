"""Tests of dce_io: readers and writers checked against independent truths.

Truths: arrays and geometry we generate ourselves and write with independent writers
(pydicom, nibabel); independent readers (pynrrd, nibabel, SimpleITK's DICOM series reader,
pydicom) on reference data and on our own output; the documented timing of the phantoms.
"""

import os
import random
from pathlib import Path

import numpy as np
import pytest
from conftest import import_or_skip

from DCEPKFittingLib.core.errors import DCEPKInputError
from DCEPKFittingLib.core.geometry import Geometry
from DCEPKFittingLib.io import DCESeries, read_dce, read_mask, read_volume, write_dce_series, write_maps, write_volume
from DCEPKFittingLib.io import sitk_images

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def rotation(a, b, c):
    """A proper rotation from three angles (radians): an oblique direction matrix."""
    ca, sa, cb, sb, cc, sc = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(c), np.sin(c)
    rz = np.array([[ca, -sa, 0], [sa, ca, 0], [0, 0, 1]])
    ry = np.array([[cb, 0, sb], [0, 1, 0], [-sb, 0, cb]])
    rx = np.array([[1, 0, 0], [0, cc, -sc], [0, sc, cc]])
    return rz @ ry @ rx


# Spacing and origin exactly representable in float32, because NIfTI stores them as float32.
OBLIQUE = Geometry(spacing=[0.75, 1.25, 2.5], origin_lps=[-12.5, 30.25, 7.0], direction_lps=rotation(0.3, -0.2, 0.5))


def assert_geometry(actual: Geometry, expected: Geometry, atol=1e-6):
    np.testing.assert_allclose(actual.spacing, expected.spacing, atol=atol)
    np.testing.assert_allclose(actual.origin_lps, expected.origin_lps, atol=atol)
    np.testing.assert_allclose(actual.direction_lps, expected.direction_lps, atol=atol)


def lps_affine(geometry: Geometry) -> np.ndarray:
    return geometry.ijk_to_lps()


# ---------------------------------------------------------------------------------------------
# Reference data: QIBA v6 DICOM and the PkModeling MultiVolume phantoms
# ---------------------------------------------------------------------------------------------

def test_qiba_v6_dicom_reads_as_1321_timed_frames(reference):
    import pydicom
    folder = reference("qiba_v6")
    series = read_dce(folder)
    assert series.signal.shape == (1, 80, 50, 1321)  # [k, j, i, t]: 80 rows, 50 columns, one slice
    np.testing.assert_allclose(series.times_s, np.arange(1321) * 0.5, atol=1e-9)
    assert series.times_s[-1] == pytest.approx(660.0)
    assert series.flip_angle_deg == pytest.approx(30.0)
    assert series.tr_s == pytest.approx(0.005)
    assert series.metadata["timing_source"] == "DICOM TriggerTime"
    # Pixel values against pydicom's own decoder, for the first, a middle and the last frame.
    for number in (1, 700, 1321):
        dataset = pydicom.dcmread(str(folder / f"QIBA_v06_Tofts_beta1_{number:04d}.dcm"))
        np.testing.assert_array_equal(series.signal[0, :, :, number - 1], dataset.pixel_array.astype(np.float32))
        np.testing.assert_allclose(series.geometry.origin_lps, [float(v) for v in dataset.ImagePositionPatient])
    # The phantom's AIF rows (70-79) enhance after injection, the header strip does not vary much.
    aif = series.signal[0, 70:80, :, :].mean(axis=(0, 1))
    assert aif.max() > 2 * aif[:10].mean()


DRO_FILES = {"DRO3min3secinf": (180, 3), "DRO3min5secinf": (180, 5), "DRO5min1secinf": (300, 1),
             "DRO5min3secinf": (300, 3), "DRO5min5secinf": (300, 5)}


def _pynrrd_read(path):
    import warnings

    import nrrd
    import nrrd.reader
    # The phantoms repeat "space" as a key:=value pair, which pynrrd refuses by default.
    previous = nrrd.reader.ALLOW_DUPLICATE_FIELD
    nrrd.reader.ALLOW_DUPLICATE_FIELD = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return nrrd.read(str(path))
    finally:
        nrrd.reader.ALLOW_DUPLICATE_FIELD = previous


def _pynrrd_lps_affine(header) -> np.ndarray:
    directions = np.asarray([d for d in header["space directions"] if d is not None and not np.any(np.isnan(d))],
                            dtype=float)
    origin = np.asarray(header["space origin"], dtype=float)
    to_lps = LPS_TO_RAS if header["space"] in ("right-anterior-superior", "RAS") else np.eye(3)
    affine = np.eye(4)
    affine[:3, :3] = to_lps @ directions.T
    affine[:3, 3] = to_lps @ origin
    return affine


@pytest.mark.parametrize("name", sorted(DRO_FILES))
def test_pkmodeling_multivolume_phantoms_timing_and_values(reference, name):
    path = reference("pkmodeling_dro", f"{name}.nrrd")
    duration_s, frame_s = DRO_FILES[name]
    series = read_dce(path)
    n_frames = duration_s // frame_s  # the file name: acquisition length and frame time
    assert series.n_frames == n_frames
    np.testing.assert_allclose(series.times_s, np.arange(n_frames) * frame_s, atol=1e-9)
    assert series.flip_angle_deg == pytest.approx(15.0)  # README: FA 15 deg, TR 5 ms
    assert series.tr_s == pytest.approx(0.005)
    # Independent reader: pynrrd gives [t, i, j, k] (NRRD axis order) and the raw header.
    data, header = _pynrrd_read(path)
    assert header["kinds"][0] == "list"
    np.testing.assert_array_equal(series.signal, np.transpose(data, (3, 2, 1, 0)))
    labels_ms = np.array([float(v) for v in header["MultiVolume.FrameLabels"].split(",")])
    np.testing.assert_allclose(series.times_s, labels_ms / 1000.0)
    np.testing.assert_allclose(series.geometry.ijk_to_lps(), _pynrrd_lps_affine(header), atol=1e-9)


def test_pkmodeling_masks_lie_on_the_series_grid(reference):
    series = read_dce(reference("pkmodeling_dro", "DRO3min5secinf.nrrd"))
    for name in ("DRO-AIF", "DRO-ROI"):
        path = reference("pkmodeling_dro", f"{name}.nrrd")
        mask = read_mask(path, series.geometry, series.spatial_shape)
        data, header = _pynrrd_read(path)
        np.testing.assert_array_equal(mask, np.transpose(data, (2, 1, 0)) != 0)
        assert mask.dtype == bool and mask.any()
    t1, geometry = read_volume(reference("pkmodeling_dro", "DRO-T1Map.nrrd"))
    assert t1.shape == series.spatial_shape and geometry.is_close(series.geometry)


# ---------------------------------------------------------------------------------------------
# Synthetic DICOM written with pydicom
# ---------------------------------------------------------------------------------------------

def _tm(seconds: float) -> str:
    hours, rest = divmod(seconds, 3600.0)
    minutes, secs = divmod(rest, 60.0)
    return f"{int(hours):02d}{int(minutes):02d}{secs:09.6f}"


def _write_dicom(path, pixels, *, series_uid, position, orientation, pixel_spacing, instance, fa=12.0, tr_ms=4.5,
                 acquisition_s=None, trigger_ms=None, content_s=None, slope=None, intercept=None,
                 series_number=7, description="dyn", date="20240101", thickness=2.5):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    ds.StudyInstanceUID = "1.2.3.4"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = description
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
    ds.ImageOrientationPatient = [f"{v:.8f}" for v in orientation]
    ds.PixelSpacing = [f"{v:g}" for v in pixel_spacing]
    ds.SliceThickness = thickness
    ds.FlipAngle = fa
    ds.RepetitionTime = tr_ms
    ds.AcquisitionDate = date
    ds.ContentDate = date
    ds.AcquisitionTime = _tm(acquisition_s if acquisition_s is not None else 36000.0)
    ds.ContentTime = _tm(content_s if content_s is not None else 40000.0)
    if trigger_ms is not None:
        ds.TriggerTime = trigger_ms
    if slope is not None:
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.astype("<u2").tobytes()
    _save_dicom(ds, path)


def _save_dicom(dataset, path):
    try:
        dataset.save_as(str(path), enforce_file_format=True)  # pydicom >= 3
    except TypeError:
        dataset.save_as(str(path), write_like_original=False)  # pydicom 2


class DicomTruth:
    def __init__(self, n_slices=3, n_frames=5, rows=4, columns=6, dt_s=2.5, slice_step_mm=3.0):
        self.rows, self.columns, self.n_slices, self.n_frames = rows, columns, n_slices, n_frames
        self.direction = rotation(0.4, 0.25, -0.3)
        self.row_cosine, self.column_cosine, self.normal = self.direction.T
        self.pixel_spacing = (0.8, 0.6)  # DICOM order: between rows (j), between columns (i)
        self.origin = np.array([-20.0, 15.5, 40.25])
        self.slice_step = slice_step_mm
        self.times_s = np.arange(n_frames) * dt_s
        rng = np.random.default_rng(3)
        self.stored = rng.integers(0, 4000, size=(n_slices, rows, columns, n_frames)).astype(np.uint16)

    def position(self, k):
        return self.origin + k * self.slice_step * self.normal

    @property
    def geometry(self):
        return Geometry(spacing=[self.pixel_spacing[1], self.pixel_spacing[0], self.slice_step],
                        origin_lps=self.origin, direction_lps=self.direction)

    def write(self, folder: Path, *, series_uid="1.2.3.4.5", timing="acquisition", slice_offset_s=0.0,
              slope=None, intercept=None, fa_per_frame=None, skip=(), series_number=7, name_prefix="",
              base_s=43200.0):
        folder.mkdir(parents=True, exist_ok=True)
        names = [f"{name_prefix}{n:05d}" for n in range(self.n_slices * self.n_frames)]
        random.Random(5).shuffle(names)  # file order says nothing about slice or frame order
        paths = []
        for k in range(self.n_slices):
            for t in range(self.n_frames):
                if (k, t) in skip:
                    continue
                path = folder / (names.pop() + ".dcm")
                kwargs = {}
                time_s = self.times_s[t] + k * slice_offset_s
                if timing == "acquisition":
                    kwargs["acquisition_s"] = base_s + time_s
                elif timing == "trigger":
                    kwargs["trigger_ms"] = round(time_s * 1000.0, 3)
                elif timing == "content":
                    kwargs["content_s"] = base_s + time_s
                _write_dicom(path, self.stored[k, :, :, t], series_uid=series_uid, position=self.position(k),
                             orientation=np.concatenate([self.row_cosine, self.column_cosine]),
                             pixel_spacing=self.pixel_spacing, instance=1 + t * self.n_slices + k,
                             slope=slope, intercept=intercept, series_number=series_number,
                             fa=fa_per_frame[t] if fa_per_frame is not None else 12.0, **kwargs)
                paths.append(path)
        return paths


def test_dicom_multislice_series_sorted_timed_and_placed(tmp_path):
    truth = DicomTruth()
    paths = truth.write(tmp_path / "dyn", slope=2.0, intercept=-10.0)
    series = read_dce(tmp_path / "dyn")
    assert series.signal.shape == (3, 4, 6, 5)
    np.testing.assert_allclose(series.signal, truth.stored.astype(np.float64) * 2.0 - 10.0)
    np.testing.assert_allclose(series.times_s, truth.times_s, atol=1e-6)
    assert series.flip_angle_deg == pytest.approx(12.0) and series.tr_s == pytest.approx(0.0045)
    assert series.metadata["timing_source"] == "DICOM AcquisitionTime"
    assert_geometry(series.geometry, truth.geometry, atol=1e-5)  # DICOM stores text with 6-8 decimals
    # A list of the same files, shuffled, gives the same series.
    shuffled = list(paths)
    random.Random(1).shuffle(shuffled)
    again = read_dce(shuffled)
    np.testing.assert_array_equal(again.signal, series.signal)
    np.testing.assert_array_equal(again.times_s, series.times_s)


def test_dicom_geometry_matches_simpleitk_series_reader(tmp_path):
    import SimpleITK as sitk
    truth = DicomTruth(n_frames=3)
    truth.write(tmp_path / "dyn", timing="trigger")
    series = read_dce(tmp_path / "dyn")
    # Independent reader: GDCM/ITK on the files of frame 0 only.
    first_frame = tmp_path / "frame0"
    truth.n_frames = 1
    truth.write(first_frame, timing="trigger")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(first_frame)))
    image = reader.Execute()
    np.testing.assert_allclose(series.geometry.spacing, image.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(series.geometry.origin_lps, image.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(series.geometry.direction_lps.ravel(), image.GetDirection(), atol=1e-5)
    np.testing.assert_array_equal(series.signal[..., 0], sitk.GetArrayFromImage(image))
    # The single-frame folder reads as one volume, on the same grid.
    volume, geometry = read_volume(first_frame)
    np.testing.assert_array_equal(volume, sitk.GetArrayFromImage(image))
    assert geometry.is_close(series.geometry, 1e-9)


def test_dicom_2d_multislice_slice_times_are_grouped_into_frames(tmp_path):
    # Each slice is acquired 0.4 s after the previous one within a frame: frames still group
    # correctly, and the frame time is the mean of its slices' times (relative to frame 0).
    truth = DicomTruth(n_slices=4, dt_s=3.0)
    truth.write(tmp_path / "dyn", slice_offset_s=0.4)
    series = read_dce(tmp_path / "dyn")
    np.testing.assert_array_equal(series.signal, truth.stored.astype(np.float32))
    np.testing.assert_allclose(series.times_s, truth.times_s, atol=1e-6)
    assert series.metadata["frame_time_spread_s"] == pytest.approx(1.2, abs=1e-6)


def test_dicom_acquisition_time_across_midnight(tmp_path):
    truth = DicomTruth(n_slices=1, n_frames=6, dt_s=2.0)
    folder = tmp_path / "dyn"
    folder.mkdir()
    for t in range(truth.n_frames):
        clock = 86395.0 + t * 2.0  # 23:59:55 onwards
        date = "20240101" if clock < 86400.0 else "20240102"
        _write_dicom(folder / f"f{t}.dcm", truth.stored[0, :, :, t], series_uid="1.9", position=truth.position(0),
                     orientation=np.concatenate([truth.row_cosine, truth.column_cosine]),
                     pixel_spacing=truth.pixel_spacing, instance=t + 1, acquisition_s=clock % 86400.0, date=date)
    series = read_dce(folder)
    np.testing.assert_allclose(series.times_s, np.arange(6) * 2.0, atol=1e-6)


def test_dicom_trigger_time_used_when_acquisition_time_is_constant(tmp_path):
    truth = DicomTruth(n_slices=2, n_frames=4, dt_s=1.5)
    truth.write(tmp_path / "dyn", timing="trigger")
    series = read_dce(tmp_path / "dyn")
    assert series.metadata["timing_source"] == "DICOM TriggerTime"
    np.testing.assert_allclose(series.times_s, truth.times_s, atol=1e-9)
    np.testing.assert_array_equal(series.signal, truth.stored.astype(np.float32))


def test_dicom_acquisition_time_wins_over_content_time(tmp_path):
    # ContentTime (when the image was reconstructed) varies too, in another order: the documented
    # order (AcquisitionTime, TriggerTime, ContentTime) must pick AcquisitionTime.
    truth = DicomTruth(n_slices=1, n_frames=5, dt_s=2.0)
    folder = tmp_path / "dyn"
    folder.mkdir()
    for t in range(truth.n_frames):
        _write_dicom(folder / f"f{t}.dcm", truth.stored[0, :, :, t], series_uid="1.8", position=truth.position(0),
                     orientation=np.concatenate([truth.row_cosine, truth.column_cosine]),
                     pixel_spacing=truth.pixel_spacing, instance=t + 1, acquisition_s=36000.0 + 2.0 * t,
                     content_s=50000.0 - 7.0 * t)
    series = read_dce(folder)
    assert series.metadata["timing_source"] == "DICOM AcquisitionTime"
    np.testing.assert_array_equal(series.signal, truth.stored.astype(np.float32))
    np.testing.assert_allclose(series.times_s, [0.0, 2.0, 4.0, 6.0, 8.0], atol=1e-6)


def _trigger_series(folder: Path, triggers_ms):
    truth = DicomTruth(n_slices=1, n_frames=len(triggers_ms))
    folder.mkdir()
    for t, trigger in enumerate(triggers_ms):
        _write_dicom(folder / f"f{t}.dcm", truth.stored[0, :, :, t], series_uid="1.7", position=truth.position(0),
                     orientation=np.concatenate([truth.row_cosine, truth.column_cosine]),
                     pixel_spacing=truth.pixel_spacing, instance=t + 1, trigger_ms=trigger)
    return truth


def test_dicom_first_frame_without_trigger_time_is_time_zero(tmp_path):
    # As in the QIBA v6 phantom: the first frame's TriggerTime is absent and means 0 ms.
    truth = _trigger_series(tmp_path / "dyn", [None, 500, 1000, 1500])
    series = read_dce(tmp_path / "dyn")
    np.testing.assert_allclose(series.times_s, [0.0, 0.5, 1.0, 1.5])
    np.testing.assert_array_equal(series.signal, truth.stored.astype(np.float32))
    assert any("TriggerTime" in note for note in series.metadata["notes"])


def test_dicom_trigger_time_missing_mid_series_is_not_guessed(tmp_path):
    _trigger_series(tmp_path / "dyn", [0, 1000, None, 3000])
    with pytest.raises(DCEPKInputError, match=r"TriggerTime.*--times"):
        read_dce(tmp_path / "dyn")


def test_dicom_without_timing_needs_times_and_is_then_ordered_by_instance(tmp_path):
    truth = DicomTruth(n_slices=2, n_frames=4)
    truth.write(tmp_path / "dyn", timing="none")
    with pytest.raises(DCEPKInputError, match=r"--times.*--dt"):
        read_dce(tmp_path / "dyn")
    series = read_dce(tmp_path / "dyn", dt_s=4.0)
    np.testing.assert_allclose(series.times_s, [0.0, 4.0, 8.0, 12.0])
    np.testing.assert_array_equal(series.signal, truth.stored.astype(np.float32))
    given = read_dce(tmp_path / "dyn", times_s=[0.0, 1.0, 5.0, 6.5])
    np.testing.assert_array_equal(given.times_s, [0.0, 1.0, 5.0, 6.5])


def test_dicom_mixed_series_named_and_selectable(tmp_path):
    truth = DicomTruth(n_slices=2, n_frames=3)
    folder = tmp_path / "mixed"
    truth.write(folder, series_uid="1.2.3.100", series_number=5, name_prefix="a")
    truth.write(folder, series_uid="1.2.3.200", series_number=9, name_prefix="b")
    with pytest.raises(DCEPKInputError) as error:
        read_dce(folder)
    message = str(error.value)
    assert "mixes 2 DICOM series" in message and "1.2.3.100" in message and "1.2.3.200" in message
    assert "series_uid" in message
    series = read_dce(folder, series_uid="1.2.3.200")
    assert series.metadata["series_instance_uid"] == "1.2.3.200" and series.n_frames == 3
    with pytest.raises(DCEPKInputError, match="no series with SeriesInstanceUID 1.2.3.999"):
        read_dce(folder, series_uid="1.2.3.999")


def test_dicom_one_series_per_time_point_read_with_all(tmp_path):
    truth = DicomTruth(n_slices=2, n_frames=4, dt_s=6.0)
    folder = tmp_path / "split"
    for t in range(truth.n_frames):  # one series per time point, as some scanners store dynamics
        single = DicomTruth(n_slices=2, n_frames=1)
        single.stored = truth.stored[..., t:t + 1]
        single.times_s = truth.times_s[t:t + 1]
        single.write(folder, series_uid=f"1.2.3.{t + 1}", series_number=10 + t, name_prefix=f"s{t}_")
    with pytest.raises(DCEPKInputError, match="series_uid=all"):
        read_dce(folder)
    series = read_dce(folder, series_uid="all")
    np.testing.assert_array_equal(series.signal, truth.stored.astype(np.float32))
    np.testing.assert_allclose(series.times_s, truth.times_s, atol=1e-6)


def test_dicom_two_images_per_time_point_are_reported(tmp_path):
    truth = DicomTruth(n_slices=2, n_frames=3)
    truth.write(tmp_path / "dyn", name_prefix="magnitude")
    truth.write(tmp_path / "dyn", name_prefix="copy")  # same series, same times: duplicates
    with pytest.raises(DCEPKInputError, match="several images per time point"):
        read_dce(tmp_path / "dyn", dt_s=1.0)


def test_dicom_missing_frame_file_is_reported(tmp_path):
    truth = DicomTruth(n_slices=3, n_frames=4)
    truth.write(tmp_path / "dyn", skip={(1, 2)})
    with pytest.raises(DCEPKInputError, match="not the same number of images"):
        read_dce(tmp_path / "dyn")


def test_dicom_missing_slice_is_reported(tmp_path):
    truth = DicomTruth(n_slices=4, n_frames=3)
    truth.write(tmp_path / "dyn", skip={(2, t) for t in range(3)})
    with pytest.raises(DCEPKInputError, match="not evenly spaced"):
        read_dce(tmp_path / "dyn")


def test_dicom_variable_flip_angle_series_is_not_dce(tmp_path):
    truth = DicomTruth(n_slices=1, n_frames=3)
    truth.write(tmp_path / "vfa", fa_per_frame=[2.0, 10.0, 15.0])
    with pytest.raises(DCEPKInputError, match="variable-flip-angle"):
        read_dce(tmp_path / "vfa")


def test_single_dicom_file_asks_for_the_folder(tmp_path):
    paths = DicomTruth(n_slices=1, n_frames=3).write(tmp_path / "dyn")
    with pytest.raises(DCEPKInputError, match="single DICOM image: give the folder"):
        read_dce(paths[0])
    with pytest.raises(DCEPKInputError, match="1 frame.*at least 3"):
        read_dce(paths[:1])


def test_empty_and_non_dicom_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DCEPKInputError, match="is empty"):
        read_dce(tmp_path / "empty")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("not an image")
    with pytest.raises(DCEPKInputError, match="no DICOM images"):
        read_dce(other)


def test_dicom_enhanced_multiframe_file(tmp_path):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import EnhancedMRImageStorage, ExplicitVRLittleEndian, generate_uid
    truth = DicomTruth(n_slices=2, n_frames=4, dt_s=5.0)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = EnhancedMRImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = EnhancedMRImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    ds.SeriesInstanceUID = "1.5.6"
    ds.Rows, ds.Columns = truth.rows, truth.columns
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = list(truth.pixel_spacing)
    measures.SliceThickness = truth.slice_step
    orientation = Dataset()
    orientation.ImageOrientationPatient = [float(v) for v in np.concatenate([truth.row_cosine, truth.column_cosine])]
    timing = Dataset()
    timing.FlipAngle = 25.0
    timing.RepetitionTime = 3.2
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.PlaneOrientationSequence = Sequence([orientation])
    shared.MRTimingAndRelatedParametersSequence = Sequence([timing])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames, order = [], [(k, t) for t in range(truth.n_frames) for k in range(truth.n_slices)]
    random.Random(2).shuffle(order)
    for k, t in order:
        group = Dataset()
        position = Dataset()
        position.ImagePositionPatient = [float(v) for v in truth.position(k)]
        content = Dataset()
        content.FrameAcquisitionDateTime = "20240101" + _tm(36000.0 + truth.times_s[t])
        content.TemporalPositionIndex = t + 1
        group.PlanePositionSequence = Sequence([position])
        group.FrameContentSequence = Sequence([content])
        frames.append(group)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.NumberOfFrames = len(order)
    ds.PixelData = np.stack([truth.stored[k, :, :, t] for k, t in order]).astype("<u2").tobytes()
    path = tmp_path / "enhanced.dcm"
    _save_dicom(ds, path)
    series = read_dce(path)
    np.testing.assert_array_equal(series.signal, truth.stored.astype(np.float32))
    np.testing.assert_allclose(series.times_s, truth.times_s, atol=1e-6)
    assert series.flip_angle_deg == pytest.approx(25.0) and series.tr_s == pytest.approx(0.0032)
    assert_geometry(series.geometry, truth.geometry, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# NIfTI
# ---------------------------------------------------------------------------------------------

def _nibabel_4d(path, data_kjit, geometry, dt, unit, toffset=0.0, version=1):
    import nibabel as nib
    data_ijkt = np.transpose(data_kjit, (2, 1, 0, 3))
    affine = lps_affine(geometry)
    affine[:3, :] = LPS_TO_RAS @ affine[:3, :]
    image = (nib.Nifti1Image if version == 1 else nib.Nifti2Image)(data_ijkt, affine)
    image.header.set_xyzt_units("mm", unit)
    zooms = list(image.header.get_zooms())
    zooms[3] = dt
    image.header.set_zooms(zooms)
    image.header["toffset"] = toffset
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, str(path))


@pytest.mark.parametrize("unit,dt,scale", [("sec", 2.5, 1.0), ("msec", 2500.0, 1e-3), ("usec", 2.5e6, 1e-6)])
def test_nifti_4d_timing_units_values_and_geometry(tmp_path, unit, dt, scale):
    data = np.random.default_rng(0).normal(100, 10, size=(3, 4, 5, 6)).astype(np.float32)
    path = tmp_path / "dce.nii.gz"
    _nibabel_4d(path, data, OBLIQUE, dt, unit, toffset=4.0 / scale)
    series = read_dce(path)
    np.testing.assert_array_equal(series.signal, data)
    np.testing.assert_allclose(series.times_s, 4.0 + np.arange(6) * 2.5, rtol=1e-12)
    assert_geometry(series.geometry, OBLIQUE)
    assert series.flip_angle_deg is None and series.tr_s is None


def test_nifti2_is_named_as_unsupported(tmp_path):
    path = tmp_path / "dce.nii.gz"
    _nibabel_4d(path, np.ones((1, 2, 2, 4), dtype=np.float32), OBLIQUE, 1.0, "sec", version=2)
    with pytest.raises(DCEPKInputError, match="NIfTI-2.*NIfTI-1"):
        read_dce(path)


def test_nifti_float32_interval_read_as_its_decimal(tmp_path):
    data = np.ones((1, 2, 2, 5), dtype=np.float32)
    path = tmp_path / "dce.nii"
    _nibabel_4d(path, data, OBLIQUE, 0.1, "sec")  # stored as float32 0.100000001
    np.testing.assert_array_equal(read_dce(path).times_s, np.arange(5) * 0.1)


def test_nifti_without_time_unit_asks_for_times(tmp_path):
    data = np.ones((2, 3, 4, 5), dtype=np.float32)
    path = tmp_path / "dce.nii"
    _nibabel_4d(path, data, OBLIQUE, 3.0, "unknown")
    with pytest.raises(DCEPKInputError, match=r"without a time unit.*--times.*--dt"):
        read_dce(path)
    series = read_dce(path, dt_s=3.0)
    np.testing.assert_allclose(series.times_s, [0, 3, 6, 9, 12])


def test_nifti_volume_round_trip_oblique(tmp_path):
    import nibabel as nib
    array = np.random.default_rng(1).normal(size=(3, 4, 5)).astype(np.float32)
    path = write_volume(tmp_path / "t1.nii.gz", array, OBLIQUE)
    back, geometry = read_volume(path)
    np.testing.assert_array_equal(back, array)
    assert_geometry(geometry, OBLIQUE)
    # Independent reader: nibabel's RAS affine of the same file.
    image = nib.load(str(path))
    np.testing.assert_allclose(image.affine, OBLIQUE.ijk_to_ras(), atol=1e-5)
    np.testing.assert_array_equal(np.transpose(np.asarray(image.dataobj), (2, 1, 0)), array)


# ---------------------------------------------------------------------------------------------
# NRRD and MultiVolume NRRD
# ---------------------------------------------------------------------------------------------

def test_nrrd_volume_round_trip_keeps_integer_labels(tmp_path):
    import nrrd
    labels = np.random.default_rng(2).integers(0, 5, size=(3, 4, 5)).astype(np.int16)
    path = write_volume(tmp_path / "labels.nrrd", labels, OBLIQUE)
    back, geometry = read_volume(path)
    assert back.dtype == np.int16
    np.testing.assert_array_equal(back, labels)
    assert_geometry(geometry, OBLIQUE, atol=1e-12)
    data, header = nrrd.read(str(path))
    np.testing.assert_array_equal(np.transpose(data, (2, 1, 0)), labels)
    np.testing.assert_allclose(_pynrrd_lps_affine(header), OBLIQUE.ijk_to_lps(), atol=1e-12)


def test_multivolume_round_trip_exact(tmp_path):
    import nrrd
    import SimpleITK as sitk
    signal = np.random.default_rng(4).normal(200, 20, size=(2, 3, 4, 7))
    times = np.array([0.0, 1.1, 2.35, 3.3, 7.123456789, 10.0, 61.7])
    series = DCESeries(signal=signal, times_s=times, geometry=OBLIQUE, flip_angle_deg=17.5, tr_s=0.0042,
                       kind="concentration")
    path = write_dce_series(tmp_path / "dce.seq.nrrd", series)
    back = read_dce(path)
    np.testing.assert_array_equal(back.signal, signal)
    np.testing.assert_array_equal(back.times_s, times)
    assert_geometry(back.geometry, OBLIQUE, atol=1e-12)
    assert back.flip_angle_deg == 17.5 and back.tr_s == pytest.approx(0.0042, abs=1e-15)
    assert back.kind == "concentration"
    # What Slicer and PkModeling read: list axis first, frame labels in ms, FA in deg, TR in ms.
    data, header = nrrd.read(str(path))
    assert header["kinds"][0] == "list" and header["sizes"][0] == 7
    np.testing.assert_allclose([float(v) for v in header["MultiVolume.FrameLabels"].split(",")], times * 1000.0)
    assert header["MultiVolume.FrameIdentifyingDICOMTagUnits"] == "ms"
    assert float(header["MultiVolume.DICOM.RepetitionTime"]) == pytest.approx(4.2)
    assert float(header["MultiVolume.DICOM.FlipAngle"]) == 17.5
    np.testing.assert_allclose([float(v) for v in header["axis 0 index values"].split()], times)
    np.testing.assert_array_equal(np.transpose(data, (3, 2, 1, 0)), signal)
    image = sitk.ReadImage(str(path))  # ITK (PkModeling's reader) sees a vector image, one component per frame
    assert image.GetNumberOfComponentsPerPixel() == 7
    # Frame labels alone (an older Slicer file without the sequence index) give the same times.
    no_index = tmp_path / "labels_only.nrrd"
    text = path.read_bytes()
    header_end = text.index(b"\n\n")
    lines = [line for line in text[:header_end].split(b"\n") if not line.startswith(b"axis 0 index")]
    no_index.write_bytes(b"\n".join(lines) + text[header_end:])
    np.testing.assert_allclose(read_dce(no_index).times_s, times, rtol=1e-12)


def test_slicer_reads_our_sequence_and_we_read_slicers(tmp_path):
    """Round trip through the real Slicer volume-sequence storage node (slicer-core wheel)."""
    slicer = import_or_skip("slicer", "slicer-core (pip install slicer-core) checks Slicer compatibility")
    from vtkmodules.util.numpy_support import vtk_to_numpy
    from vtkmodules.vtkCommonMath import vtkMatrix4x4
    signal = np.random.default_rng(8).normal(size=(2, 3, 4, 5)).astype(np.float32)
    times = [0.0, 1.5, 3.0, 4.5, 9.0]
    path = write_dce_series(tmp_path / "ours.seq.nrrd",
                            DCESeries(signal=signal, times_s=times, geometry=OBLIQUE, flip_angle_deg=12.0, tr_s=0.004))
    scene = slicer.vtkMRMLScene()
    sequence = slicer.vtkMRMLSequenceNode()
    scene.AddNode(sequence)
    storage = slicer.vtkMRMLVolumeSequenceStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(sequence) == 1
    assert sequence.GetNumberOfDataNodes() == 5
    assert (sequence.GetIndexName(), sequence.GetIndexUnit()) == ("time", "s")
    assert [float(sequence.GetNthIndexValue(n)) for n in range(5)] == times
    assert sequence.GetAttribute("MultiVolume.FrameLabels") == "0,1500,3000,4500,9000"
    frame = sequence.GetNthDataNode(3)
    image = frame.GetImageData()
    values = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(image.GetDimensions()[::-1])
    np.testing.assert_array_equal(values, signal[..., 3])
    matrix = vtkMatrix4x4()
    frame.GetIJKToRASMatrix(matrix)
    np.testing.assert_allclose([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], OBLIQUE.ijk_to_ras(),
                               atol=1e-9)
    # Slicer writes the sequence back (its own layout: list axis last, "axis 3 index values").
    writer = slicer.vtkMRMLVolumeSequenceStorageNode()
    scene.AddNode(writer)
    writer.SetFileName(str(tmp_path / "slicer.seq.nrrd"))
    assert writer.WriteData(sequence) == 1
    back = read_dce(tmp_path / "slicer.seq.nrrd")
    np.testing.assert_array_equal(back.signal, signal)
    np.testing.assert_allclose(back.times_s, times)
    assert back.geometry.is_close(OBLIQUE, 1e-9) and back.flip_angle_deg == 12.0


def test_multivolume_indexed_by_flip_angle_is_not_dce(tmp_path):
    series = DCESeries(signal=np.ones((1, 2, 2, 3)), times_s=[2.0, 10.0, 15.0])
    path = write_dce_series(tmp_path / "vfa.nrrd", series)
    text = path.read_bytes()
    header_end = text.index(b"\n\n")
    lines = [line for line in text[:header_end].split(b"\n") if not line.startswith(b"axis 0 index")]
    lines = [b"MultiVolume.FrameIdentifyingDICOMTagName:=FlipAngle" if line.startswith(b"MultiVolume.FrameIdentifying"
             b"DICOMTagName") else b"MultiVolume.FrameIdentifyingDICOMTagUnits:=degrees" if line.startswith(
             b"MultiVolume.FrameIdentifyingDICOMTagUnits") else line for line in lines]
    path.write_bytes(b"\n".join(lines) + text[header_end:])
    with pytest.raises(DCEPKInputError, match="FlipAngle.*not a DCE series"):
        read_dce(path)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

def test_three_d_file_given_as_dce(tmp_path):
    path = write_volume(tmp_path / "t1.nii.gz", np.ones((2, 3, 4)), OBLIQUE)
    with pytest.raises(DCEPKInputError, match="single 3-D volume.*whole DCE series"):
        read_dce(path)


def test_too_few_frames(tmp_path):
    path = write_dce_series(tmp_path / "two.nrrd", DCESeries(signal=np.ones((1, 2, 2, 2)), times_s=[0.0, 1.0]))
    with pytest.raises(DCEPKInputError, match="2 frame.*at least 3"):
        read_dce(path)


def test_nonfinite_values_counted_and_kept_on_request(tmp_path):
    signal = np.ones((1, 2, 3, 4))
    signal[0, 0, 0, 1] = np.nan
    signal[0, 1, 2, :2] = np.inf
    path = write_dce_series(tmp_path / "nan.nrrd", DCESeries(signal=signal, times_s=[0.0, 1.0, 2.0, 3.0]))
    with pytest.raises(DCEPKInputError, match=r"3 NaN/inf values \(in 2 voxels\).*nonfinite='keep'"):
        read_dce(path)
    series = read_dce(path, nonfinite="keep")  # kept as they are: never replaced by a number
    np.testing.assert_array_equal(np.isfinite(series.signal), np.isfinite(signal))
    assert series.metadata["nonfinite_values"] == 3 and series.metadata["nonfinite_voxels"] == 2


def test_unknown_missing_and_bad_timing_inputs(tmp_path):
    text = tmp_path / "series.txt"
    text.write_text("1 2 3")
    with pytest.raises(DCEPKInputError, match="unknown file type"):
        read_dce(text)
    with pytest.raises(DCEPKInputError, match="does not exist"):
        read_dce(tmp_path / "nowhere.nii.gz")
    path = write_dce_series(tmp_path / "ok.nrrd", DCESeries(signal=np.ones((1, 1, 2, 4)), times_s=[0, 1, 2, 3]))
    with pytest.raises(DCEPKInputError, match="increase strictly"):
        read_dce(path, times_s=[0.0, 2.0, 2.0, 3.0])
    with pytest.raises(DCEPKInputError, match="3 frame times given for the 4 frames"):
        read_dce(path, times_s=[0.0, 1.0, 2.0])
    with pytest.raises(DCEPKInputError, match="not both"):
        read_dce(path, times_s=[0, 1, 2, 3], dt_s=1.0)
    with pytest.raises(DCEPKInputError, match="positive"):
        read_dce(path, dt_s=0.0)
    with pytest.raises(DCEPKInputError, match="NaN or inf"):
        read_dce(path, times_s=[0.0, 1.0, np.nan, 3.0])
    # the file's own timing (0, 1, 2, 3 s) is not silently replaced by a different one
    with pytest.raises(DCEPKInputError, match=r"stores its own frame times.*0, 1, 2, 3 s.*override_file_timing"):
        read_dce(path, dt_s=2.0)
    assert read_dce(path, dt_s=1.0).metadata["timing_source"] == "dt_s given (--dt)"  # the same times: fine
    overridden = read_dce(path, dt_s=2.0, override_file_timing=True)
    np.testing.assert_array_equal(overridden.times_s, [0.0, 2.0, 4.0, 6.0])
    np.testing.assert_array_equal(overridden.metadata["file_times_s"], [0.0, 1.0, 2.0, 3.0])


def test_colour_and_vector_images_are_not_series(tmp_path):
    import nibabel as nib
    rgb = tmp_path / "photo.nrrd"
    rgb.write_bytes(b"NRRD0004\ntype: uint8\ndimension: 4\nsizes: 3 2 2 1\nkinds: RGB-color domain domain domain\n"
                    b"endian: little\nencoding: raw\n\n" + bytes(12))
    with pytest.raises(DCEPKInputError, match="RGB-color image.*not a dynamic series"):
        read_dce(rgb, dt_s=1.0)
    vector = tmp_path / "vector.nii.gz"
    image = nib.Nifti1Image(np.zeros((2, 2, 2, 1, 3), dtype=np.float32), np.eye(4))
    nib.save(image, str(vector))
    with pytest.raises(DCEPKInputError, match="5-D image is neither"):
        read_dce(vector, dt_s=1.0)
    image.header.set_intent("vector")
    nib.save(image, str(vector))
    with pytest.raises(DCEPKInputError, match="3 values per voxel.*not frames"):
        read_dce(vector, dt_s=1.0)


def test_metaimage_series_needs_times(tmp_path):
    import SimpleITK as sitk
    path = tmp_path / "dce.mha"
    frames = np.random.default_rng(6).normal(size=(4, 2, 3, 5)).astype(np.float32)  # [t, k, j, i]
    sitk.WriteImage(sitk.JoinSeries([sitk.GetImageFromArray(frame) for frame in frames]), str(path))  # scalar 4-D
    with pytest.raises(DCEPKInputError, match="MetaImage.*--times"):
        read_dce(path)
    series = read_dce(path, dt_s=1.0)
    np.testing.assert_array_equal(series.signal, np.moveaxis(frames, 0, -1))


def test_mask_on_another_grid_or_not_a_mask(tmp_path):
    mask = np.zeros((3, 4, 5), dtype=np.uint8)
    mask[1, 2, 3] = 1
    shifted = Geometry(spacing=OBLIQUE.spacing, origin_lps=OBLIQUE.origin_lps + 1.0,
                       direction_lps=OBLIQUE.direction_lps)
    path = write_volume(tmp_path / "mask.nrrd", mask, shifted)
    with pytest.raises(DCEPKInputError, match="does not lie on the DCE series's voxel grid"):
        read_mask(path, OBLIQUE, (3, 4, 5))
    with pytest.raises(DCEPKInputError, match="resample"):
        read_mask(path, shifted, (3, 4, 6))
    np.testing.assert_array_equal(read_mask(path, shifted, (3, 4, 5)), mask.astype(bool))
    soft = write_volume(tmp_path / "prob.nii.gz", mask * 0.5, OBLIQUE)
    with pytest.raises(DCEPKInputError, match="non-integer"):
        read_mask(soft, OBLIQUE, (3, 4, 5))


# ---------------------------------------------------------------------------------------------
# Writing never overwrites or half-writes
# ---------------------------------------------------------------------------------------------

def test_write_volume_refuses_existing_target_and_leaves_it_unchanged(tmp_path):
    target = tmp_path / "map.nii.gz"
    target.write_bytes(b"user data")
    with pytest.raises(DCEPKInputError, match="already exists.*overwrite"):
        write_volume(target, np.zeros((2, 2, 2)), OBLIQUE)
    assert target.read_bytes() == b"user data"
    series_target = tmp_path / "s.nrrd"
    series_target.write_bytes(b"keep")
    with pytest.raises(DCEPKInputError, match="already exists"):
        write_dce_series(series_target, DCESeries(signal=np.ones((1, 1, 1, 3)), times_s=[0, 1, 2]))
    assert series_target.read_bytes() == b"keep"
    write_volume(target, np.full((2, 2, 2), 3.0), OBLIQUE, overwrite=True)
    np.testing.assert_array_equal(read_volume(target)[0], np.full((2, 2, 2), 3.0, dtype=np.float32))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.nii.gz", "s.nrrd"]  # no temporary left


def test_target_appearing_while_writing_is_not_clobbered(tmp_path, monkeypatch):
    target = tmp_path / "Ktrans.nii.gz"
    original = sitk_images._write_sitk_file

    def racing(temporary, suffix, array, geometry):
        original(temporary, suffix, array, geometry)
        target.write_bytes(b"written by another process meanwhile")

    monkeypatch.setattr(sitk_images, "_write_sitk_file", racing)
    with pytest.raises(DCEPKInputError, match="appeared while writing"):
        write_volume(target, np.ones((1, 2, 2)), OBLIQUE)
    assert target.read_bytes() == b"written by another process meanwhile"
    assert [p.name for p in tmp_path.iterdir()] == ["Ktrans.nii.gz"]


def test_write_maps_all_or_nothing(tmp_path):
    maps = {"Ktrans": np.full((2, 3, 4), 0.1), "ve": np.full((2, 3, 4), 0.3), "status": np.zeros((2, 3, 4), np.uint8)}
    out = tmp_path / "maps"
    out.mkdir()
    (out / "ve.nii.gz").write_bytes(b"earlier result")
    with pytest.raises(DCEPKInputError, match="1 output file.*ve.nii.gz"):
        write_maps(out, maps, OBLIQUE)
    assert sorted(p.name for p in out.iterdir()) == ["ve.nii.gz"]
    assert (out / "ve.nii.gz").read_bytes() == b"earlier result"
    written = write_maps(tmp_path / "new", maps, OBLIQUE, suffix=".nrrd")
    assert sorted(p.name for p in written) == ["Ktrans.nrrd", "status.nrrd", "ve.nrrd"]
    status, geometry = read_volume(tmp_path / "new" / "status.nrrd")
    assert status.dtype == np.uint8 and geometry.is_close(OBLIQUE, 1e-9)
    np.testing.assert_allclose(read_volume(tmp_path / "new" / "Ktrans.nrrd")[0], 0.1, rtol=1e-7)


def test_write_maps_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    import errno
    calls = []
    original = sitk_images._write_sitk_file

    def failing(temporary, suffix, array, geometry):
        calls.append(temporary)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        original(temporary, suffix, array, geometry)

    monkeypatch.setattr(sitk_images, "_write_sitk_file", failing)
    maps = {name: np.ones((1, 2, 2)) for name in ("a", "b", "c")}
    with pytest.raises(DCEPKInputError, match="no space left on the disk holding .*out.*nothing was changed"):
        write_maps(tmp_path / "out", maps, OBLIQUE)
    assert not (tmp_path / "out").exists()  # the folder it made is taken back too
    (tmp_path / "kept").mkdir()
    calls.clear()
    with pytest.raises(DCEPKInputError, match="no space left"):
        write_maps(tmp_path / "kept", maps, OBLIQUE)
    assert list((tmp_path / "kept").iterdir()) == []


def test_write_maps_publishing_failure_puts_back_every_earlier_file(tmp_path, monkeypatch):
    from DCEPKFittingLib.core.output_files import OutputSet
    original = OutputSet._publish

    def failing_last(self, temporary, target):
        if target.name.startswith("c"):
            raise OSError("rename failed")
        return original(self, temporary, target)

    monkeypatch.setattr(OutputSet, "_publish", failing_last)
    maps = {name: np.ones((1, 2, 2)) for name in ("a", "b", "c")}
    (tmp_path / "out").mkdir()
    with pytest.raises(DCEPKInputError, match="rename failed"):
        write_maps(tmp_path / "out", maps, OBLIQUE)
    assert list((tmp_path / "out").iterdir()) == []
    # with --overwrite, the files replaced before the failure get their earlier bytes back
    monkeypatch.setattr(OutputSet, "_publish", original)
    write_maps(tmp_path / "out", maps, OBLIQUE)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    monkeypatch.setattr(OutputSet, "_publish", failing_last)
    with pytest.raises(DCEPKInputError, match="rename failed"):
        write_maps(tmp_path / "out", {name: np.full((1, 2, 2), 7.0) for name in maps}, OBLIQUE, overwrite=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before


def test_write_maps_rejects_bad_names_and_shapes(tmp_path):
    with pytest.raises(DCEPKInputError, match="file name"):
        write_maps(tmp_path, {"../Ktrans": np.ones((1, 1, 1))}, OBLIQUE)
    with pytest.raises(DCEPKInputError, match="share one grid"):
        write_maps(tmp_path, {"a": np.ones((1, 1, 1)), "b": np.ones((1, 1, 2))}, OBLIQUE)
    with pytest.raises(DCEPKInputError, match="3-D"):
        write_volume(tmp_path / "x.nii.gz", np.ones((2, 2)), OBLIQUE)
    with pytest.raises(DCEPKInputError, match="cannot tell the format"):
        write_volume(tmp_path / "x.png", np.ones((2, 2, 2)), OBLIQUE)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Non-finite values kept, truncated files refused, writes verified (issue 17)
# ---------------------------------------------------------------------------------------------

def test_nan_and_inf_survive_every_reader(tmp_path):
    """SimpleITK's NIfTI reader (ITK 5.4) turns NaN and inf into 0; DCEPK reads the voxels itself."""
    import nibabel as nib
    values = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    values[0, 1, 2], values[2, 3, 4], values[1, 0, 0] = np.nan, np.inf, -np.inf
    for name in ("v.nii", "v.nii.gz", "v.nrrd", "v.mha"):
        back, _ = read_volume(write_volume(tmp_path / name, values, OBLIQUE))
        np.testing.assert_array_equal(back, values, err_msg=name)
    nib.save(nib.Nifti1Image(np.transpose(values, (2, 1, 0)), np.eye(4)), str(tmp_path / "nib.nii.gz"))
    np.testing.assert_array_equal(read_volume(tmp_path / "nib.nii.gz")[0], values)
    scaled = nib.Nifti1Image(np.transpose(np.arange(60, dtype=np.int16).reshape(3, 4, 5), (2, 1, 0)), np.eye(4))
    scaled.header.set_slope_inter(0.5, 10.0)  # scl_slope / scl_inter applied, as ITK does
    nib.save(scaled, str(tmp_path / "scaled.nii"))
    np.testing.assert_allclose(read_volume(tmp_path / "scaled.nii")[0], np.arange(60).reshape(3, 4, 5) * 0.5 + 10)


@pytest.mark.parametrize("name", ["s.nii", "s.nii.gz", "s.nrrd", "s.mha"])
def test_truncated_volumes_are_refused_with_expected_and_actual_sizes(tmp_path, name):
    import re
    path = write_volume(tmp_path / name, np.random.default_rng(1).normal(size=(6, 20, 30)), OBLIQUE)
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.truncate(size - size // 3)
    with pytest.raises(DCEPKInputError, match="is truncated") as error:
        read_volume(path)
    expected, actual = (int(n.replace(",", "")) for n in re.findall(r"([\d,]+) bytes", str(error.value)))
    assert expected == 6 * 20 * 30 * 4 and 0 <= actual < expected


def test_a_series_in_the_nrrd_layout_slicer_writes_reads_frame_by_frame(tmp_path):
    """Time as the slowest NRRD axis ([t, k, j, i] on disk) comes back as [k, j, i, t]."""
    import nrrd
    data = np.random.default_rng(3).normal(size=(4, 2, 3, 5)).astype(np.float32)  # [t, k, j, i]
    header = {"kinds": ["domain", "domain", "domain", "list"], "space": "left-posterior-superior",
              "space directions": np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [np.nan] * 3]), "space origin": [0, 0, 0],
              "encoding": "gzip"}
    nrrd.write(str(tmp_path / "t_last.nrrd"), np.transpose(data, (3, 2, 1, 0)), header)
    series = read_dce(tmp_path / "t_last.nrrd", dt_s=2.0)
    np.testing.assert_array_equal(series.signal, np.moveaxis(data, 0, -1))


def test_a_staged_file_that_reads_back_short_is_never_published(tmp_path, monkeypatch):
    target = tmp_path / "Ktrans.nii.gz"
    target.write_bytes(b"earlier")
    original = sitk_images._write_sitk_file

    def short(temporary, suffix, array, geometry):
        original(temporary, suffix, array, geometry)
        with open(temporary, "r+b") as handle:
            handle.truncate(temporary.stat().st_size - 10)

    monkeypatch.setattr(sitk_images, "_write_sitk_file", short)
    with pytest.raises(DCEPKInputError, match="written incomplete"):
        write_volume(target, np.ones((4, 5, 6)), OBLIQUE, overwrite=True)
    assert target.read_bytes() == b"earlier" and [p.name for p in tmp_path.iterdir()] == ["Ktrans.nii.gz"]


def test_temporaries_of_a_killed_process_are_swept_by_the_next_write(tmp_path):
    import subprocess
    import sys
    from DCEPKFittingLib.core.output_files import TEMP_PREFIX
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"{TEMP_PREFIX}{int(dead.stdout)}-abcd1234-Ktrans.nii.gz"
    stale.write_bytes(b"half a map")
    live = tmp_path / f"{TEMP_PREFIX}{os.getpid()}-abcd1234-ve.nii.gz"  # ours (or a live process's): kept
    live.write_bytes(b"being written")
    write_volume(tmp_path / "T10.nii.gz", np.ones((2, 2, 2)), OBLIQUE)
    assert not stale.exists() and live.exists()
