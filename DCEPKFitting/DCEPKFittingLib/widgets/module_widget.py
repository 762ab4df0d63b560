"""The Qt shell's shared code: what both module widgets do alike (a background job with progress and
cancel, installing DCEPK's Python packages after asking, exporting a statistics table, mirroring the
Logic's panel state, reloading the Lib packages with the module). The one Lib folder that imports ``qt``
(and ``slicer``); only the module files (``DCEPKFitting.py``, ``DCEPKInference.py``) import it. No
numerical package at load time: the modules must load before their requirements are installed.
"""

import importlib
import logging
import os
import sys
import types

import qt
import slicer
from slicer.i18n import tr as _

from ..panels import slicer_dependencies

CONTRIBUTORS = ["DCEPK developers (DCEPK project)"]


def missingComputePackages(names=("torch",)):
    """The packages of ``names`` this Python cannot import (the extension build server has no PyTorch)."""
    missing = []
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


class DCEPKBackgroundJobWidgetMixin:
    """Widget behaviour shared by the DCEPK modules (both module files import it from here).

    The Logic's ``startCompute(request)`` starts the job (a child process, or a worker thread for a
    small one); a QTimer polls its queue on the GUI thread (progress bar, status line), as
    SlicerMONAIAuto3DSeg does, and only a finished job is published into the scene through the
    module's ``publishJobResult(request, result)``. Cancel (which kills a child process at once),
    failure and a scene closed meanwhile publish nothing; ``cleanup`` stops the job and waits for it.
    ``onReload`` reloads the widget's ``LIB_PACKAGES`` before Slicer reloads the module file. Needs
    ``self.logic``, ``self.ui.progressBar``, ``self.ui.statusLabel`` and ``self._updateGuiState``; call
    ``setupBackgroundJob()`` in ``setup``.
    """

    JOB_STOP_TIMEOUT_S = 30.0  # a thread checks cancel between blocks of work; a child process is killed at once
    LIB_PACKAGES = ()

    def setupBackgroundJob(self) -> None:
        self._job = None
        self._jobRequest = None
        self._jobTimer = qt.QTimer()
        self._jobTimer.setInterval(200)
        self._jobTimer.connect("timeout()", self.onJobTimer)

    def startBackgroundJob(self, request, statusText: str) -> None:
        from ..core.child_process import ChildProcessJob

        self._jobRequest = request
        self._job = self.logic.startCompute(request)
        self.ui.progressBar.value = 0
        inChild = isinstance(self._job, ChildProcessJob)
        self.ui.statusLabel.text = statusText + (_(" (in a separate process)") if inChild else "")
        self._jobTimer.start()

    def onCancelButton(self) -> None:
        if self._job is not None:
            self._job.cancel()
            self.ui.statusLabel.text = _("Cancelling...")

    def discardBackgroundJob(self) -> None:
        """Cancel a running job; a result arriving later belongs to a closed scene and is never published."""
        if self._job is not None:
            self._job.cancel()
        self._jobRequest = None

    def stopBackgroundJob(self) -> None:
        """Cancel the job and wait for its thread (module unloaded, application closing)."""
        job, self._job, self._jobRequest = self._job, None, None
        self._jobTimer.stop()
        if job is not None:
            job.cancel()
            job.wait(self.JOB_STOP_TIMEOUT_S)
            if not job.done:
                logging.warning("DCEPK: the background job did not stop within %.0f s", self.JOB_STOP_TIMEOUT_S)

    def onReload(self) -> None:
        """Reload the Lib packages too (Slicer's reload re-reads the module file only), then the module."""
        self.stopBackgroundJob()
        reloadLibPackages(*self.LIB_PACKAGES)
        super().onReload()

    def runShowingErrors(self, message, function, *args) -> bool:
        """``function(*args)`` inside Slicer's error display: an error is shown, never raised out of a Qt slot."""
        try:
            with slicer.util.tryWithErrorDisplay(message, waitCursor=True):
                function(*args)
            return True
        except Exception:  # noqa: BLE001  (shown to the user by tryWithErrorDisplay)
            return False

    def onJobTimer(self) -> None:
        from ..core.jobs import JobState

        job = self._job
        if job is None:
            self._jobTimer.stop()
            return
        updates = job.poll()
        if updates:
            fraction, message = updates[-1]
            self.ui.progressBar.value = int(round(100 * fraction))
            if message:
                self.ui.statusLabel.text = message
        if not job.done:
            return
        self._jobTimer.stop()
        self._job = None
        request, self._jobRequest = self._jobRequest, None
        self._updateGuiState()
        if job.state == JobState.FINISHED and request is None:
            self.ui.statusLabel.text = _("The scene was closed while the job ran: its result was discarded.")
        elif job.state == JobState.FINISHED:
            if self.runShowingErrors(_("The job finished but its maps could not be shown."),
                                     self.publishJobResult, request, job.result):
                self.ui.progressBar.value = 100
            else:
                self.ui.statusLabel.text = _("Finished, but the maps could not be shown (see the error message).")
        elif job.state == JobState.CANCELLED:
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = _("Cancelled: the scene is unchanged.")
        else:
            self.ui.statusLabel.text = _("Failed: the scene is unchanged.")
            # a child process's own output says more than the parent's traceback
            slicer.util.errorDisplay(str(job.error), detailedText=getattr(job.error, "log", "") or job.error_traceback)

    def ensureDependencies(self, requester: str) -> bool:
        """True when DCEPK's Python packages are installed, asking before installing any (never at import).

        The packages of both modules are listed in one file, DCEPK Fitting's Resources/requirements.txt
        (the modules share one Resources folder once installed); torch comes from the PyTorch extension.
        An installation error is shown, not raised, and the status line says that nothing was run.
        """
        outcome = {"installed": False}

        def install():
            requirements = slicer_dependencies.read_requirements(requirementsFile())
            outcome["installed"] = slicer_dependencies.ensure_requirements(
                requirements, confirm=slicer.util.confirmOkCancelDisplay,
                install=slicer_dependencies.installer_for_slicer(slicer, requester),
                requester=requester) and self._ensureTorch()

        if not self.runShowingErrors(_("The Python packages DCEPK needs could not be installed."), install):
            self.ui.statusLabel.text = _("Installing Python packages failed: nothing was run (see the error message).")
            return False
        if not outcome["installed"]:
            self.ui.statusLabel.text = _("Python packages missing: nothing was run.")
        return outcome["installed"]

    @staticmethod
    def _ensureTorch() -> bool:
        if not missingComputePackages():
            return True
        # torch comes from the PyTorch extension, which picks the CPU or CUDA build for this computer.
        try:
            import PyTorchUtils
        except ImportError:
            slicer.util.errorDisplay(_("DCEPK needs PyTorch: install the 'PyTorch' extension from the "
                                       "Extensions Manager, restart Slicer and try again."))
            return False
        return PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True) is not None

    def exportStatisticsTable(self, table) -> None:
        if table is None or table.GetScene() is None:
            return
        path = qt.QFileDialog.getSaveFileName(None, _("Export statistics"), table.GetName() + ".csv", "CSV (*.csv)")
        if not path:
            return
        from .. import mrml

        # The file dialog already asked before replacing an existing file.
        if self.runShowingErrors(_("The table could not be saved."), mrml.save_table_csv,
                                 slicer.mrmlScene, table, path, True):
            self.ui.statusLabel.text = _("Statistics saved to {path}").format(path=path)

    def mirrorPanelView(self, view) -> None:
        """Show the Logic's ``panel_state.PanelView``: the widget decides nothing itself."""
        self.ui.applyButton.enabled = view.apply_enabled
        self.ui.applyButton.toolTip = view.apply_tooltip
        self.ui.cancelButton.enabled = view.cancel_enabled
        for name, enabled in view.enabled.items():
            getattr(self.ui, name).enabled = enabled
        self.ui.acquisitionLabel.text = view.acquisition
        if not view.apply_enabled and not view.cancel_enabled:
            self.ui.statusLabel.text = view.apply_tooltip


def libModuleNames(package: str) -> list:
    """The loaded modules of ``package`` (the package itself first)."""
    return sorted(name for name in sys.modules if name == package or name.startswith(package + "."))


def _comesFrom(value, package: str) -> bool:
    try:
        name = value.__name__ if isinstance(value, types.ModuleType) else getattr(value, "__module__", None)
    except Exception:  # noqa: BLE001  (an object whose attributes cannot be read comes from nowhere we know)
        return False
    return isinstance(name, str) and (name == package or name.startswith(package + "."))


def dependentLibPackages(package: str) -> list:
    """The other loaded module Lib packages (Slicer's ``<Module>Lib`` convention) holding names of ``package``."""
    found = []
    for top in sorted({name.split(".")[0] for name in list(sys.modules)}):
        if top == package or not top.endswith("Lib"):
            continue
        modules = [sys.modules.get(name) for name in libModuleNames(top)]
        if any(_comesFrom(value, package) for module in modules if module is not None
               for value in list(vars(module).values())):
            found.append(top)
    return found


def reloadLibPackages(*packages: str) -> list:
    """Load every loaded module of ``packages`` (and of the Lib packages that use them) again from its file.

    They are all taken out of ``sys.modules`` first and then imported again, the packages first: each
    import loads what it imports before itself, so the modules come back in dependency order, and none
    keeps a class or function of an old module (an ``importlib.reload`` one by one would, in the order
    it happened to pick). Returns the names reloaded.
    """
    order = []
    for package in packages:
        for name in [package] + dependentLibPackages(package):
            if name not in order:
                order.append(name)
    names = [name for package in order for name in libModuleNames(package)]
    for name in names:
        sys.modules.pop(name, None)
    importlib.invalidate_caches()
    for name in names:
        importlib.import_module(name)
    return names


def requirementsFile() -> str:
    """DCEPK's requirements.txt (DCEPK Fitting's resource; both modules read it)."""
    return os.path.join(os.path.dirname(slicer.util.modulePath("DCEPKFitting")), "Resources", "requirements.txt")
