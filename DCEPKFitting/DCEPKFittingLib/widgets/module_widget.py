"""The Qt shell's shared code: what both module widgets do alike (a background job with progress and
cancel, installing DCEPK's Python packages after asking, exporting a statistics table, mirroring the
Logic's panel state). The one Lib folder that imports ``qt`` (and ``slicer``); only the module files
(``DCEPKFitting.py``, ``DCEPKInference.py``) import it. No numerical package at load time: the modules
must load before their requirements are installed.
"""

import importlib
import logging
import os

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

    The Logic's ``compute(request)`` runs in a ``BackgroundJob``; a QTimer drains its queue on the
    GUI thread (progress bar, status line), and only a finished job is published into the scene
    through the module's ``publishJobResult(request, result)``. Cancel, failure and a scene closed
    meanwhile publish nothing; ``cleanup`` stops the job and waits for its thread. Needs ``self.logic``,
    ``self.ui.progressBar``, ``self.ui.statusLabel`` and ``self._updateGuiState``; call
    ``setupBackgroundJob()`` in ``setup``.
    """

    JOB_STOP_TIMEOUT_S = 30.0  # the fit and the networks check cancel between chunks of seconds

    def setupBackgroundJob(self) -> None:
        self._job = None
        self._jobRequest = None
        self._jobTimer = qt.QTimer()
        self._jobTimer.setInterval(200)
        self._jobTimer.connect("timeout()", self.onJobTimer)

    def startBackgroundJob(self, request, jobName: str, statusText: str) -> None:
        from ..core.jobs import BackgroundJob

        self._jobRequest = request
        self._job = BackgroundJob(self.logic.compute, request, name=jobName).start()
        self.ui.progressBar.value = 0
        self.ui.statusLabel.text = statusText
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
            slicer.util.errorDisplay(str(job.error), detailedText=job.error_traceback)

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


def requirementsFile() -> str:
    """DCEPK's requirements.txt (DCEPK Fitting's resource; both modules read it)."""
    return os.path.join(os.path.dirname(slicer.util.modulePath("DCEPKFitting")), "Resources", "requirements.txt")
