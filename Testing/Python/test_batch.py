"""``dcepk batch`` on a synthetic cohort: Dask, a real kill and a resume, the table against the phantoms' truth.

Truths: each subject's phantom ground truth (``truth/*.nii.gz``), the label map's voxel counts, and the
files of the finished subjects themselves (inode, modification time and bytes, before and after a rerun).
"""

import json
import os
import shutil
import signal
import subprocess

import pytest

from conftest import import_or_skip
from batch_cohort import (QUICK_CLUSTER, batch_command, file_states, make_subject, read_rows, start_batch,
                          subject_row, truth_median, write_manifest)

pq = import_or_skip("pyarrow.parquet", "dcepk batch writes Parquet (pip install -e '.[test]')")
import_or_skip("distributed", "dcepk batch runs on Dask (pip install -e '.[test]')")

from DCEPKFittingLib.io import read_volume  # noqa: E402
from DCEPKFittingLib.sims.phantom import TUMOUR_RIM  # noqa: E402
from DCEPKFittingLib.workflows.batch import ClusterOptions, run_batch  # noqa: E402
from DCEPKFittingLib.workflows.batch_command import SUBJECT_KEY  # noqa: E402
from DCEPKFittingLib.workflows.cohort_manifest import read_manifest  # noqa: E402

GOOD = ("s01", "s02", "s03", "s04")
KEYS = {"s01": "sub-s01_ses-1", "s02": "sub-s02_ses-1", "s03": "sub-s03", "s04": "sub-s04", "s05": "sub-s05",
        "s06": "sub-s06"}
FOLDERS = {"sub-s01_ses-1": "sub-s01/ses-1", "sub-s02_ses-1": "sub-s02/ses-1", "sub-s03": "sub-s03",
           "sub-s04": "sub-s04"}


def _cohort(tmp_path):
    """Six subjects: VFA + vessel ROI (two with a session), a T10 map, a population AIF, a network only,
    a corrupt (truncated) series and one whose T1 series is missing."""
    for seed, name in enumerate(("s01", "s02", "s03", "s04", "s05", "s06"), start=1):
        make_subject(tmp_path / name, seed)
    series = tmp_path / "s05" / "dce.seq.nrrd"
    series.write_bytes(series.read_bytes()[: series.stat().st_size * 2 // 3])
    shutil.rmtree(tmp_path / "s06" / "vfa")
    rows = [subject_row("s01", session="1"),
            subject_row("s02", session="1", vfa="", vfa_fa="", vfa_tr="", t10="s02/truth/T10.nii.gz"),
            subject_row("s03", aif="parker"),
            subject_row("s04", model="none", network="hetero_encoder_fast"),
            subject_row("s05"), subject_row("s06")]
    return write_manifest(tmp_path / "cohort.csv", rows)


def _subject_events(stdout: str):
    """The batch's JSON line per subject (``--progress-format json``), by subject key."""
    events = [json.loads(line) for line in stdout.splitlines() if line.startswith('{"%s"' % SUBJECT_KEY)]
    return {event[SUBJECT_KEY]: event for event in events}


def _kill_after_first_subject(tmp_path, args):
    """Start the batch, SIGKILL its whole process group once the first subject has finished."""
    process = start_batch(*args, cwd=tmp_path)
    try:
        for line in process.stdout:
            if any(event["state"] == "done" for event in _subject_events(line).values()):
                os.killpg(process.pid, signal.SIGKILL)
                break
    finally:
        process.communicate(timeout=120)
    assert process.returncode == -signal.SIGKILL, process.stderr


def test_cohort_on_dask_survives_a_kill_resumes_only_the_unfinished_and_matches_the_truth(tmp_path):
    manifest = _cohort(tmp_path)
    out = tmp_path / "out"
    args = [manifest.name, "--out", "out", "--progress-format", "json", *QUICK_CLUSTER]

    # The manifest is checked before any computation: the missing T1 series stops everything (status 2).
    refused = subprocess.run(batch_command(*args), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2, refused.stderr
    assert "row 7 (s06), vfa:" in refused.stderr and "fa2.nii.gz does not exist" in refused.stderr
    assert not out.exists()

    # With --skip-invalid the valid rows run; the run is killed (SIGKILL, batch and workers) mid-way.
    args.append("--skip-invalid")
    _kill_after_first_subject(tmp_path, args)
    finished = {key for key, folder in FOLDERS.items() if (out / "subjects" / folder / "run.json").is_file()}
    assert 1 <= len(finished) < len(GOOD), finished
    before = {key: file_states(out / "subjects" / FOLDERS[key]) for key in finished}

    # The rerun recomputes only the unfinished subjects; the finished ones are neither lost nor rewritten.
    rerun = subprocess.run(batch_command(*args), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 1, rerun.stderr   # 1: some subjects failed (not a crash: the summary line below)
    assert "dcepk batch: 4 of 6 subjects finished" in rerun.stderr, rerun.stderr
    states = {key: event["state"] for key, event in _subject_events(rerun.stdout).items()}
    assert states == {KEYS[name]: ("up to date" if KEYS[name] in finished else "done") for name in GOOD} | {
        "sub-s05": "failed", "sub-s06": "invalid"}
    for key in finished:
        assert file_states(out / "subjects" / FOLDERS[key]) == before[key], key

    _check_table_against_truth(tmp_path, out)
    _check_failures_and_report(out)


def _check_table_against_truth(tmp_path, out):
    rows = read_rows(out / "cohort_statistics.csv")
    assert len(pq.read_table(out / "cohort_statistics.parquet").to_pylist()) == len(rows)
    labels, _ = read_volume(tmp_path / "s01" / "labels.nii.gz")

    def row(subject, method, name, label=TUMOUR_RIM):
        found = [r for r in rows if (r["subject"], r["method"], r["map"], r["label"]) == (subject, method, name,
                                                                                         str(label))]
        assert len(found) == 1, (subject, method, name)
        return found[0]

    assert {r["subject"] for r in rows} == set(GOOD)
    for subject in ("s01", "s02", "s03"):   # VFA T1 + ROI AIF, T10 map, population AIF
        labels, _ = read_volume(tmp_path / subject / "labels.nii.gz")
        for name, tolerance in (("Ktrans", 0.12), ("ve", 0.15)):
            truth = truth_median(tmp_path / subject, name)
            assert float(row(subject, "fit", name)["median"]) == pytest.approx(truth, rel=tolerance), (subject, name)
        rim = row(subject, "fit", "Ktrans")
        counts = {column: int(value) for column, value in rim.items() if column.startswith("n_")}
        assert sum(counts.values()) == int((labels == TUMOUR_RIM).sum())   # every rim voxel, by fit status
        assert counts["n_fitted"] >= 0.8 * int((labels == TUMOUR_RIM).sum())
        assert int(rim["count"]) <= counts["n_fitted"] + counts["n_at_bound"] + counts["n_not_enhancing"]
        assert float(row(subject, "fit", "Ktrans_se")["median"]) > 0   # uncertainties are in the table too
    network = row("s04", "network", "Ktrans_sd")
    labels, _ = read_volume(tmp_path / "s04" / "labels.nii.gz")
    assert int(network["count"]) == int((labels == TUMOUR_RIM).sum()) and float(network["median"]) > 0


def _check_failures_and_report(out):
    subjects = {r["key"]: r for r in read_rows(out / "subjects.csv")}
    assert "truncated" in subjects["sub-s05"]["error"] or "shorter" in subjects["sub-s05"]["error"], subjects
    assert "Traceback" not in subjects["sub-s05"]["error"]
    assert "Traceback" in (out / subjects["sub-s05"]["log"]).read_text()
    assert "does not exist" in subjects["sub-s06"]["error"]
    report = (out / "report.md").read_text()
    assert "| s05 |" in report and "| s06 |" in report and "report_distributions.png" in report
    assert (out / "report_distributions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_changed_inputs_or_options_recompute_only_those_subjects(tmp_path):
    for seed, name in enumerate(("a", "b"), start=1):
        make_subject(tmp_path / name, seed)
    rows = [subject_row("a", aif="parker"), subject_row("b", aif="parker")]
    manifest = write_manifest(tmp_path / "cohort.tsv", rows)
    out = tmp_path / "out"
    cluster = ClusterOptions(workers=1, processes=False, dashboard_address=None)

    def run():
        summary = run_batch(read_manifest(manifest), out, cluster=cluster, device="cpu")
        assert summary.exit_code == 0
        return {o["subject"]: o["state"] for o in summary.outcomes}

    assert run() == {"a": "done", "b": "done"}
    assert (out / "subjects/sub-b/maps_fit/vp.nii.gz").is_file()
    # a new modification time with the same bytes: the checksum says nothing changed
    labels = tmp_path / "a" / "labels.nii.gz"
    os.utime(labels, ns=(labels.stat().st_atime_ns, labels.stat().st_mtime_ns + 10**9))
    assert run() == {"a": "up to date", "b": "up to date"}
    # another model for b: b again (its extended Tofts vp map, no longer made, is removed); a untouched
    before = file_states(out / "subjects" / "sub-a")
    write_manifest(manifest, [rows[0], dict(rows[1], model="tofts")])
    assert run() == {"a": "up to date", "b": "done"}
    assert not (out / "subjects/sub-b/maps_fit/vp.nii.gz").exists()
    assert file_states(out / "subjects" / "sub-a") == before
    # other bytes in an input of a (its label names): a again
    names = tmp_path / "a" / "labels.txt"
    names.write_text(names.read_text().replace("white matter", "WM"))
    assert run() == {"a": "done", "b": "up to date"}
    assert "WM" in {r["segment"] for r in read_rows(out / "cohort_statistics.csv")}


def test_an_output_folder_of_other_files_is_refused(tmp_path, capsys, monkeypatch):
    make_subject(tmp_path / "a", 1)
    write_manifest(tmp_path / "cohort.csv", [subject_row("a")])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "thesis.docx").write_text("mine")
    from DCEPKFittingLib.workflows import cli
    monkeypatch.chdir(tmp_path)
    assert cli.main(["batch", "cohort.csv", "--out", "out", *QUICK_CLUSTER]) == 2
    assert "did not write" in capsys.readouterr().err
    assert os.listdir(tmp_path / "out") == ["thesis.docx"]



def test_an_unexpected_error_of_the_batch_is_status_3_not_some_subjects_failed(tmp_path, capsys, monkeypatch):
    """Status 1 means "some subjects failed" (the Logic then reads the batch record): a crash must not say it."""
    make_subject(tmp_path / "a", 1)
    write_manifest(tmp_path / "cohort.csv", [subject_row("a")])
    from DCEPKFittingLib.workflows import batch_command, cli

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in the batch")

    monkeypatch.setattr(batch_command, "run_batch", broken)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["batch", "cohort.csv", "--out", "out", *QUICK_CLUSTER]) == 3
    error = capsys.readouterr().err
    assert "RuntimeError: a bug in the batch" in error and "run the same command again to resume" in error


def test_an_aif_conditioned_network_and_the_fit_share_the_subjects_input_function(tmp_path):
    """The manifest's input function reaches an AIF-conditioned network (the vessel ROI) and the fit
    (automatic detection): both rim medians against the phantom's truth."""
    for seed, name in enumerate(("a", "b"), start=1):
        make_subject(tmp_path / name, seed)
    rows = [subject_row("a", model="none", network="hetero_encoder_aif"), subject_row("b", aif="auto")]
    out = tmp_path / "out"
    from DCEPKFittingLib.workflows.plugins import network_provider
    manifest = read_manifest(write_manifest(tmp_path / "cohort.csv", rows), network_names=network_provider()["names"])
    summary = run_batch(manifest, out,
                        cluster=ClusterOptions(workers=1, processes=False, dashboard_address=None), device="cpu")
    assert summary.exit_code == 0, [o for o in summary.outcomes]
    rows = read_rows(out / "cohort_statistics.csv")
    for subject, method in (("a", "network"), ("b", "fit")):
        for name in ("Ktrans", "ve"):
            found = [r for r in rows if (r["subject"], r["method"], r["map"], r["label"]) ==
                     (subject, method, name, str(TUMOUR_RIM))]
            truth = truth_median(tmp_path / subject, name)
            print(subject, method, name, found[0]["median"], truth)
            assert float(found[0]["median"]) == pytest.approx(truth, rel=0.15), (subject, method, name)
    notes = json.loads((out / "subjects" / "sub-b" / "summary.json").read_text())["notes"]
    assert any("automatic detection" in note for note in notes), notes
