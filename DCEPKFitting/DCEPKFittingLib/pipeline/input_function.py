"""The input function of a DCE series, one path for fitting and for the networks.

``InputFunctionSpec`` names one source and how to turn it into plasma concentration; ``FitSettings``
carries the same fields (its ``input_function`` property gives the spec) and the networks take the
spec itself (the inference package's pipeline), so ``dcepk fit`` and ``dcepk infer`` (both built with
``workflows.input_function_options``), the modules and the Python API resolve it alike:

* ``aif_mask``: an ROI on an artery or a vein (bool [k, j, i]); its voxels' mean signal is converted
  once (``aif.aif_from_roi_signal``, Rician-corrected), with ``blood_t10_s`` if given;
* ``aif_csv``: a file of time (s) and concentration (mM);
* ``population_aif``: Parker, Georgiou or Weinmann, starting at the detected bolus arrival;
* ``auto_aif``: 'artery', 'vein' or 'either': the voxels found by ``kinetics.aif_detection``, then as
  an ROI; the mask comes back (1 artery, 2 vein) for the user to inspect and edit, with notes.

ROI, CSV and automatic curves are whole blood unless ``aif_is_plasma``; blood becomes plasma with
``hct``. ``aif_delay_s`` delays the curve.
"""

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import List, Optional

import numpy as np

from ..core import plausibility
from ..core.errors import DCEPKInputError, setting
from ..kinetics import aif as aif_lib
from ..kinetics.aif_detection import KINDS, AutoInputFunction, detect_input_function

# blood T10 (s) for an automatically found vessel when neither blood_t10_s nor a T10 map is given
# (3 T; about 1.4 s at 1.5 T: Lu et al., MRM 2004;52:679; Zhang et al., MRM 2013;70:1082)
DEFAULT_BLOOD_T10_S = 1.6

AUTO_MASK_FILE = "aif_auto_mask.nii.gz"   # what the commands write with automatic detection: the voxels
AUTO_CURVE_FILE = "aif_auto.csv"          # (1 artery, 2 vein) and the blood curve (time s, mM)


@dataclass
class InputFunctionSpec:
    """Exactly one source (``aif_mask``, ``aif_csv``, ``population_aif`` or ``auto_aif``) and how to
    make plasma concentration (mM) of it; units in the names (s, fractions)."""

    aif_mask: Optional[np.ndarray] = None     # bool [k, j, i]: ROI on an artery (or a vein)
    aif_csv: Optional[str] = None             # time (s), concentration (mM)
    population_aif: Optional[str] = None      # parker | georgiou | weinmann
    auto_aif: Optional[str] = None            # artery | vein | either
    aif_top_fraction: Optional[float] = None  # ROI: keep the most enhancing fraction of its voxels
    aif_is_plasma: bool = False               # the ROI / CSV curve is plasma already
    hct: float = 0.45
    aif_delay_s: float = 0.0
    blood_t10_s: Optional[float] = None       # ROI / automatic: T10 of blood (None: the T10 given)

    def source(self) -> Optional[str]:
        given = self.sources_given()
        return given[0] if len(given) == 1 else None

    def sources_given(self) -> List[str]:
        return [name for name, value in (("roi", self.aif_mask), ("csv", self.aif_csv),
                                         ("population", self.population_aif), ("auto", self.auto_aif))
                if value is not None]

    def check(self) -> "InputFunctionSpec":
        """Exactly one source and valid modifiers; the message names every option."""
        given = self.sources_given()
        if len(given) != 1:
            raise DCEPKInputError(
                "give exactly one input function: an ROI mask on an artery or vein "
                f"({setting('--aif-roi', 'aif_mask')}), a CSV file ({setting('--aif-csv', 'aif_csv')}), a population "
                f"AIF ({setting('--population-aif', 'population_aif')} parker|georgiou|weinmann) or automatic "
                f"detection ({setting('--auto-aif', 'auto_aif')} artery|vein|either); got {', '.join(given) or 'none'}")
        if not 0.0 <= float(self.hct) < 1.0:
            raise DCEPKInputError(f"haematocrit must be a fraction in [0, 1), got {self.hct}")
        if self.auto_aif is not None and self.auto_aif not in KINDS:
            raise DCEPKInputError(f"{setting('--auto-aif', 'auto_aif')} must be one of {', '.join(KINDS)}; "
                                  f"got {self.auto_aif!r}")
        if self.blood_t10_s is not None and not 0.1 <= float(self.blood_t10_s) <= 5.0:
            raise DCEPKInputError(f"{setting('--blood-t10', 'blood_t10_s')} {self.blood_t10_s:g} is not a blood T10 "
                                  "in seconds (1.4-1.8 s at 1.5-3 T)")
        return self

    def describe(self) -> str:
        source = self.source()
        names = {"roi": "ROI", "csv": f"CSV file {self.aif_csv}", "population": f"{self.population_aif} population AIF",
                 "auto": f"automatic detection ({self.auto_aif})"}
        return names.get(source, "none")


SPEC_FIELDS = tuple(f.name for f in fields(InputFunctionSpec))


@dataclass
class SignalInputFunction:
    """What the signal gives before it is converted: the blood curve (T,) mM of an ROI or of the
    detected voxels, the mask it came from (ROI bool, or the detection's label map), and notes."""

    blood_mM: Optional[np.ndarray] = None
    label_map: Optional[np.ndarray] = None
    detection: Optional[AutoInputFunction] = None
    notes: List[str] = field(default_factory=list)


def _blood_t10(spec: InputFunctionSpec, t10_s, voxels: np.ndarray, notes: List[str]):
    """T10 (s) for converting the vessel's signal: ``blood_t10_s``, else the T10 map, else (a single
    tissue value, automatic detection) ``DEFAULT_BLOOD_T10_S``."""
    if spec.blood_t10_s is not None:
        return float(spec.blood_t10_s)
    if np.ndim(t10_s) == 3:
        return t10_s
    if spec.auto_aif is not None:
        notes.append(f"blood T10 {DEFAULT_BLOOD_T10_S:g} s assumed for the detected vessel (3 T; give "
                     f"{setting('--blood-t10', 'blood_t10_s')} for yours)")
        return DEFAULT_BLOOD_T10_S
    return t10_s


def input_function_from_signal(signal, times_s, spec: InputFunctionSpec, *, t10_s, fa_deg, tr_s, r1_per_mM_s,
                               baseline_frames: int, noise_sigma=None, search_region=None) -> SignalInputFunction:
    """The blood curve of an ROI or automatic source from the signal series [k, j, i, t] (before it is
    converted); an empty result for the other sources. ``search_region``: where detection looks."""
    notes: List[str] = []
    if spec.aif_mask is not None:
        mask = np.asarray(spec.aif_mask, dtype=bool)
    elif spec.auto_aif is not None:
        detection = detect_input_function(signal, times_s, baseline_frames, spec.auto_aif, search_region, noise_sigma)
        mask, notes = detection.chosen, list(detection.notes)
    else:
        return SignalInputFunction()
    t10 = _blood_t10(spec, t10_s, mask, notes)
    blood = aif_lib.aif_from_roi_signal(signal, mask, t10, fa_deg, tr_s, r1_per_mM_s, baseline_frames,
                                        noise_sigma=noise_sigma, top_fraction=spec.aif_top_fraction)
    if spec.auto_aif is not None:
        return SignalInputFunction(blood, detection.label_map, detection, notes)
    return SignalInputFunction(blood, mask, None, notes)


def plasma_input_function(spec: InputFunctionSpec, times_s, baseline_frames: Optional[int],
                          from_signal: Optional[SignalInputFunction] = None, concentration=None,
                          tissue_rows=None, warnings: Optional[list] = None) -> np.ndarray:
    """Plasma input function (mM) on the frame times ``times_s``. ROI / automatic curves come from
    ``from_signal`` or, for a concentration series, from ``concentration`` [k, j, i, t]; an ROI or
    automatic curve that does not look like a vessel's adds to ``warnings`` (``tissue_rows``: flat
    indices of tissue voxels to compare it with)."""
    times = np.asarray(times_s, dtype=np.float64)
    if spec.population_aif is not None:
        return aif_lib.population_aif_at_arrival(spec.population_aif, times, baseline_frames, spec.hct,
                                                 spec.aif_delay_s)
    if spec.aif_csv is not None:
        t_csv, c_csv = aif_lib.load_aif_csv(spec.aif_csv)
        curve = aif_lib.resample_aif(t_csv, c_csv, times - times[0])
    else:
        curve = from_signal.blood_mM if from_signal is not None else None
        if curve is None:
            if spec.aif_mask is None:
                raise DCEPKInputError("automatic input detection needs the signal series (it looks for enhancement "
                                      "relative to the baseline signal): load the signal, not concentration")
            curve = aif_lib.aif_from_roi(concentration, spec.aif_mask, top_fraction=spec.aif_top_fraction)
        if warnings is not None and concentration is not None and tissue_rows is not None:
            conc = concentration.reshape(-1, concentration.shape[-1])
            warnings += plausibility.input_function_warnings(curve, conc[tissue_rows])
    if spec.aif_delay_s:
        curve = np.interp(times - spec.aif_delay_s, times, curve, left=0.0)
    return curve if spec.aif_is_plasma else aif_lib.blood_to_plasma(curve, spec.hct)


def checked_input_function(plasma, spec: InputFunctionSpec, from_signal: Optional[SignalInputFunction] = None):
    """(the plasma curve as float64, the notes that say what it is): refused without positive finite
    enhancement; the notes (the detection's, then the source and peak) go into the result's messages."""
    plasma = np.asarray(plasma, dtype=np.float64)
    if not np.all(np.isfinite(plasma)) or np.max(plasma) <= 0:
        raise DCEPKInputError("the input function has no positive finite enhancement: check the AIF ROI or source")
    notes = list(from_signal.notes) if from_signal is not None else []
    return plasma, notes + [f"input function: {spec.describe()}, peak {plasma.max():.2f} mM (plasma)"]


def command_line_arguments(spec: InputFunctionSpec, roi_file=None) -> List[str]:
    """The options that give ``spec`` back to ``dcepk fit`` / ``dcepk infer`` (the inverse of
    ``input_function_spec``; numbers written so they read back exactly): ``roi_file`` is where its ROI
    mask was written."""
    exact = lambda value: repr(float(value))  # noqa: E731
    args = [f"--hct={exact(spec.hct)}", f"--aif-delay={exact(spec.aif_delay_s)}"]
    if spec.aif_mask is not None:
        if roi_file is None:
            raise ValueError("an ROI input function needs the file its mask was written to")
        args += ["--aif-roi", str(roi_file)]
    elif spec.population_aif is not None:
        args += ["--population-aif", spec.population_aif]
    elif spec.aif_csv is not None:
        args += ["--aif-csv", str(Path(spec.aif_csv).resolve())]
    elif spec.auto_aif is not None:
        args += ["--auto-aif", spec.auto_aif]
    if spec.aif_top_fraction is not None:
        args.append(f"--aif-top-fraction={exact(spec.aif_top_fraction)}")
    if spec.aif_is_plasma:
        args.append("--aif-is-plasma")
    if spec.blood_t10_s is not None:
        args.append(f"--blood-t10={exact(spec.blood_t10_s)}")
    return args
