"""What the DCEPK module panels show and allow: a small, explicit state machine, pure Python.

Each module's Logic calls ``fitting_panel`` / ``inference_panel`` with its parameter node (any
object with the fields named below), what the series headers say (``SeriesHeader``, read from
the nodes by the MRML bridge) and whether a job runs; the widget only mirrors the returned
``PanelView``: which widgets are enabled, whether Apply is enabled and, if not, the first thing
that is missing (its tooltip and the status line), and where the flip angle and TR come from.

Acquisition rule (both modules): the flip angle and TR of the dynamic series, and the TR of a
variable-flip-angle series, come from the series header unless the user ticks the matching
override and types the value. A value that is neither in the header nor given by the user
disables Apply with a message saying which box to tick: never a silent default.
"""

from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence

SIGNAL, CONCENTRATION = "signal", "concentration"


@dataclass(frozen=True)
class SeriesHeader:
    """What the selected nodes say about the acquisition (None: not in the header)."""
    flip_angle_deg: Optional[float] = None
    tr_s: Optional[float] = None
    kind: str = SIGNAL                    # "concentration": no FA, TR or T10 needed
    vfa_tr_s: Optional[float] = None      # TR of the variable-flip-angle series
    error: str = ""                       # the series could not be read: why
    aif_segment_ids: Sequence[str] = ()   # segments of the chosen AIF segmentation


@dataclass(frozen=True)
class PanelView:
    apply_enabled: bool
    apply_tooltip: str                    # what Apply will do, or the first thing missing
    cancel_enabled: bool
    enabled: Dict[str, bool] = field(default_factory=dict)  # .ui widget name -> enabled
    acquisition: str = ""                 # where FA / TR (and the VFA TR) come from, in words


_VFA_TR_MISSING = "The VFA series header has no TR: tick 'VFA TR' and type it (milliseconds)."


def typed_acquisition(p, vfa: bool = False):
    """(flip angle in deg, TR in s, VFA TR in s) as the user ticked and typed them; None where the box
    is unticked, so that a run takes the header's value. What both modules' Logic passes to a run."""
    return (p.flipAngleDeg if p.useFlipAngle else None,
            p.repetitionTimeMs * 1e-3 if p.useRepetitionTime else None,
            p.vfaTrMs * 1e-3 if vfa and p.useVfaRepetitionTime else None)


def _source(typed: Optional[float], header_value: Optional[float]):
    """(value, 'typed' / 'series header' / None): the user's override wins over the header."""
    if typed is not None:
        return typed, "typed"
    if header_value is not None:
        return header_value, "series header"
    return None, None


def _describe(label: str, value: Optional[float], source: Optional[str], unit: str, scale: float = 1.0) -> str:
    return f"{label} {value * scale:g} {unit} ({source})" if source else f"{label}: not in the header"


def acquisition_values(p, header: SeriesHeader, vfa: bool = False):
    """``(fa_deg, tr_s, vfa_tr_s, description, missing)``: the values a run uses (None: not known),
    a line saying where each comes from, and a message per missing one naming the box to tick."""
    typed_fa, typed_tr, typed_vfa_tr = typed_acquisition(p, vfa)
    fa, fa_source = _source(typed_fa, header.flip_angle_deg)
    tr, tr_source = _source(typed_tr, header.tr_s)
    parts = [_describe("flip angle", fa, fa_source, "deg"), _describe("TR", tr, tr_source, "ms", 1e3)]
    missing = []
    if fa_source is None:
        missing.append("The series header has no flip angle: tick 'Flip angle' and type it (degrees).")
    if tr_source is None:
        missing.append("The series header has no TR: tick 'TR' and type it (milliseconds).")
    vfa_tr = None
    if vfa:
        vfa_tr, vfa_source = _source(typed_vfa_tr, header.vfa_tr_s)
        parts.append(_describe("VFA TR", vfa_tr, vfa_source, "ms", 1e3))
        if vfa_source is None:
            missing.append(_VFA_TR_MISSING)
    return fa, tr, vfa_tr, "; ".join(parts), missing


def parse_flip_angles(text: str):
    """Comma- (or semicolon-) separated degrees; ValueError naming the bad entry."""
    angles = []
    for entry in text.replace(";", ",").split(","):
        if entry.strip():
            try:
                angles.append(float(entry))
            except ValueError:
                raise ValueError(f"VFA flip angle '{entry.strip()}' is not a number: type degrees, "
                                 "comma-separated") from None
    return angles


def _first_missing_fitting(p, header: SeriesHeader, missing_acquisition) -> str:
    if not p.inputSequence:
        return "Choose the DCE series (a volume sequence) first."
    if header.error:
        return header.error
    if header.kind != CONCENTRATION:
        dce_missing = [m for m in missing_acquisition if m != _VFA_TR_MISSING]
        if dce_missing:
            return dce_missing[0]
        if p.t10Mode == "map" and not p.t10Map:
            return "Choose the T10 map (Pre-contrast T1: map), or another T1 source."
        if p.t10Mode == "vfa":
            if not p.vfaSequence:
                return "Choose the VFA series (Pre-contrast T1: vfa), or another T1 source."
            try:
                parse_flip_angles(p.vfaFlipAngles)
            except ValueError as error:
                return str(error)
            if _VFA_TR_MISSING in missing_acquisition:
                return _VFA_TR_MISSING
    if p.aifSource == "roi" and not p.aifRoi:
        return ("Place an AIF ROI on an artery (AIF ROI: Create new; or Detect the input function), or choose "
                "another input function source.")
    if p.aifSource == "csv" and not (p.aifCsvPath or "").strip():
        return "Type the path of the AIF CSV file (time in s, concentration in mM), or choose another source."
    if p.aifSource == "auto" and header.kind == CONCENTRATION:
        return ("Automatic detection reads a signal series (enhancement over the baseline signal): this series is "
                "concentration, so choose another input function source.")
    if p.aifSource == "segment":
        if not p.aifSegmentation or not p.aifSegmentId:
            return "Choose the segmentation and the segment on the artery, or another input function source."
        if p.aifSegmentId not in header.aif_segment_ids:
            return (f"The AIF segment '{p.aifSegmentId}' is no longer in '{p.aifSegmentation.GetName()}': "
                    "choose a segment again.")
    return ""


# Input function sources of the fitting panel: those of ``dcepk fit`` (an ROI, here a box or a painted
# segment; a CSV file; a population AIF; automatic detection). Detect makes the detected voxels the segment.
FITTING_AIF_SOURCES = ("roi", "segment", "csv", "population", "auto")
_VESSEL_SOURCES = ("roi", "segment", "auto")   # a vessel's signal is converted: brightest fraction, blood T10


def _fitting_input_function_enabled(p, is_signal: bool, running: bool) -> Dict[str, bool]:
    source = p.aifSource
    return {"aifRoiSelector": source == "roi", "aifSegmentSelector": source == "segment",
            "aifCsvPathLineEdit": source == "csv", "autoAifKindComboBox": source == "auto",
            "populationAifComboBox": source == "population", "aifTopFractionSpinBox": source in _VESSEL_SOURCES,
            "bloodT10SpinBox": is_signal and source in _VESSEL_SOURCES,
            "detectAifButton": bool(p.inputSequence) and is_signal and not running}


def fitting_panel(p, header: SeriesHeader, running: bool = False) -> PanelView:
    """The DCEPK Fitting panel for parameter node ``p`` (``None``: no scene yet)."""
    if p is None:
        return PanelView(False, "No scene.", running)
    is_signal = header.kind != CONCENTRATION
    uses_vfa = is_signal and p.t10Mode == "vfa"
    _, _, _, described, missing = acquisition_values(p, header, vfa=uses_vfa)
    if not is_signal:
        described, missing = "concentration series (mM): no flip angle, TR or T1 needed", []
    described = described if p.inputSequence else ""
    if running:
        reason = "A fit is running: Cancel stops it (the scene is left as it was)."
    else:
        reason = _first_missing_fitting(p, header, missing)
    enabled = {
        "flipAngleCheckBox": is_signal, "flipAngleSpinBox": is_signal and p.useFlipAngle,
        "repetitionTimeCheckBox": is_signal, "repetitionTimeSpinBox": is_signal and p.useRepetitionTime,
        "t10ModeComboBox": is_signal, "relaxivitySpinBox": is_signal,
        "t10ValueSpinBox": is_signal and p.t10Mode == "fixed",
        "t10MapSelector": is_signal and p.t10Mode == "map", "t10MapUnitComboBox": is_signal and p.t10Mode == "map",
        "vfaSequenceSelector": uses_vfa, "vfaFlipAnglesLineEdit": uses_vfa, "vfaTrCheckBox": uses_vfa,
        "vfaTrSpinBox": uses_vfa and p.useVfaRepetitionTime,
        **_fitting_input_function_enabled(p, is_signal, running),
    }
    tooltip = reason or f"Fit the {p.model} model to every voxel in the background ({described})."
    return PanelView(not reason and not running, tooltip, running, enabled, described)


# Inference modes: the input function given (a source below), read from the image (detected
# automatically), or none (the AIF-free networks); the panel lists the networks of the mode.
INFERENCE_MODES = ("aif", "image", "aif-free")


def models_for_mode(cards, mode: str) -> list:
    """Names of the networks (model cards) that run in panel mode ``mode``."""
    wanted = "aif_free" if mode == "aif-free" else "aif_conditioned"
    return [card["name"] for card in cards if card.get("mode", "aif_free") == wanted]


def inference_source(p) -> Optional[str]:
    """The input function source a run of the panel's mode uses (None: the AIF-free networks)."""
    return {"aif": p.aifSource, "image": "image"}.get(p.mode)


def _first_missing_input_function(p) -> str:
    source = inference_source(p)
    if source == "roi" and not p.aifRoi:
        return ("Choose the AIF ROI (a box, label map or segmentation on an artery or vein; Detect makes one), "
                "or another input function source.")
    if source == "csv" and not (p.aifCsvPath or "").strip():
        return "Type the path of the AIF CSV file (time in s, concentration in mM), or another source."
    return ""


def _input_function_enabled(p, running: bool) -> Dict[str, bool]:
    source = inference_source(p)
    given = p.mode == "aif"
    return {"aifSourceComboBox": given, "aifRoiSelector": source == "roi", "aifRoiLabelSpinBox": source == "roi",
            "aifCsvPathLineEdit": source == "csv", "autoAifKindComboBox": source == "auto" and given,
            "populationAifComboBox": source == "population" or (p.compareWithFit and source is None),
            "hematocritSpinBox": source is not None or p.compareWithFit,
            "bloodT10SpinBox": source in ("roi", "auto", "image"),   # image: the detection fallback, comparison fit
            "detectAifButton": bool(p.inputSequence) and not running}


def inference_panel(p, header: SeriesHeader, model_names: Sequence[str], running: bool = False,
                    has_result: bool = False, has_statistics: bool = False) -> PanelView:
    """The DCEPK Inference panel for parameter node ``p``; ``model_names``: the shipped networks of the
    panel's mode (``p.mode``)."""
    if p is None:
        return PanelView(False, "No scene.", running)
    _, _, _, described, missing = acquisition_values(p, header)
    described = described if p.inputSequence else ""
    if running:
        reason = "The network is running: Cancel stops it (the scene is left as it was)."
    elif not p.inputSequence:
        reason = "Choose the DCE series (a volume sequence) first."
    elif header.error:
        reason = header.error
    elif p.modelName not in model_names:
        reason = "Choose a network: none of the shipped networks of this mode is selected." if model_names else \
            f"No network of mode '{p.mode}' is installed with this extension: choose another mode."
    elif header.kind != CONCENTRATION and missing:
        reason = missing[0]
    elif p.t10Mode == "map" and not p.t10Map:
        reason = "Choose the T1 map (T10 source: map), or give one T10 value."
    else:
        reason = _first_missing_input_function(p)
    absolute = p.thresholdMode == "absolute"
    enabled = {
        "flipAngleSpinBox": p.useFlipAngle, "repetitionTimeSpinBox": p.useRepetitionTime,
        "t10ValueSpinBox": p.t10Mode == "fixed",
        "t10MapSelector": p.t10Mode == "map", "t10MapUnitComboBox": p.t10Mode == "map",
        "relativeThresholdSpinBox": p.thresholdMode == "relative",
        "ktransSdLimitSpinBox": absolute, "veSdLimitSpinBox": absolute, "vpSdLimitSpinBox": absolute,
        "kepSdLimitSpinBox": absolute,
        "fitModelComboBox": p.compareWithFit,
        "applyThresholdButton": has_result and not running, "showUncertaintyButton": has_result,
        "exportTableButton": has_statistics, **_input_function_enabled(p, running),
    }
    tooltip = reason or f"Run {p.modelName} on every masked voxel in the background ({described})."
    return PanelView(not reason and not running, tooltip, running, enabled, described)
