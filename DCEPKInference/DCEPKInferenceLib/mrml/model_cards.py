"""The shipped networks for the panel: their model cards (``nn.model_store`` reads them without torch, so the
panel describes the networks before the user agrees to install it), a card described in words, and the maps
the networks give with their units (OSIPI, from the fit's result type)."""

from typing import Mapping

from DCEPKFittingLib.kinetics.fit_result import map_units

from ..nn.model_store import list_models, model_mode

PARAMETERS = ("Ktrans", "ve", "vp", "kep")
UNITS = {name: unit for name, unit in map_units("etofts", uncertainty="sd").items() if name in PARAMETERS}


def model_cards(directory=None) -> list:
    """Model cards of the shipped networks that make maps (``$DCEPK_MODELS_DIR``, else the installed models
    folder); image mode's reader (mode 'aif_reader') is not one to choose."""
    return [card for card in list_models(directory) if model_mode(card) != "aif_reader"]


def _number(value, digits=3) -> str:
    try:
        return f"{float(value):.{digits}g}"
    except (TypeError, ValueError):
        return "?"


def describe_model_card(card: Mapping) -> str:
    """The model card as short HTML for the module panel: what the network is, what it was trained on,
    what it outputs (with units), how it was validated."""
    name = card.get("name", card.get("network", "?"))
    lines = [f"<b>{name}</b> ({card.get('architecture', card.get('network', ''))}, "
             f"{int(card.get('n_parameters', 0))} weights)<br>{card.get('description', '')}"]
    outputs = card.get("outputs") or {p: UNITS[p] for p in PARAMETERS[:3]}
    lines.append("<br><b>Outputs</b>: " + ", ".join(f"{p} ({u})" for p, u in outputs.items())
                 + "; kep = Ktrans/ve (1/min); each with a 1-SD uncertainty map (&lt;name&gt;_sd, same unit).")
    if card.get("uncertainty"):
        lines.append(f"<br><b>Uncertainty</b>: {card['uncertainty']}")
    ranges = card.get("simulator_ranges", {})
    if ranges:
        trained = []
        for key, label in (("Ktrans_per_min", "Ktrans (1/min)"), ("ve", "ve"), ("vp", "vp")):
            value = ranges.get(key, {})
            if isinstance(value, dict) and "range" in value:
                trained.append(f"{label} {_number(value['range'][0])}-{_number(value['range'][1])}")
        for key, label in (("tk_model", "model"), ("aif_families", "AIFs"), ("n_frames", "frames"),
                           ("duration_s", "duration (s)"), ("fa_deg", "flip angle (deg)"), ("t10_s", "T10 (s)")):
            value = ranges.get(key)
            if isinstance(value, (list, tuple)):
                trained.append(f"{label} {'-'.join(_number(v) if not isinstance(v, str) else v for v in value)}"
                               if key != "aif_families" else f"{label} {', '.join(value)}")
            elif isinstance(value, str):
                trained.append(f"{label}: {value.split(',')[0]}")
        snr = ranges.get("baseline_snr", {})
        if isinstance(snr, dict) and "range" in snr:
            trained.append(f"baseline SNR {_number(snr['range'][0])}-{_number(snr['range'][1])}")
        lines.append("<br><b>Trained on</b> physics-based synthetic DCE data: " + "; ".join(trained) + ".")
    training = card.get("training", {})
    if training:
        lines.append(f"<br><b>Training</b>: {training.get('steps', '?')} steps on {training.get('device', '?')}"
                     + (f", {card['date_utc']}" if card.get("date_utc") else "") + ".")
    metrics = card.get("validation", {}).get("metrics", {})
    if metrics:
        size = card.get("validation", {}).get("set", {}).get("size", "?")
        rows = "".join(
            f"<tr><td>{p}</td><td>{_number(m.get('rmse'))}</td><td>{_number(m.get('bias'))}</td>"
            f"<td>{_number(m.get('ccc'))}</td><td>{_number(m.get('coverage90'))}</td></tr>"
            for p, m in metrics.items() if isinstance(m, dict))
        lines.append(f"<br><b>Validation</b> (held-out synthetic set, {size} samples): "
                     "<table border='1' cellspacing='0' cellpadding='2'><tr><th>map</th><th>RMSE</th><th>bias</th>"
                     f"<th>CCC</th><th>90% coverage</th></tr>{rows}</table>"
                     "RMSE and bias in the map's unit; coverage: fraction of true values inside the 90% interval.")
    return "".join(lines)
