"""Training configuration: the defaults, the fixed seeds of the validation, calibration and check
sets, the descriptions and uncertainty methods written into model cards, and ``load_config``."""

import json
from pathlib import Path
from typing import Dict

from DCEPKFittingLib.core.errors import DCEPKInputError

from ..nn.model_store import models_dir
from ..nn.networks import NETWORKS, network_class

CONFIG_DIR = models_dir() / "configs"
DEFAULT_TRAINING = {"steps": 1000, "lr": 2e-3, "weight_decay": 1e-4, "seed": 1, "val_seed": 900001,
                    "val_subjects": 32, "val_voxels_per_subject": 128, "val_patches": 24,
                    "subjects_per_batch": 16, "voxels_per_subject": 256, "patches_per_batch": 8,
                    "patch_size": 32, "checkpoint_every": 200, "log_every": 25, "temporal_shift_max": 4,
                    "grad_clip": 5.0,
                    # AIF-conditioned voxel networks: a pool of encoded subjects, refreshed through the run
                    "pool_subjects": 4096, "refresh_every": 400, "refresh_subjects": 256, "batch_voxels": 1024,
                    # ... and 2-D networks: a pool of encoded patches
                    "pool_patches": 512, "refresh_patches": 32,
                    # ... and the image-only reader: a pool of slices with vessels
                    "pool_slices": 256, "refresh_slices": 32, "slice_size": 64, "slices_per_batch": 8}
BUDGET_PROBE_STEPS = 20
CALIBRATION_SUBJECTS = 128        # patches or voxel groups (one AIF each) in the SD calibration set
# as many subjects as the card's calibration: subject-to-subject (AIF) spread makes 64 too few (coverage
# of one network on three 64-subject sets: 0.88-0.91)
PROTOCOL_CALIBRATION = {"seed": 900003, "subjects": CALIBRATION_SUBJECTS, "subjects_per_chunk": 8,
                        "voxels_per_subject": 64, "patch_size": 32}
CHECK_SET = {"seed": 424242, "subjects": 8, "voxels_per_subject": 64, "patches": 4}
DESCRIPTIONS = {
    "hetero_encoder": "voxel-wise temporal encoder (patch embedding + MLP), heteroscedastic Laplace/Gaussian NLL, "
                      "temporal-shift augmentation, small jointly trained ensemble (after Hess et al.)",
    "ulas_cnn": "2-D CNN, grid frames as channels, local (3x3) + dilated global pathway, parameter + tracer-kinetic "
                "loss (after Ulas et al. 2019)",
    "fcsa_net": "2-D CNN with frame attention and channel/spatial (CBAM) attention (after Zeng & Zhou, FCSA-net)",
    "tcn_punet": "per-voxel temporal convolutional network then a probabilistic U-Net over the slice; mean and SD "
                 "from latent samples, plus an aleatoric variance head when aleatoric_head is on (after Lyoo et "
                 "al. 2025)",
}
_CALIBRATED = ", times per-parameter factors fitted on a held-out simulated set (sd_calibration)"
UNCERTAINTY_METHOD = {
    "hetero_encoder": "heteroscedastic NLL head (aleatoric) per ensemble member; SD^2 = mean member variance "
                      "+ variance of member means (epistemic)" + _CALIBRATED,
    "ulas_cnn": "added Gaussian variance head trained by NLL (aleatoric only)" + _CALIBRATED,
    "fcsa_net": "added Gaussian variance head trained by NLL (aleatoric only)" + _CALIBRATED,
    "tcn_punet": "SD over latent draws from the prior net of the probabilistic U-Net (floor 1e-3 of the bound)"
                 + _CALIBRATED,
}
_OWN_HEAD = "added Gaussian variance head with a hidden layer of its own, trained by NLL (aleatoric only)"
UNCERTAINTY_METHOD_WITH_ALEATORIC_HEAD = {
    "ulas_cnn": _OWN_HEAD + _CALIBRATED,
    "fcsa_net": _OWN_HEAD + _CALIBRATED,
    "tcn_punet": "SD^2 = variance over latent draws from the prior net of the probabilistic U-Net + the variance "
                 "of an added Gaussian head trained by NLL (aleatoric)" + _CALIBRATED,
}


_PROFILE = "the input function's extended-Tofts profile likelihood over a kep bank (aif_encoding)"
CONDITIONED_DESCRIPTIONS = {
    "hetero_encoder": f"AIF-conditioned voxel-wise network: {_PROFILE} into an ensemble of MLPs with an anchored "
                      "Laplace head",
    "ulas_cnn": f"AIF-conditioned 2-D CNN (after Ulas et al. 2019): {_PROFILE} as pixel channels, local + dilated "
                "global pathway, anchored Laplace head, tracer-kinetic loss with the given input function",
    "fcsa_net": f"AIF-conditioned frame/channel/spatial attention CNN (after Zeng & Zhou): {_PROFILE} as pixel "
                "channels plus a [tissue, input function, residual] stream on the 4 s grid with frame attention, "
                "anchored Laplace head",
    "tcn_punet": f"AIF-conditioned TCN + probabilistic U-Net (after Lyoo et al. 2025): a per-pixel TCN over the "
                 f"[tissue, input function, residual] stream joined to {_PROFILE}, U-Net with a latent, anchored "
                 "Laplace head",
}
_LAPLACE = "Laplace NLL scale of the anchored head (SD = sqrt(2) b)"
CONDITIONED_UNCERTAINTY = {
    "hetero_encoder": f"{_LAPLACE} per ensemble member; SD^2 = mean member variance + variance of member locations"
                      + _CALIBRATED,
    "ulas_cnn": _LAPLACE + _CALIBRATED,
    "fcsa_net": _LAPLACE + _CALIBRATED,
    "tcn_punet": f"SD^2 = variance over latent draws of the probabilistic U-Net + the mean {_LAPLACE} variance"
                 + _CALIBRATED,
}


READER_DESCRIPTION = ("image-only input-function reader: per-pixel descriptors into an attention over the slice "
                      "(1x1 and dilated 3x3 convolutions), the attention-weighted blood curve with an amplitude "
                      "correction; its curve feeds the AIF-conditioned networks")


def description(model_name: str, network_config: Dict) -> str:
    if network_config.get("mode") == "aif_reader":
        return READER_DESCRIPTION
    if network_config.get("mode") == "aif_conditioned":
        return CONDITIONED_DESCRIPTIONS[model_name]
    return DESCRIPTIONS[model_name]


def uncertainty_method(model_name: str, network_config: Dict) -> str:
    if network_config.get("mode") == "aif_reader":
        return "log-amplitude SD of the input function (Gaussian NLL), not calibrated"
    if network_config.get("mode") == "aif_conditioned":
        return CONDITIONED_UNCERTAINTY[model_name]
    if model_name == "hetero_encoder" and int(network_config.get("members", 1)) == 1:
        return "heteroscedastic NLL head (aleatoric only: one member, no ensemble spread)" + _CALIBRATED
    if network_config.get("aleatoric_head"):
        return UNCERTAINTY_METHOD_WITH_ALEATORIC_HEAD[model_name]
    return UNCERTAINTY_METHOD[model_name]



def shipped_configs() -> Dict[str, Path]:
    """{model name: config file} of every shipped model (a config in ``CONFIG_DIR`` per model file)."""
    return {path.stem: path for path in sorted(CONFIG_DIR.glob("*.json"))}


def load_config(model_name: str, path=None) -> Dict:
    """Training config: the JSON file given, else the shipped ``configs/<model>.json``, else defaults."""
    if model_name not in NETWORKS and model_name != "aif_reader":
        raise DCEPKInputError(f"unknown network {model_name!r}: choose one of {sorted(NETWORKS)}")
    path = Path(path) if path else CONFIG_DIR / f"{model_name}.json"
    config = {"network": model_name, "network_config": {}, "training": {}, "selection": None, "cpu_budget": None}
    if path.is_file():
        try:
            loaded = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise DCEPKInputError(f"config {path} is not valid JSON: {error}") from None
        if loaded.get("network", model_name) != model_name:
            raise DCEPKInputError(f"config {path} is for '{loaded['network']}', not '{model_name}'")
        config.update({k: v for k, v in loaded.items() if k in config})
    elif path.name != f"{model_name}.json" or path.parent != CONFIG_DIR:
        raise DCEPKInputError(f"config file {path} not found")
    config["training"] = {**DEFAULT_TRAINING, **config["training"]}
    config["network_config"] = {**network_class(model_name, config["network_config"]).default_config,
                                **config["network_config"]}
    return config
