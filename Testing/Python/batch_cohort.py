"""Small synthetic cohorts for the ``dcepk batch`` tests: subjects made by ``dcepk phantom``, with truth."""

import csv
import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np

from DCEPKFittingLib.io import read_volume
from DCEPKFittingLib.sims.phantom import TUMOUR_RIM
from DCEPKFittingLib.workflows import cli

ROOT = Path(__file__).resolve().parents[2]
VFA_ANGLES = (2, 5, 10, 15, 20)
# 2 slices of 32 x 32 (every tissue and a tumour rim), 30 frames 6 s apart: a subject fits in a fraction of a second
SHAPE, FRAMES, FRAME_TIME_S = ("2", "32", "32"), "30", "6"
# a local cluster of one worker thread in the batch's own process: fast to start, subjects in turn
QUICK_CLUSTER = ["--workers", "1", "--no-processes", "--dashboard-address", "none"]


def make_subject(folder: Path, seed: int) -> Path:
    assert cli.main(["phantom", "--out", str(folder), "--shape", *SHAPE, "--frames", FRAMES, "--frame-time",
                     FRAME_TIME_S, "--seed", str(seed)]) == 0
    return folder


def vfa_cells(name: str) -> Dict[str, str]:
    return {"vfa": ";".join(f"{name}/vfa/fa{angle}.nii.gz" for angle in VFA_ANGLES),
            "vfa_fa": ";".join(str(angle) for angle in VFA_ANGLES), "vfa_tr": "0.005"}


def subject_row(name: str, **cells) -> Dict[str, str]:
    """A manifest row of a phantom subject: its series, VFA images, vessel ROI, labels and their names."""
    row = {"subject": name, "dce": f"{name}/dce.seq.nrrd", **vfa_cells(name), "aif": f"{name}/aif_mask.nii.gz",
           "labels": f"{name}/labels.nii.gz", "label_names": f"{name}/labels.txt"}
    row.update(cells)
    return row


def write_manifest(path: Path, rows: List[Dict[str, str]]) -> Path:
    columns = list(dict.fromkeys(column for row in rows for column in row))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, delimiter="\t" if path.suffix == ".tsv" else ",")
        writer.writeheader()
        writer.writerows(rows)
    return path


def truth_median(subject: Path, name: str, label: int = TUMOUR_RIM) -> float:
    truth, _ = read_volume(subject / "truth" / f"{name}.nii.gz")
    labels, _ = read_volume(subject / "labels.nii.gz")
    return float(np.median(truth[labels == label]))


def read_rows(path: Path) -> List[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def batch_command(*args) -> List[str]:
    return [sys.executable, "-m", "DCEPKFittingLib.workflows.cli", "batch", *map(str, args)]


def start_batch(*args, cwd: Path) -> subprocess.Popen:
    """``dcepk batch`` as a child process in a process group of its own (so a kill reaches its workers)."""
    return subprocess.Popen(batch_command(*args), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def file_states(folder: Path) -> Dict[str, tuple]:
    """Every file under ``folder``: (inode, modification time in ns, SHA-256 of its bytes)."""
    states = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        stat = os.stat(path)
        states[str(path.relative_to(folder))] = (stat.st_ino, stat.st_mtime_ns,
                                                 hashlib.sha256(path.read_bytes()).hexdigest())
    return states
