"""The module panels' state machine (``panel_state``), headless and without Slicer.

Truth: the panel rules of issue 16 as stated in ``panel_state``'s docstring: flip angle and TR
come from the header unless the user ticks an override; a value in neither place disables Apply
with a message naming the box to tick (never a 15 deg / 5 ms default); the VFA TR comes from the
VFA series; missing inputs, a deleted node, a deleted AIF segment and a running job each disable
Apply with their own reason; the widget-enable map names widgets that exist in the .ui files.
"""

from pathlib import Path
from types import SimpleNamespace

import pytest
from slicer_module_source import read_ui_widgets

from DCEPKFittingLib.panels.panel_state import (SeriesHeader, acquisition_values, fitting_panel, inference_panel,
                                                models_for_mode, parse_flip_angles)

ROOT = Path(__file__).resolve().parents[2]


class Node:
    """A referenced node as the panel sees it: truthy, with a name."""

    def __init__(self, name):
        self.name = name

    def GetName(self):
        return self.name


def fitting_parameters(**changes):
    p = SimpleNamespace(
        inputSequence=Node("DCE"), useFlipAngle=False, flipAngleDeg=15.0, useRepetitionTime=False,
        repetitionTimeMs=5.0, t10Mode="fixed", t10Value=1.4, t10Map=None, t10MapUnit="ms", vfaSequence=None,
        vfaFlipAngles="", useVfaRepetitionTime=False, vfaTrMs=5.0, aifSource="population", aifRoi=None,
        aifSegmentation=None, aifSegmentId="", aifCsvPath="", autoAifKind="either", bloodT10=0.0, model="etofts")
    for name, value in changes.items():
        setattr(p, name, value)
    return p


def inference_parameters(**changes):
    p = SimpleNamespace(
        inputSequence=Node("DCE"), modelName="hetero_encoder", useFlipAngle=False, flipAngleDeg=15.0,
        useRepetitionTime=False, repetitionTimeMs=5.0, t10Mode="fixed", t10Map=None, thresholdMode="none",
        compareWithFit=False, mode="aif-free", aifSource="auto", aifRoi=None, aifRoiLabel=0, aifCsvPath="")
    for name, value in changes.items():
        setattr(p, name, value)
    return p


HEADER = SeriesHeader(flip_angle_deg=12.0, tr_s=0.0042)
NO_HEADER = SeriesHeader()


def test_header_values_are_used_unless_the_user_ticks_an_override():
    fa, tr, _, described, missing = acquisition_values(fitting_parameters(), HEADER)
    assert (fa, tr, missing) == (12.0, 0.0042, [])  # not the spin boxes' 15 deg / 5 ms
    assert described == "flip angle 12 deg (series header); TR 4.2 ms (series header)"
    fa, tr, _, described, _ = acquisition_values(
        fitting_parameters(useFlipAngle=True, flipAngleDeg=20.0, useRepetitionTime=True, repetitionTimeMs=3.5), HEADER)
    assert fa == 20.0 and tr == pytest.approx(0.0035)  # typed in ms, used in s
    assert described == "flip angle 20 deg (typed); TR 3.5 ms (typed)"


def test_a_series_without_header_values_disables_apply_and_says_which_box_to_tick():
    view = fitting_panel(fitting_parameters(), NO_HEADER)
    assert not view.apply_enabled
    assert "no flip angle" in view.apply_tooltip and "'Flip angle'" in view.apply_tooltip
    assert "not in the header" in view.acquisition
    view = fitting_panel(fitting_parameters(useFlipAngle=True), NO_HEADER)
    assert not view.apply_enabled and "'TR'" in view.apply_tooltip
    view = fitting_panel(fitting_parameters(useFlipAngle=True, useRepetitionTime=True), NO_HEADER)
    assert view.apply_enabled and "typed" in view.acquisition
    assert view.enabled["flipAngleSpinBox"] and view.enabled["repetitionTimeSpinBox"]
    assert not fitting_panel(fitting_parameters(), HEADER).enabled["flipAngleSpinBox"]
    view = inference_panel(inference_parameters(), NO_HEADER, ["hetero_encoder"])
    assert not view.apply_enabled and "'Flip angle'" in view.apply_tooltip


def test_the_vfa_tr_comes_from_the_vfa_series():
    p = fitting_parameters(t10Mode="vfa", vfaSequence=Node("VFA"), vfaFlipAngles="2, 5, 10")
    view = fitting_panel(p, SeriesHeader(flip_angle_deg=12.0, tr_s=0.0042, vfa_tr_s=0.006))
    assert view.apply_enabled and "VFA TR 6 ms (series header)" in view.acquisition
    assert acquisition_values(p, SeriesHeader(vfa_tr_s=0.006), vfa=True)[2] == 0.006
    view = fitting_panel(p, HEADER)  # the VFA series has no TR: the DCE series' TR is not taken for it
    assert not view.apply_enabled and "'VFA TR'" in view.apply_tooltip
    p.useVfaRepetitionTime, p.vfaTrMs = True, 7.0
    assert fitting_panel(p, HEADER).apply_enabled
    assert acquisition_values(p, HEADER, vfa=True)[2] == pytest.approx(0.007)
    p.vfaFlipAngles = "2, five, 10"
    view = fitting_panel(p, HEADER)
    assert not view.apply_enabled and "'five' is not a number" in view.apply_tooltip
    assert parse_flip_angles("2; 5, 10 ,") == [2.0, 5.0, 10.0]


def test_a_concentration_series_needs_no_acquisition_values():
    view = fitting_panel(fitting_parameters(), SeriesHeader(kind="concentration"))
    assert view.apply_enabled and "concentration" in view.acquisition
    assert not view.enabled["flipAngleCheckBox"] and not view.enabled["t10ValueSpinBox"]


@pytest.mark.parametrize("changes, reason", [
    (dict(inputSequence=None), "Choose the DCE series"),
    (dict(aifSource="roi"), "Place an AIF ROI"),                       # e.g. the ROI node was deleted
    (dict(aifSource="segment", aifSegmentation=Node("AIF")), "Choose the segmentation and the segment"),
    (dict(t10Mode="map"), "Choose the T10 map"),
    (dict(t10Mode="vfa"), "Choose the VFA series"),
])
def test_each_missing_input_disables_apply_with_its_reason(changes, reason):
    view = fitting_panel(fitting_parameters(**changes), HEADER)
    assert not view.apply_enabled and reason in view.apply_tooltip
    assert fitting_panel(fitting_parameters(), HEADER).apply_enabled


def test_a_deleted_aif_segment_disables_apply():
    p = fitting_parameters(aifSource="segment", aifSegmentation=Node("AIF"), aifSegmentId="Segment_2")
    ok = SeriesHeader(flip_angle_deg=12.0, tr_s=0.0042, aif_segment_ids=("Segment_1", "Segment_2"))
    assert fitting_panel(p, ok).apply_enabled
    gone = SeriesHeader(flip_angle_deg=12.0, tr_s=0.0042, aif_segment_ids=("Segment_1",))
    view = fitting_panel(p, gone)
    assert not view.apply_enabled and "'Segment_2' is no longer in 'AIF'" in view.apply_tooltip


def test_a_running_job_disables_apply_and_enables_cancel():
    view = fitting_panel(fitting_parameters(), HEADER, running=True)
    assert not view.apply_enabled and view.cancel_enabled and "Cancel" in view.apply_tooltip
    assert not fitting_panel(fitting_parameters(), HEADER).cancel_enabled
    view = inference_panel(inference_parameters(), HEADER, ["hetero_encoder"], running=True, has_result=True)
    assert not view.apply_enabled and view.cancel_enabled and not view.enabled["applyThresholdButton"]


def test_the_inference_panel_needs_a_shipped_network_and_a_t1_map_in_map_mode():
    assert inference_panel(inference_parameters(), HEADER, ["hetero_encoder"]).apply_enabled
    view = inference_panel(inference_parameters(modelName="gone"), HEADER, ["hetero_encoder"])
    assert not view.apply_enabled and "Choose a network" in view.apply_tooltip
    view = inference_panel(inference_parameters(t10Mode="map"), HEADER, ["hetero_encoder"])
    assert not view.apply_enabled and "T1 map" in view.apply_tooltip
    assert view.enabled["t10MapSelector"] and not view.enabled["t10ValueSpinBox"]
    assert inference_panel(inference_parameters(t10Mode="map", t10Map=Node("T1")), HEADER,
                           ["hetero_encoder"]).apply_enabled
    view = inference_panel(inference_parameters(), HEADER, ["hetero_encoder"], has_result=True, has_statistics=True)
    assert view.enabled["applyThresholdButton"] and view.enabled["exportTableButton"]


def test_the_inference_panel_asks_for_the_input_function_its_mode_needs():
    conditioned = ["hetero_encoder_aif"]
    aif = dict(mode="aif", modelName="hetero_encoder_aif")
    view = inference_panel(inference_parameters(**aif, aifSource="roi"), HEADER, conditioned)
    assert not view.apply_enabled and "AIF ROI" in view.apply_tooltip
    assert view.enabled["aifRoiSelector"] and view.enabled["aifRoiLabelSpinBox"] and not view.enabled["aifCsvPathLineEdit"]
    assert inference_panel(inference_parameters(**aif, aifSource="roi", aifRoi=Node("vessel")), HEADER,
                           conditioned).apply_enabled
    view = inference_panel(inference_parameters(**aif, aifSource="csv", aifCsvPath="  "), HEADER, conditioned)
    assert not view.apply_enabled and "CSV" in view.apply_tooltip
    view = inference_panel(inference_parameters(**aif, aifSource="population"), HEADER, conditioned)
    assert view.apply_enabled and view.enabled["populationAifComboBox"] and view.enabled["hematocritSpinBox"]
    # image mode reads the input function from the image: no source to choose, the ROI ignored
    view = inference_panel(inference_parameters(mode="image", modelName="hetero_encoder_aif", aifSource="roi"),
                           HEADER, conditioned)
    assert view.apply_enabled and not view.enabled["aifSourceComboBox"] and not view.enabled["aifRoiSelector"]
    assert view.enabled["bloodT10SpinBox"] and view.enabled["detectAifButton"]
    # a mode with no network shipped says so
    view = inference_panel(inference_parameters(**aif), HEADER, [])
    assert not view.apply_enabled and "mode 'aif'" in view.apply_tooltip


def test_the_fitting_panel_offers_every_input_function_source_of_dcepk_fit():
    """CSV and automatic detection beside the ROI, the segment and the population AIF: each source
    enables its own widget only, a CSV source without a path disables Apply naming the file, and
    automatic detection (a signal's enhancement) refuses a concentration series."""
    own = {"roi": "aifRoiSelector", "segment": "aifSegmentSelector", "csv": "aifCsvPathLineEdit",
           "population": "populationAifComboBox", "auto": "autoAifKindComboBox"}
    for source, widget in own.items():
        enabled = fitting_panel(fitting_parameters(aifSource=source), HEADER).enabled
        assert [name for name in own.values() if enabled[name]] == [widget], source
        assert enabled["bloodT10SpinBox"] == (source in ("roi", "segment", "auto")), source  # a vessel's signal
        assert enabled["aifTopFractionSpinBox"] == (source in ("roi", "segment", "auto")), source
        assert enabled["detectAifButton"], source   # Detect is offered whatever the source
    for path in ("", "   "):
        view = fitting_panel(fitting_parameters(aifSource="csv", aifCsvPath=path), HEADER)
        assert not view.apply_enabled and "AIF CSV file" in view.apply_tooltip
        assert view.apply_tooltip.startswith("Type the path")
    view = fitting_panel(fitting_parameters(aifSource="csv", aifCsvPath="/data/aif.csv"), HEADER)
    assert view.apply_enabled and view.apply_tooltip.startswith("Fit the etofts model")
    view = fitting_panel(fitting_parameters(aifSource="auto", autoAifKind="vein"), HEADER)
    assert view.apply_enabled and view.enabled["autoAifKindComboBox"] and not view.enabled["aifRoiSelector"]
    view = fitting_panel(fitting_parameters(aifSource="auto"), SeriesHeader(kind="concentration"))
    assert not view.apply_enabled and "Automatic detection reads a signal series" in view.apply_tooltip
    assert not view.enabled["detectAifButton"] and not view.enabled["bloodT10SpinBox"]
    assert fitting_panel(fitting_parameters(aifSource="csv", aifCsvPath="a.csv"),
                         SeriesHeader(kind="concentration")).apply_enabled   # a CSV curve needs no signal
    assert not fitting_panel(fitting_parameters(inputSequence=None), HEADER).enabled["detectAifButton"]
    assert not fitting_panel(fitting_parameters(aifSource="auto"), HEADER, running=True).enabled["detectAifButton"]


def test_models_are_listed_by_their_mode():
    cards = [{"name": "hetero_encoder"}, {"name": "hetero_encoder_aif", "mode": "aif_conditioned"},
             {"name": "aif_reader", "mode": "aif_reader"}]
    assert models_for_mode(cards, "aif-free") == ["hetero_encoder"]
    assert models_for_mode(cards, "aif") == models_for_mode(cards, "image") == ["hetero_encoder_aif"]


@pytest.mark.parametrize("module, panel", [
    ("DCEPKFitting", lambda: fitting_panel(fitting_parameters(), HEADER)),
    ("DCEPKInference", lambda: inference_panel(inference_parameters(), HEADER, ["hetero_encoder"])),
])
def test_every_widget_the_panel_state_names_is_in_the_ui(module, panel):
    widgets = read_ui_widgets(ROOT / module / "Resources" / "UI" / f"{module}.ui")
    names = set(panel().enabled) | {"applyButton", "cancelButton", "acquisitionLabel", "statusLabel"}
    assert names <= set(widgets), names - set(widgets)
