"""Entry points the fitting core finds through ``DCEPKFittingLib.workflows.plugins`` (it never imports us).

pyproject.toml registers (lead's file)::

    [project.entry-points."dcepk.commands"]
    inference = "DCEPKInferenceLib.workflows.plugin:commands"
    [project.entry-points."dcepk.demo_analyses"]
    inference = "DCEPKInferenceLib.workflows.plugin:demo_analyses"
    [project.entry-points."dcepk.networks"]
    inference = "DCEPKInferenceLib.workflows.plugin:networks"
"""

from typing import Dict

DEMO_MODEL = "hetero_encoder"


def _infer_main(argv):
    from .infer_command import infer_main
    return infer_main(argv)


def _train_main(argv):
    from .train_command import train_main
    return train_main(argv)


def commands() -> Dict[str, tuple]:
    # torch is imported only when one of these runs, so `dcepk --help` and the other commands start fast.
    return {"infer": ("PK maps with uncertainty by a shipped neural network (no AIF)", _infer_main),
            "train": ("train an inference network on simulated DCE data", _train_main)}


def demo_analyses(series, mask, device, progress, t10_s, r1_per_mM_s) -> Dict[str, dict]:
    """The demo's network maps: {method name: maps} with the default voxel-wise network."""
    from ..pipeline.inference import run_inference
    result = run_inference(series, DEMO_MODEL, mask=mask, device=device, progress=progress, t10_s=t10_s,
                           r1_per_mM_s=r1_per_mM_s)
    return {DEMO_MODEL: result.maps}


def networks() -> Dict[str, object]:
    """The shipped networks for ``dcepk batch`` (the fitting core's ``plugins.network_provider``): an
    AIF-conditioned one takes the subject's input function (the fit's), an AIF-free one none."""
    def names():
        from ..nn.model_store import list_models, model_mode
        return [card["name"] for card in list_models() if model_mode(card) in ("aif_free", "aif_conditioned")]

    def maps(series, name, mask, device, t10_s, fa_deg, tr_s, r1_per_mM_s, baseline_frames, input_function=None):
        from ..nn.model_store import model_mode, read_card
        from ..pipeline.inference import run_inference
        conditioned = model_mode(read_card(name)) == "aif_conditioned"
        return run_inference(series, name, mask=mask, device=device, t10_s=t10_s, fa_deg=fa_deg, tr_s=tr_s,
                             r1_per_mM_s=r1_per_mM_s, baseline_frames=baseline_frames,
                             input_function=input_function if conditioned else None)

    return {"names": names, "maps": maps}
