"""Extensions found through package entry points, so the fitting core never imports them.

The inference package adds its commands (``dcepk infer``,
``dcepk train``) and its part of the demo this way; the fitting core works without it.

Groups:
- ``dcepk.commands``: a callable returning ``{name: (help, main(argv) -> exit code)}``;
- ``dcepk.demo_analyses``: a callable ``(series, mask, device, progress) -> {method name: maps}``;
- ``dcepk.networks``: a callable returning the networks ``dcepk batch`` runs (``network_provider``).
"""

from importlib.metadata import entry_points
from typing import Callable, List


def load_entry_points(group: str) -> List[Callable]:
    """Objects registered under ``group`` by installed packages, in name order."""
    found = entry_points(group=group)
    return [entry.load() for entry in sorted(found, key=lambda entry: entry.name)]


def plugin_commands() -> dict:
    commands = {}
    for provider in load_entry_points("dcepk.commands"):
        commands.update(provider())
    return commands


def network_provider():
    """The installed networks for ``dcepk batch`` (group ``dcepk.networks``): a dict with ``names()``
    (the shipped networks) and ``maps(series, name, mask=, device=, t10_s=, fa_deg=, tr_s=, r1_per_mM_s=,
    baseline_frames=)`` -> the network's ``PKFit``; None without the inference package."""
    providers = load_entry_points("dcepk.networks")
    return providers[0]() if providers else None
