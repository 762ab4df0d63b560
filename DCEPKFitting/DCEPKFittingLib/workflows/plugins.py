"""Extensions found through package entry points, so the fitting core never imports them.

The inference package adds its commands (``dcepk infer``,
``dcepk train``) and its part of the demo this way; the fitting core works without it.

Groups:
- ``dcepk.commands``: a callable returning ``{name: (help, main(argv) -> exit code)}``;
- ``dcepk.demo_analyses``: a callable ``(series, mask, device, progress) -> {method name: maps}``.
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
