"""Fault injection: nothing silent, nothing lost (issue 17).

One case per fault class, each through the ``dcepk`` command line: the exit status, the message
(in the command line's terms) and that earlier outputs are byte-identical with no temporary file
left. A full disk is injected at a chosen byte (Python writers) or as the short write SimpleITK's
NIfTI writer does not report, and made real with a file-size limit (RLIMIT_FSIZE) in a child
process; a kill during writing is a real SIGKILL of a child process.
"""

import errno
import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from DCEPKFittingLib import io as dce_io
from DCEPKFittingLib.core import output_files
from DCEPKFittingLib.core.output_files import TEMP_PREFIX, StagedFile
from DCEPKFittingLib.io import read_volume, write_volume
from DCEPKFittingLib.io import sitk_images
from DCEPKFittingLib.sims.phantom import Protocol
from DCEPKFittingLib.workflows import cli

ROOT = Path(__file__).resolve().parents[2]
R1 = str(Protocol().r1_per_mM_s)
PYTHON_NAMES = ("replace_nonfinite", "overwrite=True", "np.float64", "array(", "_s=", "times_s", "dt_s")


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phantom")
    assert cli.main(["phantom", "--out", str(folder), "--shape", "2", "32", "32", "--frames", "30",
                     "--frame-time", "4", "--snr", "100", "--seed", "5"]) == 0
    return folder


@pytest.fixture(scope="module")
def earlier(phantom, tmp_path_factory):
    """A folder of maps from an earlier good run: every fault below must leave it byte-identical."""
    out = tmp_path_factory.mktemp("earlier") / "maps"
    assert cli.main(fit_args(phantom, out)) == 0
    return out


def fit_args(phantom, out, *extra, series=None):
    return ["fit", str(series or phantom / "dce.seq.nrrd"), "--aif-roi", str(phantom / "aif_mask.nii.gz"),
            "--t10", str(phantom / "truth" / "T10.nii.gz"), "--mask", str(phantom / "labels.nii.gz"), "--r1", R1,
            "--out", str(out), *extra]


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(capsys, argv, *words) -> str:
    """Run ``dcepk argv``: exit status 2, one message naming ``words`` and no Python names."""
    try:
        status = cli.main(argv)
    except SystemExit as exit_:  # argparse refuses an option itself
        status = exit_.code
    message = capsys.readouterr().err
    assert status == cli.EXIT_INPUT_ERROR, message
    assert "Traceback" not in message
    for word in words:
        assert word.lower() in message.lower(), message
    for name in PYTHON_NAMES:
        assert name not in message, f"Python name {name!r} in a command-line message: {message}"
    return message


def assert_unchanged(folder: Path, before: dict) -> None:
    assert snapshot(folder) == before
    assert not [p for p in folder.rglob("*") if p.name.startswith(TEMP_PREFIX)]


# ------------------------------------------------------------------------------- 1. a full disk
def test_full_disk_at_a_chosen_byte_of_a_map_changes_nothing(phantom, earlier, monkeypatch, capsys):
    """ENOSPC raised by the write that reaches byte 300 of the maps (a Python-written format)."""
    before = snapshot(earlier)
    original = StagedFile.write

    def disk_full_at_byte_300(self, data):
        if self.bytes_written + len(memoryview(data).cast("B")) > 300:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, data)

    monkeypatch.setattr(StagedFile, "write", disk_full_at_byte_300)
    refused(capsys, fit_args(phantom, earlier, "--overwrite", "--format", ".nrrd"), "no space left", str(earlier),
            "nothing was changed")
    refused(capsys, fit_args(phantom, earlier, "--overwrite"), "no space left")  # the JSON sidecar
    assert_unchanged(earlier, before)


def test_silent_short_write_of_simpleitk_is_caught_by_the_read_back(phantom, earlier, monkeypatch, capsys):
    """SimpleITK's NIfTI writer ignores a short write: the file it leaves is cut at a chosen byte
    (as on a full disk, where the maps were '8 maps written' with exit 0); the header-against-data
    check of the staged file catches it before anything is published."""
    before = snapshot(earlier)
    original = sitk_images._write_sitk_file

    def short_write(temporary, suffix, array, geometry):
        original(temporary, suffix, array, geometry)
        with open(temporary, "r+b") as handle:
            handle.truncate(200)

    monkeypatch.setattr(sitk_images, "_write_sitk_file", short_write)
    refused(capsys, fit_args(phantom, earlier, "--overwrite"), "written incomplete", "bytes of image data",
            "may be full", "nothing was changed")
    assert_unchanged(earlier, before)


def _limited_child(argv, limit_bytes):
    """``dcepk argv`` in a child process whose files cannot grow past ``limit_bytes`` (the kernel
    fails the write: EFBIG for Python, a silent short file for SimpleITK's NIfTI writer)."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    code = "import sys; from DCEPKFittingLib.workflows.cli import main; sys.exit(main(sys.argv[1:]))"
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'DCEPKFitting'}:{ROOT / 'DCEPKInference'}",
               PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, preexec_fn=limit,
                          env=env, timeout=300)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_real_short_writes_from_the_kernel_change_nothing(phantom, earlier, suffix):
    before = snapshot(earlier)
    child = _limited_child(fit_args(phantom, earlier, "--overwrite", "--format", suffix), 1500)
    assert child.returncode == cli.EXIT_INPUT_ERROR, child.stderr
    assert "nothing was changed" in child.stderr and "Traceback" not in child.stderr
    assert_unchanged(earlier, before)


def test_read_only_output_folder_is_named(phantom, tmp_path, monkeypatch, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "keep.txt").write_text("mine")
    if os.geteuid() == 0:  # root writes anywhere: inject what a read-only mount answers
        original = output_files.tempfile.mkstemp

        def read_only(*args, dir=None, **kwargs):
            if dir is not None and Path(dir).resolve() == locked.resolve():
                raise OSError(errno.EROFS, "Read-only file system")
            return original(*args, dir=dir, **kwargs)
        monkeypatch.setattr(output_files.tempfile, "mkstemp", read_only)
    else:
        locked.chmod(0o555)
    try:
        refused(capsys, fit_args(phantom, locked), str(locked), "choose another output folder")
        refused(capsys, ["infer", str(phantom / "dce.seq.nrrd"), "--t10", "1.4", "--out", str(locked)],
                "choose another output folder")
    finally:
        locked.chmod(0o755)
    assert [p.name for p in locked.iterdir()] == ["keep.txt"]


# ------------------------------------------------------------------------------- 2. NaN / inf in NIfTI
def _nifti(path, array, affine=None):
    import nibabel as nib  # an independent writer: the file holds NaN / inf as IEEE floats
    nib.save(nib.Nifti1Image(np.asarray(array, dtype=np.float32), np.eye(4) if affine is None else affine), str(path))
    return path


def test_nan_and_inf_in_a_nifti_series_are_left_out_not_zeroed(phantom, tmp_path, capsys):
    signal, _ = read_volume(phantom / "dce.seq.nrrd")  # [k, j, i, t]
    labels, geometry = read_volume(phantom / "labels.nii.gz")
    tissue = np.argwhere(labels > 0)
    bad = [tuple(v) for v in tissue[:: len(tissue) // 5][:5]]
    for n, voxel in enumerate(bad):
        signal[voxel + (3 + n,)] = np.nan if n % 2 else np.inf
    ras = geometry.ijk_to_ras()
    series = _nifti(tmp_path / "dce.nii.gz", np.transpose(signal, (2, 1, 0, 3)), ras)  # nibabel: [i, j, k, t]
    out = tmp_path / "maps"
    assert cli.main(fit_args(phantom, out, "--dt", "4", "--fa", "15", "--tr", "0.005", series=series)) == 0
    assert "5 voxels of the series hold nan or inf values" in capsys.readouterr().err.lower()
    ktrans, _ = read_volume(out / "Ktrans.nii.gz")
    for voxel in bad:
        assert np.isnan(ktrans[voxel]), voxel  # read as 0 they were fitted to numbers, with exit 0
    assert np.isfinite(ktrans[labels > 0]).sum() == (labels > 0).sum() - len(bad)


def test_statistics_count_nan_of_nifti_maps_as_nrrd_maps_do(phantom, tmp_path, capsys):
    labels, geometry = read_volume(phantom / "labels.nii.gz")
    ve, _ = read_volume(phantom / "truth" / "ve.nii.gz")
    ve[labels == 1] = np.where(np.arange((labels == 1).sum()) % 3 == 0, np.nan, ve[labels == 1])
    expected_nan = int(np.isnan(ve[labels == 1]).sum())
    tables = {}
    for suffix in (".nii.gz", ".nrrd"):
        path = write_volume(tmp_path / f"ve{suffix}", ve, geometry)
        table = tmp_path / f"stats{suffix}.csv"
        assert cli.main(["stats", str(path), "--labels", str(phantom / "labels.nii.gz"), "--out", str(table)]) == 0
        rows = [line.split(",") for line in table.read_text().splitlines()]
        tables[suffix] = {row[0]: dict(zip(rows[0], row)) for row in rows[1:]}
    for table in tables.values():
        assert int(table["1"]["nan_count"]) == expected_nan
        assert float(table["1"]["mean"]) == pytest.approx(np.nanmean(ve[labels == 1]), rel=1e-6)
    assert tables[".nii.gz"] == tables[".nrrd"]


# ------------------------------------------------------------------------------- 3. truncated files
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".nrrd", ".mha"])
def test_truncated_series_is_refused_with_both_sizes(phantom, tmp_path, capsys, suffix):
    import SimpleITK as sitk
    signal, geometry = read_volume(phantom / "dce.seq.nrrd")
    path = tmp_path / f"dce{suffix}"
    image = sitk.JoinSeries([sitk.GetImageFromArray(np.ascontiguousarray(signal[..., t])) for t in range(30)])
    image.SetSpacing(list(geometry.spacing) + [4.0])
    sitk.WriteImage(image, str(path), useCompression=suffix != ".nii")
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.truncate(size - size // 4)
    message = refused(capsys, fit_args(phantom, tmp_path / "out", "--dt", "4", "--fa", "15", "--tr", "0.005",
                                       series=path), "truncated")
    expected = f"{signal.size * 4:,} bytes"
    assert expected in message, message  # the header's size, and the file's
    assert "holds only" in message
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------- 4. long --times, binary files
def test_a_long_times_list_works_and_binary_option_files_are_named(phantom, tmp_path, capsys):
    long_times = ",".join(f"{4.0 * n:.5f}" for n in range(30))  # the file's times, written out: 268 characters
    assert len(long_times) > 255  # a file name that long made the existence test raise ENAMETOOLONG
    assert cli.main(fit_args(phantom, tmp_path / "maps", "--times", long_times)) == 0
    assert cli.main(["infer", str(phantom / "dce.seq.nrrd"), "--model", "hetero_encoder_fast", "--times", long_times,
                     "--t10", str(phantom / "truth" / "T10.nii.gz"), "--r1", R1, "--out", str(tmp_path / "net")]) == 0
    assert (tmp_path / "maps" / "Ktrans.nii.gz").is_file() and (tmp_path / "net" / "Ktrans.nii.gz").is_file()
    binary = tmp_path / "times.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    refused(capsys, fit_args(phantom, tmp_path / "o2", "--times", str(binary)), "--times", "binary")
    refused(capsys, ["stats", str(phantom / "truth" / "ve.nii.gz"), "--labels", str(phantom / "labels.nii.gz"),
                     "--label-names", str(binary)], "--label-names", "binary")
    latin = tmp_path / "names.txt"
    latin.write_bytes("1 m\xe9ninge\n".encode("latin-1"))
    refused(capsys, ["stats", str(phantom / "truth" / "ve.nii.gz"), "--labels", str(phantom / "labels.nii.gz"),
                     "--label-names", str(latin)], "not a text file")


# ------------------------------------------------------------------------------- 6. bad options
@pytest.mark.parametrize("argv, words", [
    (["infer", "X", "--batch-voxels", "-5"], ["--batch-voxels", "at least 1"]),
    (["infer", "X", "--batch-voxels", "0"], ["--batch-voxels", "at least 1"]),
    (["infer", "X", "--model", "../../x"], ["--model", "not a path"]),
    (["infer", "X", "--model", "/tmp/x"], ["--model", "not a path"]),
    (["fit", "X", "--population-aif", "parker", "--hct", "1.5", "--out", "o"], ["--hct", "fraction"]),
    (["fit", "X", "--population-aif", "parker", "--aif-top-fraction", "0", "--out", "o"], ["--aif-top-fraction"]),
    (["fit", "X", "--population-aif", "parker", "--baseline-frames", "0", "--out", "o"], ["--baseline-frames"]),
    (["fit", "X", "--population-aif", "parker", "--fa", "0.26", "--out", "o"], ["--fa", "radians"]),
    (["fit", "X", "--population-aif", "parker", "--tr", "5", "--out", "o"], ["--tr", "milliseconds"]),
    (["fit", "X", "--population-aif", "parker", "--t10", "-1", "--out", "o"], ["--t10", "positive"]),
    (["phantom", "--out", "o", "--frames", "2"], ["--frames", "at least 3"]),
    (["phantom", "--out", "o", "--snr", "0"], ["--snr", "positive"]),
    (["stats", "m.nii", "--labels", "l.nii", "--out", "table.xlsx"], ["--out", ".csv", ".tsv"]),
])
def test_bad_options_are_refused_as_they_are_parsed(capsys, argv, words):
    refused(capsys, argv, *words)


def test_model_weights_with_nan_and_a_matching_checksum_are_refused(phantom, tmp_path, monkeypatch, capsys):
    import shutil
    from safetensors.torch import load_file, save_file
    from DCEPKInferenceLib.nn.model_store import DEFAULT_MODELS_DIR, sha256_of
    models = tmp_path / "models"
    models.mkdir()
    state = load_file(str(DEFAULT_MODELS_DIR / "hetero_encoder_fast.safetensors"))
    first = next(k for k, v in state.items() if v.is_floating_point())
    state[first] = state[first].clone()
    state[first].view(-1)[0] = float("nan")
    save_file(state, str(models / "hetero_encoder_fast.safetensors"))
    card = json.loads((DEFAULT_MODELS_DIR / "hetero_encoder_fast.json").read_text())
    card["sha256"] = sha256_of(models / "hetero_encoder_fast.safetensors")  # tampered, checksum updated
    (models / "hetero_encoder_fast.json").write_text(json.dumps(card))
    shutil.copytree(DEFAULT_MODELS_DIR / "configs", models / "configs")
    monkeypatch.setenv("DCEPK_MODELS_DIR", str(models))
    out = tmp_path / "maps"
    refused(capsys, ["infer", str(phantom / "dce.seq.nrrd"), "--model", "hetero_encoder_fast", "--t10",
                     str(phantom / "truth" / "T10.nii.gz"), "--r1", R1, "--out", str(out)], "nan", "weights")
    assert not out.exists()


# ------------------------------------------------------------------------------- 7. outputs checked first
@pytest.mark.parametrize("command", ["fit", "infer", "t1map", "stats", "phantom", "demo"])
def test_existing_outputs_are_refused_before_any_work(phantom, earlier, tmp_path, monkeypatch, capsys, command):
    from DCEPKFittingLib import signal as signal_models
    from DCEPKFittingLib.analysis import stats
    from DCEPKFittingLib.pipeline import fit as pipeline
    from DCEPKFittingLib.sims import phantom as phantom_module
    from DCEPKFittingLib.workflows import demo
    from DCEPKInferenceLib.pipeline import inference

    def no_work(*args, **kwargs):
        raise AssertionError("the computation ran although an output exists")
    for module, name in ((pipeline, "run_fit"), (inference, "run_inference"), (signal_models, "fit_vfa_t1"),
                         (stats, "label_statistics"), (phantom_module, "_model"), (demo, "make_phantom"),
                         (dce_io, "read_dce")):
        monkeypatch.setattr(module, name, no_work)
    existing = tmp_path / "out"
    existing.mkdir()
    target = {"fit": existing / "Ktrans.nii.gz", "infer": existing / "kep_sd.nii.gz", "t1map": existing / "t1.nii.gz",
              "stats": existing / "s.csv", "phantom": existing / "truth" / "T10.nii.gz",
              "demo": existing / "statistics.tsv"}[command]
    target.parent.mkdir(exist_ok=True)
    target.write_bytes(b"earlier result")
    series = str(phantom / "dce.seq.nrrd")
    argv = {"fit": fit_args(phantom, existing),
            "infer": ["infer", series, "--t10", "1.4", "--out", str(existing)],
            "t1map": ["t1map", series, "--fa", "15", "--tr", "0.005", "--out", str(target)],
            "stats": ["stats", str(phantom / "truth" / "ve.nii.gz"), "--labels", str(phantom / "labels.nii.gz"),
                      "--out", str(target)],
            "phantom": ["phantom", "--out", str(existing)],
            "demo": ["demo", "--out", str(existing)]}[command]
    refused(capsys, argv, "--overwrite")
    assert target.read_bytes() == b"earlier result"


# ------------------------------------------------------------------------------- 8. implausible units
def test_implausible_units_name_the_likely_mistake(phantom, tmp_path, capsys):
    out = tmp_path / "o"
    refused(capsys, fit_args(phantom, out)[:-2] + ["--r1", "0.0035", "--out", str(out)], "--r1", "m and mm", "3.5")
    refused(capsys, fit_args(phantom, out, "--dt", "5000"), "--dt", "milliseconds", "5 s")
    refused(capsys, fit_args(phantom, out, "--dt", "5"), "stores its own frame times", "--override-timing")
    t10_s, geometry = read_volume(phantom / "truth" / "T10.nii.gz")
    minutes = write_volume(tmp_path / "t10_min.nii.gz", t10_s / 60.0, geometry)
    args = fit_args(phantom, out)
    args[args.index("--t10") + 1] = str(minutes)
    refused(capsys, args, "t10", "minutes")
    refused(capsys, fit_args(phantom, out, "--input-kind", "concentration"), "holds signal", "--input-kind")
    assert not out.exists()


def test_concentration_read_as_signal_and_signal_as_concentration_are_named(phantom, tmp_path, capsys):
    from DCEPKFittingLib.io import DCESeries, read_dce, write_dce_series
    series = read_dce(phantom / "dce.seq.nrrd")
    unlabelled = tmp_path / "unlabelled.nrrd"   # no DCEPK.Kind: the values must tell
    write_dce_series(unlabelled, series)
    text = unlabelled.read_bytes().replace(b"DCEPK.Kind:=signal\n", b"")
    unlabelled.write_bytes(text)
    refused(capsys, fit_args(phantom, tmp_path / "o", "--input-kind", "concentration", series=unlabelled),
            "looks like a signal series", "--input-kind signal")
    conc = tmp_path / "conc.nrrd"
    rng = np.random.default_rng(0)
    write_dce_series(conc, DCESeries(signal=rng.normal(0.0, 0.05, series.signal.shape), times_s=series.times_s,
                                     geometry=series.geometry, flip_angle_deg=15.0, tr_s=0.005))
    refused(capsys, fit_args(phantom, tmp_path / "o", series=conc), "negative", "--input-kind concentration")


def test_an_aif_roi_on_tissue_warns_in_the_cli_the_sidecar_and_the_fit_output(phantom, tmp_path, capsys):
    from DCEPKFittingLib.io import read_dce, read_mask
    from DCEPKFittingLib.pipeline.fit import FitSettings, run_fit
    labels, geometry = read_volume(phantom / "labels.nii.gz")
    white_matter = write_volume(tmp_path / "wm_roi.nii.gz", (labels == 1).astype(np.uint8), geometry)
    out = tmp_path / "maps"
    args = fit_args(phantom, out)
    args[args.index("--aif-roi") + 1] = str(white_matter)
    assert cli.main(args) == 0
    err = capsys.readouterr().err
    assert "warning: the AIF ROI peaks at" in err and "may lie on tissue" in err
    summary = json.loads((out / "dcepk_fit.json").read_text())
    assert any("AIF ROI" in w for w in summary["warnings"])
    series = read_dce(phantom / "dce.seq.nrrd")
    grid = (series.geometry, series.spatial_shape)
    result = run_fit(series, FitSettings(t10_s=read_volume(phantom / "truth" / "T10.nii.gz")[0],
                                         r1_per_mM_s=float(R1), aif_mask=read_mask(white_matter, *grid),
                                         mask=labels > 0))
    assert any("AIF ROI" in m for m in result.messages)  # what the Slicer module shows
    good = run_fit(read_dce(phantom / "dce.seq.nrrd"), FitSettings(
        t10_s=read_volume(phantom / "truth" / "T10.nii.gz")[0], r1_per_mM_s=float(R1),
        aif_mask=read_mask(phantom / "aif_mask.nii.gz", *grid), mask=labels > 0))
    assert [m for m in good.messages if not m.startswith("input function: ")] == []  # the vessel ROI: no warning


# ------------------------------------------------------------------------------- 9. clear errors, not tracebacks
def test_vfa_images_of_another_shape_or_origin_are_named(phantom, tmp_path, capsys):
    import nibabel as nib
    signal, geometry = read_volume(phantom / "dce.seq.nrrd")
    first = write_volume(tmp_path / "fa2.nii.gz", signal[..., 0], geometry)
    smaller = write_volume(tmp_path / "fa10.nii.gz", signal[:, :-1, :, 1], geometry)
    base = ["t1map", "--fa", "2", "10", "--tr", "0.005", "--out", str(tmp_path / "t1.nii.gz")]
    refused(capsys, base[:1] + [str(first), str(smaller)] + base[1:], "vfa image fa10.nii.gz", "resample")
    image = nib.load(str(first))
    affine = image.affine.copy()
    affine[:3, 3] += 7.0
    shifted = tmp_path / "fa10_shifted.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), affine), str(shifted))
    refused(capsys, base[:1] + [str(first), str(shifted)] + base[1:], "does not lie on", "grid")
    assert not (tmp_path / "t1.nii.gz").exists()


def test_stats_refuses_bad_label_maps_and_label_names(phantom, tmp_path, capsys):
    labels, geometry = read_volume(phantom / "labels.nii.gz")
    ve = str(phantom / "truth" / "ve.nii.gz")
    soft = write_volume(tmp_path / "soft.nii.gz", labels * 0.5, geometry)
    refused(capsys, ["stats", ve, "--labels", str(soft)], "not whole numbers", "label map")
    empty = write_volume(tmp_path / "empty.nii.gz", np.zeros_like(labels), geometry)
    refused(capsys, ["stats", ve, "--labels", str(empty)], "empty")
    names = tmp_path / "names.txt"
    names.write_text("1 white matter\ntumour 4\n")
    refused(capsys, ["stats", ve, "--labels", str(phantom / "labels.nii.gz"), "--label-names", str(names)],
            "line 2", "tumour 4")
    for suffix in (".tsv", ".txt", ".csv"):  # the formats that are written, by their names
        assert cli.main(["stats", ve, "--labels", str(phantom / "labels.nii.gz"), "--out",
                         str(tmp_path / f"s{suffix}")]) == 0


# ------------------------------------------------------------------------------- 10. a kill while writing
KILLED_WRITER = textwrap.dedent("""
    import os, sys, time
    from DCEPKFittingLib.core import output_files
    from DCEPKFittingLib.workflows.cli import main
    original = output_files.StagedFile.write
    files = []
    def write(self, data):
        if self.path not in files:
            files.append(self.path)
        if len(files) == 3 and self.bytes_written > 100:  # the third map, part-written
            print("WRITING", flush=True)
            time.sleep(60)
        return original(self, data)
    output_files.StagedFile.write = write
    sys.exit(main(sys.argv[1:]))
""")


def test_a_kill_while_writing_leaves_earlier_outputs_and_no_visible_file(phantom, tmp_path):
    out = tmp_path / "maps"
    assert cli.main(fit_args(phantom, out, "--format", ".nrrd")) == 0
    before = snapshot(out)
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'DCEPKFitting'}:{ROOT / 'DCEPKInference'}")
    child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER,
                              *fit_args(phantom, out, "--format", ".nrrd", "--overwrite", "--model", "tofts")],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        assert child.stdout.readline().strip() == "WRITING"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    after = snapshot(out)
    leftovers = [name for name in after if name not in before]
    assert {name: after[name] for name in before} == before      # every earlier map byte-identical
    assert all(name.name.startswith(TEMP_PREFIX) for name in leftovers) and leftovers  # hidden temporaries only
    assert not any(name.name.endswith(".nrrd") and not name.name.startswith(".") for name in leftovers)
    # the next write into the folder sweeps the dead process's temporaries away
    assert cli.main(fit_args(phantom, tmp_path / "maps", "--format", ".nrrd", "--overwrite")) == 0
    assert not [p for p in out.iterdir() if p.name.startswith(TEMP_PREFIX)]
