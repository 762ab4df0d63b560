"""MRML bridge against the real Slicer core libraries (slicer-core wheel, headless).

Truths are independent of the bridge: numpy geometry written out by hand, SimpleITK's reading of
the same NRRD file and its header text, and numpy statistics.
"""

import csv
import math
import re

import numpy as np
import pytest

from slicer_scene import slicer_scene  # noqa: F401  (fixture)

import slicer  # noqa: E402  (slicer_scene already required it)
import vtk  # noqa: E402

from DCEPKFittingLib import mrml as bridge  # noqa: E402
from DCEPKFittingLib.core.errors import DCEPKInputError  # noqa: E402
from DCEPKFittingLib.core.geometry import Geometry  # noqa: E402
from DCEPKFittingLib.io import DCESeries  # noqa: E402

DRO = ("pkmodeling_dro", "DRO3min5secinf.nrrd")


def _rotation(axis, angle_deg):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    x, y, z = axis
    c, s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    return np.array([[c + x * x * (1 - c), x * y * (1 - c) - z * s, x * z * (1 - c) + y * s],
                     [y * x * (1 - c) + z * s, c + y * y * (1 - c), y * z * (1 - c) - x * s],
                     [z * x * (1 - c) - y * s, z * y * (1 - c) + x * s, c + z * z * (1 - c)]])


OBLIQUE = Geometry(spacing=[0.9, 1.3, 2.5], origin_lps=[-12.0, 30.5, 7.25],
                   direction_lps=_rotation([0.3, -0.5, 0.8], 27.0))


def _ras_of_voxel(geometry: Geometry, i, j, k):
    """Position in RAS written from the definition: origin + direction @ (index * spacing), LPS -> RAS."""
    lps = geometry.origin_lps + geometry.direction_lps @ (np.array([i, j, k], float) * geometry.spacing)
    return np.array([-lps[0], -lps[1], lps[2]])


def _node_ijk_to_ras(node):
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _random_series(rng, shape=(4, 5, 6), n_frames=7):
    signal = rng.uniform(50, 500, size=shape + (n_frames,)).astype(np.float32)
    times = np.cumsum(rng.uniform(2.0, 6.0, size=n_frames))
    return DCESeries(signal=signal, times_s=times, geometry=OBLIQUE, flip_angle_deg=12.5, tr_s=0.0042)


# --------------------------------------------------------------------------- series <-> sequence
def test_oblique_series_round_trip_keeps_voxels_times_and_geometry(slicer_scene):
    rng = np.random.default_rng(1)
    series = _random_series(rng)
    sequence = bridge.sequence_from_series(slicer_scene.scene, series, "dce", slicer_scene.sequences_logic)

    # What Slicer holds: frame labels in ms, and each frame's IJK->RAS places voxels where the
    # hand-written geometry says.
    labels_ms = [float(v) for v in sequence.GetAttribute("MultiVolume.FrameLabels").split(",")]
    np.testing.assert_allclose(labels_ms, series.times_s * 1000.0, rtol=1e-5)
    frame = sequence.GetNthDataNode(3)
    matrix = _node_ijk_to_ras(frame)
    for ijk in [(0, 0, 0), (5, 0, 0), (2, 4, 3), (5, 4, 3)]:
        np.testing.assert_allclose(matrix @ np.r_[ijk, 1.0], np.r_[_ras_of_voxel(OBLIQUE, *ijk), 1.0], atol=1e-9)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(frame), series.signal[..., 3])

    back = bridge.series_from_sequence(sequence)
    np.testing.assert_array_equal(back.signal, series.signal)
    assert back.signal.dtype == np.float32
    np.testing.assert_allclose(back.times_s, series.times_s, rtol=1e-5)
    assert back.geometry.is_close(OBLIQUE, 1e-6)
    np.testing.assert_allclose(back.geometry.direction_lps, OBLIQUE.direction_lps, atol=1e-9)
    assert back.flip_angle_deg == pytest.approx(12.5)
    assert back.tr_s == pytest.approx(0.0042)
    assert back.kind == "signal"
    concentration = DCESeries(signal=series.signal / 100.0, times_s=series.times_s, geometry=OBLIQUE, kind="concentration")
    assert bridge.series_from_sequence(bridge.sequence_from_series(slicer_scene.scene, concentration, "C")).kind \
        == "concentration"

    # The browser made for display resolves to the same series.
    browsers = slicer_scene.nodes_by_class("vtkMRMLSequenceBrowserNode")
    assert len(browsers) == 1
    np.testing.assert_array_equal(bridge.series_from_sequence(browsers[0]).signal, series.signal)


@pytest.mark.parametrize("unit, seconds_per_unit", [("min", 60.0), ("ms", 1e-3), ("s", 1.0)])
def test_times_from_index_values_and_unit_when_no_frame_labels(slicer_scene, unit, seconds_per_unit):
    rng = np.random.default_rng(2)
    series = _random_series(rng, n_frames=5)
    sequence = bridge.sequence_from_series(slicer_scene.scene, series, "dce")
    sequence.RemoveAttribute("MultiVolume.FrameLabels")
    values = [0.0, 0.5, 1.25, 2.0, 3.5]
    for n, value in enumerate(values):
        sequence.UpdateIndexValue(sequence.GetNthIndexValue(n), f"{value}")
    sequence.SetIndexUnit(unit)
    np.testing.assert_allclose(bridge.series_from_sequence(sequence).times_s, np.array(values) * seconds_per_unit)


def test_sequence_without_timing_is_refused_with_a_clear_error(slicer_scene):
    series = _random_series(np.random.default_rng(3))
    sequence = bridge.sequence_from_series(slicer_scene.scene, series, "dce")
    sequence.RemoveAttribute("MultiVolume.FrameLabels")
    sequence.SetIndexUnit("")
    with pytest.raises(DCEPKInputError, match="no frame times"):
        bridge.series_from_sequence(sequence)
    sequence.SetIndexUnit("furlongs")
    with pytest.raises(DCEPKInputError, match="furlongs"):
        bridge.series_from_sequence(sequence)


def test_frames_on_different_grids_are_refused(slicer_scene):
    series = _random_series(np.random.default_rng(4))
    sequence = bridge.sequence_from_series(slicer_scene.scene, series, "dce")
    sequence.GetNthDataNode(2).SetSpacing(2.0, 2.0, 2.0)
    with pytest.raises(DCEPKInputError, match="frame 2"):
        bridge.series_from_sequence(sequence)


def test_a_plain_volume_is_not_a_series(slicer_scene):
    volume = slicer_scene.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "T1")
    with pytest.raises(DCEPKInputError, match="not a DCE series"):
        bridge.series_from_sequence(volume)


# --------------------------------------------------------------------------- PkModeling MultiVolume phantoms
def _header(path):
    text = open(path, "rb").read(4096).decode("latin-1")
    return dict(re.findall(r"^([^:#\n]+):=(.*)$", text, flags=re.M))


@pytest.mark.parametrize("name", ["DRO3min5secinf.nrrd", "DRO5min1secinf.nrrd", "DRO3min3secinf.nrrd"])
def test_pkmodeling_multivolume_nrrd_through_the_storage_node(slicer_scene, reference, name):
    import SimpleITK as sitk

    path = reference("pkmodeling_dro", name)
    header = _header(path)
    sequence = bridge.load_sequence(slicer_scene.scene, str(path))
    series = bridge.series_from_sequence(sequence)

    expected_times = np.array([float(v) for v in header["MultiVolume.FrameLabels"].split(",")]) / 1000.0
    np.testing.assert_allclose(series.times_s, expected_times)
    assert series.metadata["timing"] == "MultiVolume.FrameLabels"
    assert series.flip_angle_deg == pytest.approx(float(header["MultiVolume.DICOM.FlipAngle"]))
    assert series.tr_s == pytest.approx(float(header["MultiVolume.DICOM.RepetitionTime"]) / 1000.0)

    image = sitk.ReadImage(str(path))  # SimpleITK reads the frames as vector components: [k, j, i, t]
    np.testing.assert_allclose(series.signal, sitk.GetArrayFromImage(image).astype(np.float32))
    np.testing.assert_allclose(series.geometry.spacing, image.GetSpacing())
    np.testing.assert_allclose(series.geometry.origin_lps, image.GetOrigin(), atol=1e-9)
    np.testing.assert_allclose(series.geometry.direction_lps, np.reshape(image.GetDirection(), (3, 3)), atol=1e-9)


def test_pkmodeling_sequence_matches_the_core_file_reader(slicer_scene, reference):
    from DCEPKFittingLib import io as dce_io

    path = reference(*DRO)
    from_scene = bridge.series_from_sequence(bridge.load_sequence(slicer_scene.scene, str(path)))
    from_file = dce_io.read_dce(str(path))
    np.testing.assert_allclose(from_scene.signal, from_file.signal, rtol=1e-6)
    np.testing.assert_allclose(from_scene.times_s, from_file.times_s)
    assert from_scene.geometry.is_close(from_file.geometry)
    assert from_scene.flip_angle_deg == pytest.approx(from_file.flip_angle_deg)
    assert from_scene.tr_s == pytest.approx(from_file.tr_s)


# --------------------------------------------------------------------------- maps -> volume nodes
def test_maps_become_volume_nodes_with_the_source_geometry_and_rerun_updates_them(slicer_scene):
    scene = slicer_scene.scene
    rng = np.random.default_rng(5)
    ktrans = rng.gamma(2.0, 0.05, size=(4, 5, 6)).astype(np.float32)
    ktrans[0, 0, :3] = np.nan  # unfitted voxels must not break the display range
    ktrans[1, 1, 1] = 50.0  # one outlier must not wash out the window

    node = bridge.update_volume_from_array(scene, ktrans, OBLIQUE, "DCEPK Ktrans", units="1/min", map_name="Ktrans")
    np.testing.assert_allclose(_node_ijk_to_ras(node), OBLIQUE.ijk_to_ras(), atol=1e-12)
    np.testing.assert_allclose(_node_ijk_to_ras(node) @ np.r_[3, 2, 1, 1.0], np.r_[_ras_of_voxel(OBLIQUE, 3, 2, 1), 1])
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), ktrans)
    display = node.GetDisplayNode()
    finite = ktrans[np.isfinite(ktrans)]
    assert display.GetWindowLevelMin() == pytest.approx(np.percentile(finite, 1), rel=1e-5)
    assert display.GetWindowLevelMax() == pytest.approx(np.percentile(finite, 99), rel=1e-5)
    assert display.GetWindowLevelMax() < 50.0
    assert display.GetColorNode().GetName() in ("Inferno", "DCEPK Inferno")
    assert node.GetAttribute("DCEPK.Units") == "1/min"

    count = scene.GetNumberOfNodes()
    again = bridge.update_volume_from_array(scene, ktrans * 2, OBLIQUE, "DCEPK Ktrans",
                                            existing_node=bridge.find_output_node(scene, "DCEPK Ktrans"),
                                            map_name="Ktrans")
    assert again is node
    assert scene.GetNumberOfNodes() == count
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), ktrans * 2)

    r2 = bridge.update_volume_from_array(scene, rng.uniform(0, 1, (4, 5, 6)), OBLIQUE, "DCEPK R2", map_name="R2")
    assert r2.GetDisplayNode().GetColorNode().GetName() == "Grey"


def _displayed_rgba(node):
    """The RGBA image Slicer's display pipeline makes of a volume for the slice views (alpha 0: not drawn)."""
    from vtkmodules.util import numpy_support

    display = node.GetDisplayNode()
    display.SetInputImageDataConnection(node.GetImageDataConnection())
    display.UpdateImageDataPipeline()
    producer = display.GetOutputImageDataConnection().GetProducer()
    producer.Update()
    image = producer.GetOutputDataObject(0)
    rgba = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    return rgba.reshape(tuple(reversed(image.GetDimensions())) + (-1,))


def test_masked_and_failed_voxels_are_not_drawn_over_the_anatomy(slicer_scene):
    """Issue 16 item 7: NaN voxels (masked, failed, excluded) get alpha 0 in Slicer's own display pipeline;
    every voxel with a value is drawn. One helper for fitting and inference maps."""
    rng = np.random.default_rng(13)
    ktrans = rng.gamma(2.0, 0.05, size=(3, 4, 5)).astype(np.float32)
    ktrans[0, :2, :] = np.nan
    node = bridge.update_volume_from_array(slicer_scene.scene, ktrans, OBLIQUE, "DCEPK Ktrans", map_name="Ktrans")
    alpha = _displayed_rgba(node)[..., 3]
    np.testing.assert_array_equal(alpha == 0, np.isnan(ktrans))
    assert np.all(alpha[~np.isnan(ktrans)] == 255)
    full = bridge.update_volume_from_array(slicer_scene.scene, np.nan_to_num(ktrans), OBLIQUE, "DCEPK Ktrans",
                                           existing_node=node, map_name="Ktrans")
    assert np.all(_displayed_rgba(full)[..., 3] == 255)  # a rerun without NaN shows everything again


def test_the_fit_status_is_a_label_map_whose_table_is_the_status_enum(slicer_scene, monkeypatch):
    import enum

    from DCEPKFittingLib.kinetics.fit_result import FitStatus

    codes = np.array([int(s) for s in FitStatus], dtype=np.uint8)
    status = np.resize(codes, (2, 3, 4))
    node = bridge.update_volume_from_array(slicer_scene.scene, status, OBLIQUE, "DCEPK status", map_name="status")
    assert node.IsA("vtkMRMLLabelMapVolumeNode") and slicer.util.arrayFromVolume(node).dtype == np.uint8
    table = node.GetDisplayNode().GetColorNode()
    assert table.GetName() == bridge.STATUS_TABLE
    for member in FitStatus:
        assert table.GetColorName(int(member)) == member.name.lower().replace("_", " ")
    rgba = [0.0] * 4
    table.GetColor(int(FitStatus.MASKED), rgba)
    assert rgba[3] == 0.0  # masked voxels are transparent in the label layer
    colours = set()
    for member in FitStatus:
        table.GetColor(int(member), rgba)
        colours.add(tuple(rgba))
    assert len(colours) == len(FitStatus)

    # A status the core adds later appears without a change in the bridge.
    extended = enum.IntEnum("FitStatus", {**{m.name: int(m) for m in FitStatus}, "SOMETHING_NEW": 6})
    monkeypatch.setattr("DCEPKFittingLib.kinetics.fit_result.FitStatus", extended)
    table = bridge.status_colour_table(slicer_scene.scene)
    assert table.GetNumberOfColors() == 7 and table.GetColorName(6) == "something new"
    table.GetColor(6, rgba)
    assert rgba[3] == 1.0 and tuple(rgba) not in colours


def test_the_statistics_table_passes_through_every_column_the_core_returns(slicer_scene, monkeypatch):
    """The core's label statistics decide the columns (voxel counts per fit status, when the core gives
    them); the bridge only adds segment, label, map and unit, and hands the status map to a core that takes it."""
    seen = {}

    def core_with_status_counts(maps, labels, names, label_values=None, status=None):
        seen["status"] = status
        rows = []
        for value in label_values or [1]:
            for name, array in maps.items():
                inside = labels == value
                rows.append({"label": value, "segment": names[value], "map": name,
                             "count": int(np.isfinite(array[inside]).sum()),
                             "n_converged": int((status[inside] == 1).sum()),
                             "n_failed": int((status[inside] == 3).sum())})
        return rows

    monkeypatch.setattr(bridge.tables, "label_statistics", core_with_status_counts)
    status = np.zeros((2, 3, 4), np.uint8)
    status[0] = 1
    status[1, 0] = 3
    region = np.ones((2, 3, 4), bool)
    table = bridge.statistics_table(slicer_scene.scene, {"Ktrans": np.ones((2, 3, 4))}, {"brain": region}, "stats",
                                    units={"Ktrans": "1/min"}, status=status)
    assert seen["status"] is status
    names = [table.GetTable().GetColumn(c).GetName() for c in range(table.GetTable().GetNumberOfColumns())]
    assert names == ["segment", "label", "map", "unit", "count", "n_converged", "n_failed"]
    (row,) = bridge.table_rows(table)
    assert (row["n_converged"], row["n_failed"], row["unit"]) == (12.0, 4.0, "1/min")


# --------------------------------------------------------------------------- masks
def _reference_volume(scene, shape, geometry):
    return bridge.update_volume_from_array(scene, np.zeros(shape, np.float32), geometry, "reference",
                                           colour="Grey")


def _voxel_centres_ras(shape, geometry):
    k, j, i = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    return np.stack([_ras_of_voxel(geometry, a, b, c) for a, b, c in zip(i.ravel(), j.ravel(), k.ravel())])


def test_rotated_roi_selects_the_voxels_whose_centres_lie_in_the_box(slicer_scene):
    shape = (9, 12, 14)
    geometry = Geometry(spacing=[1.1, 0.9, 1.7], origin_lps=[-5.0, -4.0, -6.0],
                        direction_lps=_rotation([0.1, 0.2, 1.0], 12.0))
    reference = _reference_volume(slicer_scene.scene, shape, geometry)
    centre, size, rotation = np.array([1.5, 2.0, 3.0]), np.array([6.0, 4.5, 7.0]), _rotation([1.0, 1.0, 0.2], 35.0)
    roi = slicer_scene.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "AIF box")
    object_to_node = np.eye(4)
    object_to_node[:3, :3], object_to_node[:3, 3] = rotation, centre
    roi.SetAndObserveObjectToNodeMatrix(slicer.util.vtkMatrixFromArray(object_to_node))
    roi.SetSize(*size)

    mask = bridge.mask_from_roi(roi, reference)

    local = (_voxel_centres_ras(shape, geometry) - centre) @ rotation  # rows: R^T (p - c)
    expected = np.all(np.abs(local) <= size / 2, axis=1).reshape(shape)
    assert 10 < expected.sum() < expected.size / 4  # the case is not trivial
    np.testing.assert_array_equal(mask, expected)


def test_roi_under_a_linear_transform_moves_with_it(slicer_scene):
    shape = (6, 8, 8)
    reference = _reference_volume(slicer_scene.scene, shape, Geometry())
    roi = slicer_scene.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    roi.SetCenter(-3.0, -3.0, 2.0)  # RAS; voxel (i, j) sits at RAS (-i, -j)
    roi.SetSize(2.2, 2.2, 2.2)
    transform = slicer_scene.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = np.eye(4)
    shift[:3, 3] = [-2.0, 0.0, 1.0]
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(shift))
    roi.SetAndObserveTransformNodeID(transform.GetID())
    mask = bridge.mask_from_roi(roi, reference)
    expected = np.zeros(shape, bool)
    expected[2:5, 2:5, 4:7] = True  # centre moved to RAS (-5, -3, 3): i 4..6, j 2..4, k 2..4
    np.testing.assert_array_equal(mask, expected)


def _segmentation_from_labels(scene, labels, geometry):
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    bridge.volumes.set_image(labelmap, labels.astype(np.int16), geometry)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "tissues")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation)
    return segmentation, labelmap


def test_segment_masks_on_the_same_grid_are_the_painted_voxels(slicer_scene):
    shape = (5, 7, 9)
    rng = np.random.default_rng(6)
    labels = np.zeros(shape, np.int16)
    labels[1:4, 2:6, 3:8] = 1
    labels[rng.uniform(size=shape) < 0.1] = 2
    reference = _reference_volume(slicer_scene.scene, shape, OBLIQUE)
    segmentation, labelmap = _segmentation_from_labels(slicer_scene.scene, labels, OBLIQUE)
    ids = bridge.segment_ids(segmentation)
    assert len(ids) == 2
    for value, segment_id in zip((1, 2), ids):
        np.testing.assert_array_equal(bridge.mask_from_segment(segmentation, segment_id, reference), labels == value)
    np.testing.assert_array_equal(bridge.mask_from_labelmap(labelmap, reference), labels > 0)
    np.testing.assert_array_equal(bridge.mask_from_labelmap(labelmap, reference, label=2), labels == 2)


def test_segment_on_a_coarser_grid_is_resampled_by_nearest_voxel(slicer_scene):
    fine = Geometry(spacing=[1.0, 1.0, 1.0], origin_lps=[0.0, 0.0, 0.0])
    # Coarse voxel n is centred at fine position 2n + 0.5: no fine centre falls on a tie.
    coarse = Geometry(spacing=[2.0, 2.0, 2.0], origin_lps=[0.5, 0.5, 0.5])
    rng = np.random.default_rng(7)
    coarse_labels = (rng.uniform(size=(4, 4, 4)) < 0.4).astype(np.int16)
    reference = _reference_volume(slicer_scene.scene, (8, 8, 8), fine)
    segmentation, labelmap = _segmentation_from_labels(slicer_scene.scene, coarse_labels, coarse)
    mask = bridge.mask_from_segment(segmentation, bridge.segment_ids(segmentation)[0], reference)
    nearest = np.clip(np.round((np.arange(8) - 0.5) / 2.0).astype(int), 0, 3)
    expected = coarse_labels[np.ix_(nearest, nearest, nearest)] == 1
    np.testing.assert_array_equal(mask, expected)
    with pytest.raises(DCEPKInputError, match="resample"):
        bridge.mask_from_labelmap(labelmap, reference)


def test_reading_a_segment_does_not_change_the_segmentation(slicer_scene):
    labels = np.zeros((4, 4, 4), np.int16)
    labels[1:3, 1:3, 1:3] = 1
    reference = _reference_volume(slicer_scene.scene, labels.shape, Geometry())
    segmentation, _ = _segmentation_from_labels(slicer_scene.scene, labels, Geometry())
    before = segmentation.GetSegmentation().GetMTime(), slicer_scene.node_ids()
    bridge.mask_from_segment(segmentation, bridge.segment_ids(segmentation)[0], reference)
    assert (segmentation.GetSegmentation().GetMTime(), slicer_scene.node_ids()) == before


def test_mean_curve_in_mask_is_the_voxel_average(slicer_scene):
    series = _random_series(np.random.default_rng(8))
    mask = np.zeros(series.spatial_shape, bool)
    mask[1:3, 2:4, 0:2] = True
    np.testing.assert_allclose(bridge.mean_curve_in_mask(series, mask),
                               series.signal[1:3, 2:4, 0:2].reshape(-1, series.n_frames).mean(axis=0), rtol=1e-6)


# --------------------------------------------------------------------------- statistics table
def _numpy_stats(values):
    finite = values[np.isfinite(values)]
    q = np.percentile(finite, [5, 25, 50, 75, 95])
    return {"count": finite.size, "nan_count": values.size - finite.size, "mean": finite.mean(),
            "sd": finite.std(ddof=1), "median": q[2], "iqr": q[3] - q[1], "p05": q[0], "p95": q[4]}


def test_statistics_table_equals_numpy_and_rerun_updates_it(slicer_scene, tmp_path):
    scene = slicer_scene.scene
    rng = np.random.default_rng(9)
    shape = (4, 6, 8)
    maps = {"Ktrans": rng.gamma(2, 0.05, shape), "ve": rng.uniform(0.05, 0.6, shape)}
    maps["Ktrans"][0, :, :3] = np.nan
    tumour = np.zeros(shape, bool)
    tumour[:2, 1:5, 1:6] = True
    brain = np.zeros(shape, bool)
    brain[1:, :, 4:] = True  # overlaps the tumour on purpose: segments may overlap
    table = bridge.statistics_table(scene, maps, {"tumour": tumour, "brain": brain}, "stats",
                                    units={"Ktrans": "1/min", "ve": ""})
    rows = bridge.table_rows(table)
    assert len(rows) == 4
    for row in rows:
        region = {"tumour": tumour, "brain": brain}[row["segment"]]
        expected = _numpy_stats(maps[row["map"]][region])
        for column, value in expected.items():
            assert row[column] == pytest.approx(value, rel=1e-9, abs=1e-12), (row["segment"], row["map"], column)
    assert {row["unit"] for row in rows if row["map"] == "Ktrans"} == {"1/min"}

    count = scene.GetNumberOfNodes()
    maps2 = {"Ktrans": maps["Ktrans"] * 3}
    again = bridge.statistics_table(scene, maps2, {"tumour": tumour}, "stats", existing_table=table)
    assert again is table and scene.GetNumberOfNodes() == count
    assert bridge.table_rows(table)[0]["mean"] == pytest.approx(np.nanmean(maps["Ktrans"][tumour]) * 3)

    path = bridge.save_table_csv(scene, table, str(tmp_path / "stats.csv"))
    with open(path) as handle:
        written = list(csv.DictReader(handle))
    assert written[0]["segment"] == "tumour" and written[0]["map"] == "Ktrans"
    assert float(written[0]["mean"]) == pytest.approx(np.nanmean(maps["Ktrans"][tumour]) * 3, rel=1e-5)
    assert (tmp_path / "stats.schema.csv").is_file()   # Slicer's column types, published with the table
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(DCEPKInputError, match="exists"):
        bridge.save_table_csv(scene, table, path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before   # nothing changed, nothing left
    bridge.save_table_csv(scene, again, path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.csv", "stats.schema.csv"]


def test_a_failed_table_export_leaves_nothing_behind(slicer_scene, tmp_path, monkeypatch):
    """Issue 19: the CSV export went through a fixed '.partial' name, left behind when Slicer's writer
    failed half-way. Now the core's OutputSet stages it: a failure leaves the folder as it was."""
    scene = slicer_scene.scene
    table = bridge.table_from_rows(scene, [{"segment": "a", "mean": 1.0}], "stats")
    (tmp_path / "keep.txt").write_text("mine")

    class HalfWriter:   # writes part of the file, then reports the failure (a full disk)
        def SetScene(self, scene):
            pass

        def SetFileName(self, name):
            self.name = name

        def WriteData(self, node):
            with open(self.name, "w") as handle:
                handle.write("segment,me")
            return False

    monkeypatch.setattr(slicer, "vtkMRMLTableStorageNode", HalfWriter)
    with pytest.raises(DCEPKInputError, match="stats.csv"):
        bridge.save_table_csv(scene, table, str(tmp_path / "stats.csv"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_statistics_from_a_label_array_and_empty_segments(slicer_scene):
    rng = np.random.default_rng(10)
    values = rng.normal(size=(3, 4, 5))
    labels = np.zeros(values.shape, int)
    labels[0] = 3
    labels[2, :2] = 7
    rows = bridge.table_rows(bridge.statistics_table(slicer_scene.scene, {"R2": values},
                                                     (labels, {3: "white matter", 7: "tumour"})))
    assert [(r["segment"], r["label"]) for r in rows] == [("white matter", 3.0), ("tumour", 7.0)]
    assert rows[1]["median"] == pytest.approx(np.median(values[labels == 7]))
    with pytest.raises(DCEPKInputError, match="empty"):
        bridge.statistics_table(slicer_scene.scene, {"R2": values}, {"nothing": np.zeros(values.shape, bool)})


# --------------------------------------------------------------------------- helpers of the live plots
def test_voxel_under_a_ras_point_on_an_oblique_grid():
    shape = (4, 5, 6)
    for ijk in [(0, 0, 0), (5, 4, 3), (2, 1, 3)]:
        ras = _ras_of_voxel(OBLIQUE, *ijk)
        # A point a little off the centre (less than half a voxel) still belongs to the voxel.
        nudge = OBLIQUE.ijk_to_ras()[:3, :3] @ np.array([0.3, -0.4, 0.2])
        assert bridge.voxel_index_at_ras(OBLIQUE, shape, ras + nudge) == (ijk[2], ijk[1], ijk[0])
    assert bridge.voxel_index_at_ras(OBLIQUE, shape, _ras_of_voxel(OBLIQUE, 6, 0, 0)) is None
    assert bridge.voxel_index_at_ras(OBLIQUE, shape, _ras_of_voxel(OBLIQUE, 0, 0, -1)) is None


def test_live_plot_updates_in_place(slicer_scene):
    scene = slicer_scene.scene
    t = np.linspace(0, 120, 25)
    measured, fitted = np.sin(t / 30.0), np.cos(t / 30.0)
    chart = bridge.plot_curves(scene, "voxel", t, {"measured (mM)": measured, "fitted (mM)": fitted},
                               "time (s)", "concentration (mM)")
    count = scene.GetNumberOfNodes()
    assert chart.GetNumberOfPlotSeriesNodes() == 2
    table = scene.GetNodeByID(chart.GetAttribute("DCEPK.Table"))
    np.testing.assert_allclose(slicer.util.arrayFromTableColumn(table, "fitted (mM)"), fitted)
    np.testing.assert_allclose(slicer.util.arrayFromTableColumn(table, "time (s)"), t)
    again = bridge.plot_curves(scene, "voxel", t, {"measured (mM)": 2 * measured, "fitted (mM)": fitted},
                               "time (s)", "concentration (mM)", chart=chart)
    assert again is chart and scene.GetNumberOfNodes() == count
    np.testing.assert_allclose(slicer.util.arrayFromTableColumn(table, "measured (mM)"), 2 * measured)
    bridge.plot_curves(scene, "voxel", t, {"mean signal": measured}, "time (s)", "signal", chart=chart)
    assert chart.GetNumberOfPlotSeriesNodes() == 1 and scene.GetNumberOfNodes() == count - 1
    with pytest.raises(DCEPKInputError, match="points"):
        bridge.plot_curves(scene, "voxel", t, {"short": measured[:5]}, "time (s)", "signal", chart=chart)


def test_acquisition_parameters_come_from_the_series_attributes(slicer_scene):
    series = _random_series(np.random.default_rng(11))
    sequence = bridge.sequence_from_series(slicer_scene.scene, series, "dce")
    assert bridge.acquisition_from_sequence(sequence) == (pytest.approx(12.5), pytest.approx(0.0042))
    sequence.RemoveAttribute("MultiVolume.DICOM.FlipAngle")
    sequence.SetAttribute("MultiVolume.DICOM.RepetitionTime", "not a number")
    assert bridge.acquisition_from_sequence(sequence) == (None, None)


def test_unreadable_file_is_refused_and_leaves_no_nodes(slicer_scene, tmp_path):
    bad = tmp_path / "series.nrrd"
    bad.write_text("this is not an image")
    count = slicer_scene.scene.GetNumberOfNodes()
    with pytest.raises(DCEPKInputError, match="could not be read"):
        bridge.load_sequence(slicer_scene.scene, str(bad))
    assert slicer_scene.scene.GetNumberOfNodes() == count
    with pytest.raises(DCEPKInputError, match="does not exist"):
        bridge.load_sequence(slicer_scene.scene, str(tmp_path / "missing.nrrd"))


def test_the_displayed_proxy_volume_resolves_to_its_sequence(slicer_scene):
    series = _random_series(np.random.default_rng(12))
    sequence = bridge.sequence_from_series(slicer_scene.scene, series, "dce", slicer_scene.sequences_logic)
    browser = slicer_scene.nodes_by_class("vtkMRMLSequenceBrowserNode")[0]
    proxy = browser.GetProxyNode(sequence)
    assert proxy is not None and proxy.IsA("vtkMRMLScalarVolumeNode")
    np.testing.assert_array_equal(bridge.series_from_sequence(proxy).signal, series.signal)
