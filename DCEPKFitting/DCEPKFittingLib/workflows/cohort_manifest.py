"""The cohort manifest of ``dcepk batch``: one row per subject (and session), validated as a whole.

A CSV (``.csv``) or tab-separated (``.tsv``, ``.txt``) file with a header row; lines starting with
``#`` are comments. Paths are relative to the manifest's folder (or absolute). ``COLUMNS`` lists every
column and what it takes; an empty cell takes the command's default. Every problem of the manifest
(unknown or missing columns, duplicate ids, bad values, missing files, a row without a T1 source or
an input function) is collected and reported at once, before any computation starts.
"""

import argparse
import csv
import difflib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from ..core.errors import DCEPKInputError
from ..kinetics.aif import POPULATION_AIFS
from ..kinetics.tk_models import MODELS
from . import cli

# column: what it takes (units in the OSIPI lexicon). README "Cohorts" shows an example.
COLUMNS = {
    "subject": "subject id (letters, digits, '.', '_', '-'); required",
    "session": "session id (same characters); optional",
    "dce": "DCE series: DICOM folder, 4-D NIfTI, NRRD or Slicer MultiVolume NRRD; required",
    "input_kind": "signal | concentration (default: as the file says, else signal)",
    "t10": "pre-contrast T1: a value or a map file on the series grid, in t10_unit",
    "t10_unit": "s | ms: unit of t10 (default s)",
    "vfa": "variable-flip-angle T1 series: one 4-D file, 3-D files separated by ';', or a DICOM folder",
    "vfa_fa": "flip angles of the VFA images in degrees, separated by ';' (DICOM: from the headers)",
    "vfa_tr": "TR of the VFA images in seconds (DICOM: from the headers)",
    "aif": "input function: a population AIF (parker, georgiou, weinmann), a CSV of time (s) and blood "
           "concentration (mM), a mask file of an artery (or vein) ROI on the series grid, or auto (automatic "
           "detection: auto, auto-artery, auto-vein); used by the fit and by an AIF-conditioned network",
    "aif_top_fraction": "use only this fraction of the most enhancing ROI voxels (0-1]",
    "aif_is_plasma": "yes if the ROI / CSV curve is plasma, not blood",
    "aif_delay": "extra delay of the input function in seconds",
    "hct": "haematocrit, a fraction (default 0.45)",
    "labels": "tissue label map on the series grid (integers, 0 = background): one statistics row per label",
    "label_names": "label names: a text file of 'value name' lines or a BIDS dseg.tsv (index, name)",
    "mask": "mask of the voxels to fit (default: the labelled voxels, else voxels above the noise)",
    "fa": "flip angle of the DCE series in degrees (default: from the header)",
    "tr": "repetition time of the DCE series in seconds (default: from the header)",
    "r1": "relaxivity in 1/(mM s) (default: gadoterate at 3 T)",
    "dt": "frame interval in seconds, for series without timing",
    "times": "frame times in seconds separated by ';', or a text file of them",
    "override_timing": "yes to use dt / times where the file stores other frame times",
    "baseline_frames": "number of pre-contrast frames (default: detected)",
    "series_uid": "SeriesInstanceUID of the dynamic series in a DICOM folder holding several",
    "model": f"fit model: {' | '.join(MODELS)} | none (default: the command's --model)",
    "method": "nlls | linear (default: the command's --method)",
    "fit_delay": "yes to fit the arterial delay per voxel",
    "network": "shipped network for maps with uncertainty (dcepk infer --list) | none (default: --network)",
}
REQUIRED = ("subject", "dce")
# the aif column's words for automatic detection (pipeline.input_function's auto_aif)
AUTOMATIC_AIFS = {"auto": "either", "auto-artery": "artery", "auto-vein": "vein"}
# names other tools use for a column (lower case, without '_' and '-'), for the "did you mean" of a typo
SYNONYMS = {"flipangle": "fa", "fadeg": "fa", "repetitiontime": "tr", "trs": "tr", "t1": "t10", "t1map": "t10",
            "t10map": "t10", "aifroi": "aif", "aifmask": "aif", "populationaif": "aif", "aifcsv": "aif",
            "segmentation": "labels", "seg": "labels", "dseg": "labels", "labelmap": "labels", "series": "dce",
            "dcepath": "dce", "image": "dce", "subjectid": "subject", "participantid": "subject", "sessionid": "session",
            "framerate": "dt", "frametime": "dt", "hematocrit": "hct", "haematocrit": "hct", "relaxivity": "r1"}
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
TRUE, FALSE = {"yes", "y", "true", "1"}, {"no", "n", "false", "0", ""}
DELIMITERS = {".csv": ",", ".tsv": "\t", ".txt": "\t"}


@dataclass
class BatchDefaults:
    """What an empty cell takes: the command's options."""
    model: str = "etofts"
    method: str = "nlls"
    network: str = "none"
    aif: str = ""
    t10: str = ""
    hct: str = "0.45"


@dataclass
class SubjectSpec:
    """One validated row: absolute input paths by role and the options of its analysis (plain data,
    so that it travels to a Dask worker and its JSON is the subject's parameter fingerprint)."""
    subject: str
    session: str
    line: int
    inputs: Dict[str, List[str]] = field(default_factory=dict)
    options: Dict[str, object] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"sub-{self.subject}" + (f"_ses-{self.session}" if self.session else "")

    @property
    def folder(self) -> str:
        """Output folder relative to the batch's ``subjects/`` folder (nested: ids may hold '_')."""
        return f"sub-{self.subject}" + (f"/ses-{self.session}" if self.session else "")


class ManifestProblems(DCEPKInputError):
    """Every problem of a manifest, one per line."""

    def __init__(self, source: str, problems: Sequence[str]):
        self.problems = list(problems)
        listed = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{source} has {len(self.problems)} problem(s); nothing was run:\n{listed}")


@dataclass
class InvalidRow:
    """A row left out of the run (``--skip-invalid``) with its problems."""
    line: int
    subject: str
    session: str
    problems: List[str]

    @property
    def key(self) -> str:
        return f"sub-{self.subject or '?'}" + (f"_ses-{self.session}" if self.session else "")


@dataclass
class Manifest:
    specs: List[SubjectSpec]
    invalid: List[InvalidRow] = field(default_factory=list)


def read_manifest(path, defaults: Optional[BatchDefaults] = None,
                  network_names: Optional[Callable[[], Sequence[str]]] = None, skip_invalid: bool = False) -> Manifest:
    """The rows of a manifest file, validated; raises :class:`ManifestProblems` listing every problem
    (with ``skip_invalid``, rows with problems are returned apart, unless the header itself is wrong)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in DELIMITERS:
        raise DCEPKInputError(f"the manifest {path.name} must be a .csv or .tsv file")
    text = cli.read_text_option(path, "the manifest")
    lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    rows = list(csv.reader(lines, delimiter=DELIMITERS[suffix]))
    if not rows:
        raise DCEPKInputError(f"the manifest {path} is empty: give a header row and one row per subject")
    return validate_rows(rows[0], rows[1:], path.resolve().parent, str(path), defaults, network_names, skip_invalid)


def validate_rows(header: Sequence[str], rows: Sequence[Sequence[str]], base: Path, source: str,
                  defaults: Optional[BatchDefaults] = None,
                  network_names: Optional[Callable[[], Sequence[str]]] = None, skip_invalid: bool = False) -> Manifest:
    defaults = defaults or BatchDefaults()
    columns = [name.strip().lower() for name in header]
    fatal = _header_problems(columns) + ([] if rows else ["no subject rows under the header"])
    manifest, seen, problems = Manifest([]), {}, []
    networks = _NetworkCheck(network_names)
    for number, cells in enumerate(rows, start=2):
        found: List[str] = []
        row = {name: (cells[i].strip() if i < len(cells) else "") for i, name in enumerate(columns)
               if name in COLUMNS}
        if len(cells) > len(columns):
            found.append(f"row {number}: {len(cells)} cells but {len(columns)} columns in the header")
        spec = _validate_row(row, number, base, defaults, networks, found)
        key = spec.key if spec is not None else None
        if key in seen:
            found.append(f"row {number}: {key} is also on row {seen[key]}: give each subject and session once")
        if found:
            problems += found
            manifest.invalid.append(InvalidRow(number, row.get("subject", ""), row.get("session", ""), found))
        else:
            seen[key] = number
            manifest.specs.append(spec)
    if fatal or (problems and not skip_invalid):
        raise ManifestProblems(source, fatal + problems)
    return manifest


def _header_problems(columns: List[str]) -> List[str]:
    problems = []
    for name in columns:
        if name not in COLUMNS:
            close = SYNONYMS.get(re.sub(r"[_\-\s]", "", name)) or next(iter(difflib.get_close_matches(name, COLUMNS, n=1)),
                                                                          None)
            hint = f" (did you mean '{close}'?)" if close else ""
            problems.append(f"unknown column '{name}'{hint}; known columns: {', '.join(COLUMNS)}")
    duplicated = sorted({name for name in columns if columns.count(name) > 1})
    problems += [f"column '{name}' appears more than once" for name in duplicated]
    problems += [f"required column '{name}' is missing" for name in REQUIRED if name not in columns]
    return problems


class _NetworkCheck:
    """Known network names, asked for once (loading the inference package) and only if a row names one."""

    def __init__(self, names: Optional[Callable[[], Sequence[str]]]):
        self._names, self._known = names, None

    def problem(self, name: str) -> Optional[str]:
        if self._names is None:
            return f"network '{name}' needs the inference package (DCEPKInference), which is not installed"
        if self._known is None:
            self._known = list(self._names())
        if name not in self._known:
            return f"unknown network '{name}': use one of {', '.join(self._known)} or none"
        return None


class _Row:
    """A row's cells with the problems found in them (each names the row, the subject and the column)."""

    def __init__(self, cells: Dict[str, str], number: int, base: Path, problems: List[str]):
        self.cells, self.number, self.base, self.problems = cells, number, base, problems
        self.where = f"row {number}" + (f" ({cells['subject']})" if cells.get("subject") else "")

    def problem(self, column: str, message: str) -> None:
        self.problems.append(f"{self.where}, {column}: {message}")

    def path(self, column: str, text: Optional[str] = None, folder_ok: bool = True) -> Optional[str]:
        text = self.cells.get(column, "") if text is None else text
        if not text:
            return None
        path = Path(text).expanduser()
        path = path if path.is_absolute() else self.base / path
        if not path.exists():
            self.problem(column, f"{path} does not exist")
            return None
        if path.is_dir() and not folder_ok:
            self.problem(column, f"{path} is a folder: give a file")
            return None
        return str(path)

    def value(self, column: str, parse: Callable, text: Optional[str] = None):
        """A cell (or ``text`` in its place) through an argparse type of ``dcepk``: the same checks and
        messages as the command's options."""
        text = self.cells.get(column, "") if text is None else text
        if not text:
            return None
        try:
            return parse(text)
        except (argparse.ArgumentTypeError, DCEPKInputError, ValueError) as error:
            self.problem(column, str(error))
            return None

    def flag(self, column: str) -> bool:
        text = self.cells.get(column, "").lower()
        if text not in TRUE | FALSE:
            self.problem(column, f"'{text}' is not yes or no")
        return text in TRUE

    def choice(self, column: str, choices: Sequence[str], default: str) -> str:
        text = (self.cells.get(column, "") or default).lower()
        if text not in choices:
            self.problem(column, f"'{text}' is not one of {', '.join(choices)}")
        return text


def _validate_row(cells: Dict[str, str], number: int, base: Path, defaults: BatchDefaults,
                  networks: _NetworkCheck, problems: List[str]) -> Optional[SubjectSpec]:
    row = _Row(cells, number, base, problems)
    before = len(problems)
    ids = {}
    for column in ("subject", "session"):
        text = cells.get(column, "")
        if text and not ID_PATTERN.match(text):
            row.problem(column, f"'{text}' is not an id: use letters, digits, '.', '_' and '-' only")
        elif column == "subject" and not text:
            row.problem(column, "empty: every row needs a subject id")
        ids[column] = text
    spec = SubjectSpec(ids["subject"], ids["session"], number)
    inputs, options = spec.inputs, spec.options
    dce = row.path("dce")
    if "dce" in cells and not cells["dce"]:
        row.problem("dce", "empty: give the DCE series")
    inputs["dce"] = [dce] if dce else []
    _analysis_options(row, defaults, networks, options)
    _acquisition_options(row, options, inputs)
    _t1_source(row, defaults, options, inputs)
    _input_function(row, defaults, options, inputs)
    for column in ("labels", "label_names", "mask"):
        found = row.path(column, folder_ok=False)
        if found:
            inputs[column] = [found]
    return spec if len(problems) == before else None


def _analysis_options(row: _Row, defaults: BatchDefaults, networks: _NetworkCheck, options: dict) -> None:
    options["model"] = row.choice("model", list(MODELS) + ["none"], defaults.model)
    options["method"] = row.choice("method", ["nlls", "linear"], defaults.method)
    options["fit_delay"] = row.flag("fit_delay")
    network = row.cells.get("network", "") or defaults.network
    options["network"] = "none" if network.lower() == "none" else network
    if options["network"] != "none":
        trouble = networks.problem(network)
        if trouble:
            row.problem("network", trouble)
    if options["model"] == "none" and options["network"] == "none":
        row.problem("model", "neither a fit model nor a network: give model, network or both")


def _acquisition_options(row: _Row, options: dict, inputs: dict) -> None:
    options["input_kind"] = row.choice("input_kind", ["signal", "concentration", ""], "") or None
    options["fa_deg"] = row.value("fa", cli.FLIP_ANGLE)
    options["tr_s"] = row.value("tr", cli.REPETITION_TIME)
    options["r1_per_mM_s"] = row.value("r1", cli.RELAXIVITY)
    options["baseline_frames"] = row.value("baseline_frames", cli.POSITIVE_INT)
    options["dt_s"] = row.value("dt", cli.FRAME_INTERVAL)
    times_text = row.cells.get("times", "").replace(";", ",")
    if times_text and cli.numbers(times_text) is None:   # a file of times, relative to the manifest
        times_text = row.path("times", folder_ok=False) or ""
    times = row.value("times", cli.FRAME_TIMES, times_text)
    options["times_s"] = None if times is None else [float(t) for t in times]
    if options["dt_s"] is not None and options["times_s"] is not None:
        row.problem("times", "give dt or times, not both")
    options["override_timing"] = row.flag("override_timing")
    options["series_uid"] = row.cells.get("series_uid") or None
    options["hct"] = None
    options["aif_delay_s"] = row.value("aif_delay", cli.SECONDS) or 0.0
    options["aif_top_fraction"] = row.value("aif_top_fraction", cli.OPEN_FRACTION)
    options["aif_is_plasma"] = row.flag("aif_is_plasma")


def _t1_source(row: _Row, defaults: BatchDefaults, options: dict, inputs: dict) -> None:
    unit = row.choice("t10_unit", sorted(cli.T10_UNIT_SECONDS), "s")
    options["t10_unit"] = unit
    options["t10_s"] = None
    vfa_cell = row.cells.get("vfa", "")
    t10_text = row.cells.get("t10", "") or ("" if vfa_cell else defaults.t10)
    if t10_text:
        try:
            value = float(t10_text)
        except ValueError:
            found = row.path("t10", t10_text, folder_ok=False)
            if found:
                inputs["t10_map"] = [found]
        else:
            if not (math.isfinite(value) and value > 0):
                row.problem("t10", f"must be a positive number or a map file, got {t10_text}")
            else:
                options["t10_s"] = value * cli.T10_UNIT_SECONDS[unit]
                row.value("t10", lambda _: _check_t10(options["t10_s"]), t10_text)
    vfa = [row.path("vfa", part.strip()) for part in vfa_cell.split(";") if part.strip()]
    options["vfa_fa_deg"] = row.value("vfa_fa", _flip_angles)
    options["vfa_tr_s"] = row.value("vfa_tr", cli.REPETITION_TIME)
    if vfa_cell:
        inputs["vfa"] = [p for p in vfa if p]
        dicom = len(vfa) == 1 and vfa[0] is not None and Path(vfa[0]).is_dir()
        if not dicom and (options["vfa_fa_deg"] is None or options["vfa_tr_s"] is None):
            row.problem("vfa", "VFA image files need their flip angles (vfa_fa, degrees) and TR (vfa_tr, seconds)")
        elif not dicom and len(vfa) > 1 and options["vfa_fa_deg"] and len(vfa) != len(options["vfa_fa_deg"]):
            row.problem("vfa_fa", f"{len(options['vfa_fa_deg'])} flip angles for {len(vfa)} VFA images")
    has_t1 = bool(t10_text or vfa_cell)
    if t10_text and vfa_cell:
        row.problem("t10", "give t10 or vfa, not both")
    elif not has_t1 and options.get("input_kind") != "concentration":
        row.problem("t10", "no pre-contrast T1: give t10 (a value or a map) or a vfa series (or --t10 for all rows)")


def _check_t10(t10_s: float) -> None:
    from ..signal import check_t10
    check_t10(t10_s)


def _flip_angles(text: str) -> List[float]:
    angles = [cli.FLIP_ANGLE(part.strip()) for part in text.replace(",", ";").split(";") if part.strip()]
    if len(angles) < 2:
        raise DCEPKInputError("a VFA T1 map needs at least 2 flip angles (degrees, separated by ';')")
    return angles


def _input_function(row: _Row, defaults: BatchDefaults, options: dict, inputs: dict) -> None:
    options["hct"] = row.value("hct", cli.FRACTION, row.cells.get("hct") or defaults.hct)
    options["population_aif"] = options["auto_aif"] = None
    text = row.cells.get("aif", "") or defaults.aif
    if not text:
        if options["model"] != "none":
            row.problem("aif", "no input function for the fit: give a population AIF, a CSV, an ROI mask or "
                               "auto (or --aif for all rows)")
        return
    if text.lower() in POPULATION_AIFS:
        options["population_aif"] = text.lower()
        return
    if text.lower() in AUTOMATIC_AIFS:
        options["auto_aif"] = AUTOMATIC_AIFS[text.lower()]
        return
    found = row.path("aif", text, folder_ok=False)
    if found:
        inputs["aif_csv" if Path(found).suffix.lower() in (".csv", ".txt") else "aif_roi"] = [found]
