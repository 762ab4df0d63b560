"""The cohort manifest of ``dcepk batch``: every problem at once before any computation, and the manifest
derived from a BIDS-like folder (run end to end, checked against the phantoms' truth)."""

import json
import shutil

import pytest

from conftest import import_or_skip
from batch_cohort import VFA_ANGLES, make_subject, read_rows, truth_median, write_manifest

import_or_skip("distributed", "dcepk batch runs on Dask (pip install -e '.[test]')")

from DCEPKFittingLib.core.errors import DCEPKInputError  # noqa: E402
from DCEPKFittingLib.workflows import cli  # noqa: E402
from DCEPKFittingLib.workflows.batch import ClusterOptions, run_batch  # noqa: E402
from DCEPKFittingLib.workflows.bids_layout import bids_manifest  # noqa: E402
from DCEPKFittingLib.workflows.cohort_manifest import BatchDefaults, ManifestProblems, read_manifest  # noqa: E402


def test_every_problem_of_a_manifest_is_reported_at_once_and_nothing_runs(tmp_path, capsys, monkeypatch):
    make_subject(tmp_path / "a", 1)
    rows = [{"subject": "a", "dce": "a/dce.seq.nrrd", "t10": "1.2", "aif": "parker", "flipangle": "15"},
            {"subject": "a", "dce": "a/dce.seq.nrrd", "t10": "1.2", "aif": "parker"},                   # duplicate
            {"subject": "b", "dce": "b/dce.nii.gz", "aif": "parker", "fa": "400", "model": "tofts"},     # 3 problems
            {"subject": "c d", "dce": "a/dce.seq.nrrd", "t10": "1200", "model": "tofs"}]               # 4 problems
    manifest = write_manifest(tmp_path / "cohort.csv", rows)
    with pytest.raises(ManifestProblems) as caught:
        read_manifest(manifest)
    problems = caught.value.problems
    expected = ["unknown column 'flipangle' (did you mean 'fa'?)",
                "row 3: sub-a is also on row 2",
                f"row 4 (b), dce: {tmp_path / 'b' / 'dce.nii.gz'} does not exist",
                "row 4 (b), fa:", "row 4 (b), t10: no pre-contrast T1",
                "row 5 (c d), subject: 'c d' is not an id",
                "row 5 (c d), t10: T10 median 1200 s is implausible",
                "row 5 (c d), model: 'tofs' is not one of",
                "row 5 (c d), aif: no input function"]
    for text in expected:
        assert any(text in problem for problem in problems), (text, problems)
    assert len(problems) == len(expected)

    monkeypatch.chdir(tmp_path)
    assert cli.main(["batch", "cohort.csv", "--out", "out"]) == 2
    error = capsys.readouterr().err
    assert f"has {len(expected)} problem(s); nothing was run" in error and "did you mean 'fa'" in error
    assert not (tmp_path / "out").exists()


def test_skip_invalid_keeps_the_valid_rows_and_names_the_others(tmp_path):
    make_subject(tmp_path / "a", 1)
    rows = [{"subject": "a", "dce": "a/dce.seq.nrrd", "t10": "1.2", "aif": "parker"},
            {"subject": "b", "dce": "b/dce.nii.gz", "t10": "1.2", "aif": "parker"}]
    manifest = read_manifest(write_manifest(tmp_path / "cohort.csv", rows), skip_invalid=True)
    assert [spec.key for spec in manifest.specs] == ["sub-a"]
    assert manifest.specs[0].options["t10_s"] == 1.2 and manifest.specs[0].options["population_aif"] == "parker"
    assert [row.key for row in manifest.invalid] == ["sub-b"] and "does not exist" in manifest.invalid[0].problems[0]
    # a wrong header is never skipped
    with pytest.raises(ManifestProblems):
        read_manifest(write_manifest(tmp_path / "bad.csv", [dict(rows[0], colour="red")]), skip_invalid=True)


def _bids_folder(tmp_path):
    """sub-01/ses-pre: T1 map, ROI, labels with a dseg.tsv; sub-02: BIDS VFA images, no ROI (default AIF)."""
    root = tmp_path / "bids"
    for seed, name in ((1, "p1"), (2, "p2")):
        make_subject(tmp_path / name, seed)
    protocol = json.loads((tmp_path / "p1" / "protocol.json").read_text())["protocol"]
    one = root / "sub-01" / "ses-pre"
    (one / "dce").mkdir(parents=True)
    (one / "anat").mkdir()
    shutil.copy(tmp_path / "p1" / "dce.seq.nrrd", one / "dce" / "sub-01_ses-pre_dce.nrrd")
    (one / "dce" / "sub-01_ses-pre_dce.json").write_text(json.dumps(
        {"FlipAngle": protocol["fa_deg"], "RepetitionTimeExcitation": protocol["tr_s"],
         "VolumeTiming": protocol["times_s"]}))
    shutil.copy(tmp_path / "p1" / "aif_mask.nii.gz", one / "dce" / "sub-01_ses-pre_aifmask.nii.gz")
    shutil.copy(tmp_path / "p1" / "truth" / "T10.nii.gz", one / "anat" / "sub-01_ses-pre_T1map.nii.gz")
    shutil.copy(tmp_path / "p1" / "labels.nii.gz", one / "anat" / "sub-01_ses-pre_dseg.nii.gz")
    names = [line.split(" ", 1) for line in (tmp_path / "p1" / "labels.txt").read_text().splitlines()]
    (one / "anat" / "sub-01_ses-pre_dseg.tsv").write_text("index\tname\n" + "".join(f"{v}\t{n}\n" for v, n in names))
    two = root / "sub-02"
    (two / "dce").mkdir(parents=True)
    (two / "anat").mkdir()
    shutil.copy(tmp_path / "p2" / "dce.seq.nrrd", two / "dce" / "sub-02_dce.nrrd")
    (two / "dce" / "sub-02_dce.json").write_text(json.dumps({"FlipAngle": protocol["fa_deg"],
                                                             "RepetitionTimeExcitation": protocol["tr_s"]}))
    for number, angle in enumerate(VFA_ANGLES, start=1):
        shutil.copy(tmp_path / "p2" / "vfa" / f"fa{angle}.nii.gz", two / "anat" / f"sub-02_flip-{number}_VFA.nii.gz")
        (two / "anat" / f"sub-02_flip-{number}_VFA.json").write_text(json.dumps(
            {"FlipAngle": angle, "RepetitionTimeExcitation": protocol["vfa_tr_s"]}))
    shutil.copy(tmp_path / "p2" / "labels.nii.gz", two / "anat" / "sub-02_dseg.nii.gz")
    return root


def test_a_bids_like_folder_gives_a_manifest_that_runs(tmp_path):
    root = _bids_folder(tmp_path)
    assert cli.main(["manifest", str(root), "--out", str(tmp_path / "derived.csv")]) == 0
    one, two = read_rows(tmp_path / "derived.csv")
    assert (one["subject"], one["session"], two["subject"], two["session"]) == ("01", "pre", "02", "")
    assert one["t10"] == "bids/sub-01/ses-pre/anat/sub-01_ses-pre_T1map.nii.gz"   # relative to the manifest
    assert one["aif"].endswith("_aifmask.nii.gz") and one["label_names"].endswith("_dseg.tsv")
    assert (one["fa"], one["tr"], one["times"].split(";")[:3]) == ("15", "0.005", ["0", "6", "12"])
    assert two["vfa"].split(";") == [f"bids/sub-02/anat/sub-02_flip-{n}_VFA.nii.gz" for n in range(1, 6)]
    assert (two["vfa_fa"], two["vfa_tr"], two["aif"]) == ("2;5;10;15;20", "0.005", "")
    with pytest.raises(ManifestProblems, match="row 3 \\(02\\), aif: no input function"):
        read_manifest(tmp_path / "derived.csv")

    manifest = bids_manifest(root, BatchDefaults(aif="parker"))   # the same rows, the default AIF for sub-02
    summary = run_batch(manifest, tmp_path / "out", device="cpu",
                        cluster=ClusterOptions(workers=1, processes=False, dashboard_address=None))
    assert summary.exit_code == 0, summary.outcomes
    rows = read_rows(tmp_path / "out" / "cohort_statistics.csv")
    for subject, phantom in (("01", "p1"), ("02", "p2")):
        rim = [r for r in rows if (r["subject"], r["map"], r["label"]) == (subject, "Ktrans", "4")]
        assert float(rim[0]["median"]) == pytest.approx(truth_median(tmp_path / phantom, "Ktrans"), rel=0.12)
    assert {r["segment"] for r in rows if r["subject"] == "01"} >= {"enhancing tumour rim", "white matter"}


def test_a_folder_without_dce_series_is_refused(tmp_path):
    (tmp_path / "sub-01" / "anat").mkdir(parents=True)
    with pytest.raises(DCEPKInputError, match="no sub-\\*/\\[ses-\\*/\\]dce"):
        bids_manifest(tmp_path)
