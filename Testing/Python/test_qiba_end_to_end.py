"""QIBA DCE-MRI DRO v6 (standard Tofts, noise-free), read from its DICOM files end to end.

AIF from the vascular rows, T10 1.0 s in tissue and 1.44 s in blood, FA 30 deg, TR 5 ms,
r1 4.5 /mM/s, haematocrit 0.45. Published readers reach a per-patch concordance correlation of
at least 0.9999 for Ktrans and ve against the known grid.
"""

import numpy as np
import pytest

from DCEPKFittingLib.io import read_dce
from DCEPKFittingLib.pipeline.fit import FitSettings, run_fit

from conftest import require_reference
# the DRO's layout and per-patch measures: those of the noisy reference built in its image
from noisy_tofts_reference import KTRANS_BANDS, VE_BANDS, concordance_correlation, patch_medians


@pytest.fixture(scope="module")
def qiba_fit():
    folder = require_reference("qiba_v6")
    series = read_dce(folder)
    assert series.signal.shape == (1, 80, 50, 1321)
    assert series.flip_angle_deg == pytest.approx(30.0) and series.tr_s == pytest.approx(0.005)
    np.testing.assert_allclose(np.diff(series.times_s), 0.5, atol=1e-6)
    t10 = np.full(series.spatial_shape, 1.0)
    t10[:, 70:80, :] = 1.44  # blood
    aif_mask = np.zeros(series.spatial_shape, bool)
    aif_mask[:, 72:78, 2:48] = True  # vascular rows, away from the edges
    tissue = np.zeros(series.spatial_shape, bool)
    tissue[:, 10:70, :] = True
    settings = FitSettings(model="tofts", t10_s=t10, r1_per_mM_s=4.5, hct=0.45, aif_mask=aif_mask, mask=tissue)
    return run_fit(series, settings)


def test_qiba_v6_ktrans_and_ve_concordance(qiba_fit):
    true_ktrans = np.repeat(KTRANS_BANDS, len(VE_BANDS))
    true_ve = np.tile(VE_BANDS, len(KTRANS_BANDS))
    ktrans = patch_medians(qiba_fit.maps["Ktrans"])
    ve = patch_medians(qiba_fit.maps["ve"])
    ccc_ktrans = concordance_correlation(ktrans, true_ktrans)
    ccc_ve = concordance_correlation(ve, true_ve)
    print(f"QIBA v6 per-patch CCC: Ktrans {ccc_ktrans:.6f}, ve {ccc_ve:.6f}")
    assert ccc_ktrans >= 0.9999, np.c_[true_ktrans, ktrans]
    assert ccc_ve >= 0.9999, np.c_[true_ve, ve]
    # Each patch on its own, too (relative error), so a good CCC cannot hide one bad patch.
    np.testing.assert_allclose(ktrans, true_ktrans, rtol=0.05, atol=0.002)
    np.testing.assert_allclose(ve, true_ve, rtol=0.05, atol=0.005)
