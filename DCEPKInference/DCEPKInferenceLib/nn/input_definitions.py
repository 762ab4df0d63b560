"""What each network mode is given, as written into its model card: the AIF-conditioned encoding
(``aif_encoding``) and the image-only reader's input (``aif_reader``). Numpy only, so the cards can be
checked where torch is not installed (the module panel lists the networks before torch is)."""

from dataclasses import dataclass
from typing import Optional

import numpy as np

KEP_BANK_PER_MIN = tuple(float(k) for k in np.geomspace(0.005, 60.0, 40))
SIGMA_FLOOR_MM = 1e-3
DSSR_CLIP = 200.0
ENCODING_VERSION = 1
N_BANK = len(KEP_BANK_PER_MIN)
PER_KEP_FEATURES = ("asinh(Ktrans_j / 0.1)", "asinh(vp_j / 0.05)", "log1p(dSSR_j / sigma^2)", "log SE(Ktrans_j)",
                    "log SE(vp_j)", "corr(Ktrans_j, vp_j)")
GLOBAL_FEATURES = ("posterior mean asinh(Ktrans/0.1), asinh(ve/0.1), asinh(vp/0.05)",
                   "anchor asinh(Ktrans/0.1), asinh(ve/0.1), asinh(vp/0.05)", "log posterior SD x3",
                   "log baseline noise SD", "log(fit noise / baseline noise)", "duration / 600 s",
                   "log(frames) / 5", "baseline frames / frames")
FEATURE_COUNT = len(PER_KEP_FEATURES) * N_BANK + 14
# Written into every AIF-conditioned model card; a card naming another encoding is refused at load time.
ENCODING = {"kind": "tofts_profile", "version": ENCODING_VERSION, "kep_bank_per_min": list(KEP_BANK_PER_MIN),
            "per_kep": list(PER_KEP_FEATURES), "global": list(GLOBAL_FEATURES), "features": FEATURE_COUNT,
            "sigma_floor_mM": SIGMA_FLOOR_MM, "dssr_clip": DSSR_CLIP}

NOMINAL_BLOOD_T10_S = 1.6
COARSE_POINTS = 32
SCALARS = ("log S0 / median S0", "asinh peak RE", "time to peak after earliest arrival / 60 s",
           "first moment after earliest arrival / 60 s", "late / peak", "log CNR")
DESCRIPTORS = len(SCALARS) + COARSE_POINTS
READER_INPUT = {"descriptors": list(SCALARS) + [f"RE on {COARSE_POINTS} coarse points"],
                "curves": f"blood concentration with T10 {NOMINAL_BLOOD_T10_S} s on the canonical grid"}


READER_MODEL = "aif_reader"
READ_MASK_FILE = "aif_read_mask.nii.gz"   # dcepk infer --mode image: the voxels carrying most of the attention
READ_CURVE_FILE = "aif_read.csv"          # ... and the plasma curve the reader read (time s, mM)
READ_LABEL = 1                            # the label of those voxels in its mask


@dataclass
class ReadFromImage:
    """The input function of image-only mode, found in the series with no ROI: by automatic detection
    (kind 'either', as ``--auto-aif``), and where that finds no usable vessel, read by the reader network
    ``reader`` (``pipeline.image_input_function``; plasma directly). ``reader_only``: the network always
    (the published route; on the project's phantom it misread the vessel, see the Models README).
    ``hct`` and ``blood_t10_s`` (s; None: 1.6 s) convert the detected vessel's blood signal."""

    reader: str = READER_MODEL
    reader_only: bool = False
    hct: float = 0.45
    blood_t10_s: Optional[float] = None

    def describe(self) -> str:
        if self.reader_only:
            return f"read from the image by the {self.reader} network"
        return f"read from the image (automatic detection; where it finds no vessel, the {self.reader} network)"

    def detection(self):
        """The automatic detection this mode tries first (an ``InputFunctionSpec``)."""
        from DCEPKFittingLib.pipeline.input_function import InputFunctionSpec
        return InputFunctionSpec(auto_aif="either", hct=self.hct, blood_t10_s=self.blood_t10_s)

    def check(self) -> "ReadFromImage":
        self.detection().check()
        return self
