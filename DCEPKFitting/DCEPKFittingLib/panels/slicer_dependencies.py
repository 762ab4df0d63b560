"""Which of the module's Python requirements are missing, and installing them only after asking.

Qt-free and slicer-free, so it is testable anywhere: the Slicer module passes in the question
(``slicer.util.confirmOkCancelDisplay``) and the installer (``installer_for_slicer(slicer)``).
Nothing is installed at import time; the widget calls ``ensure_requirements`` when the user
first runs something that needs the packages.
"""

import re
from importlib import metadata
from pathlib import Path
from typing import Callable, List, Sequence

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def read_requirements(path) -> List[str]:
    """Requirement lines of a requirements.txt (comments, blank lines and pip options left out)."""
    lines = []
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            lines.append(line)
    return lines


def _satisfied(requirement: str) -> bool:
    try:
        from packaging.requirements import Requirement
    except ImportError:  # very old environments: presence only, no version check
        match = _NAME.match(requirement)
        name, specifier = (match.group(1) if match else requirement), None
    else:
        parsed = Requirement(requirement)
        if parsed.marker is not None and not parsed.marker.evaluate():
            return True  # not needed on this platform
        name, specifier = parsed.name, parsed.specifier
    try:
        installed = metadata.version(name)
    except metadata.PackageNotFoundError:
        return False
    return specifier is None or specifier.contains(installed, prereleases=True)


def missing_requirements(requirements: Sequence[str]) -> List[str]:
    return [requirement for requirement in requirements if not _satisfied(requirement)]


def installer_for_slicer(slicer_module, requester: str = "DCEPK") -> Callable[[List[str]], None]:
    """The newest installer this Slicer has: ``slicer.packaging.pip_ensure`` (5.12+: progress dialog, restart
    prompt when an imported package changed; the consent was asked already), else
    ``slicer.packaging.pip_install``, else ``slicer.util.pip_install`` (5.8)."""
    packaging = getattr(slicer_module, "packaging", None)
    if packaging is not None and hasattr(packaging, "pip_ensure"):
        return lambda requirements: packaging.pip_ensure(list(requirements), prompt_install=False,
                                                         requester=requester)
    if packaging is not None and hasattr(packaging, "pip_install"):
        return lambda requirements: packaging.pip_install(list(requirements))
    return lambda requirements: slicer_module.util.pip_install(list(requirements))


def ensure_requirements(requirements: Sequence[str], confirm: Callable[[str], bool],
                        install: Callable[[List[str]], None], requester: str = "DCEPK") -> bool:
    """True when every requirement is met, installing the missing ones only if ``confirm`` says yes.

    Returns False (and installs nothing) when the user declines.
    """
    missing = missing_requirements(requirements)
    if not missing:
        return True
    question = (f"{requester} needs these Python packages, which are not installed in Slicer's Python:\n\n"
                + "\n".join(f"  {requirement}" for requirement in missing)
                + "\n\nDownload and install them now from the Python Package Index (pip)? "
                  "This can take a few minutes.")
    if not confirm(question):
        return False
    install(missing)
    still_missing = missing_requirements(missing)
    if still_missing:
        raise RuntimeError(f"installing {', '.join(still_missing)} did not succeed: see the Python console log, "
                           "or install them from the Python console with slicer.util.pip_install(...)")
    return True
