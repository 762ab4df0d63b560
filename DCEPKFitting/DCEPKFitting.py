"""DCEPK Fitting: pharmacokinetic maps from a DCE-MRI volume sequence by tracer-kinetic model fitting.

Qt shell only (see docs/ARCHITECTURE.md): the science is in ``DCEPKFittingLib`` (pure core) and
``DCEPKFittingLib.mrml_bridge`` (scene <-> arrays). The Logic is usable from the Python console:

    import DCEPKFitting
    logic = DCEPKFitting.DCEPKFittingLogic()
    nodes = logic.run(sequenceNode, model="etofts", aifRoi=roiNode, t10_s=1.4)  # {"Ktrans": volume node, ...}
"""

import logging
import os
from typing import Annotated, Optional, Union

import qt
import vtk

import slicer
from slicer import (
    vtkMRMLLabelMapVolumeNode,
    vtkMRMLMarkupsROINode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
    vtkMRMLSequenceNode,
)
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

# Only the dependency-free helpers are imported at load time; the numerical Lib modules are
# imported inside functions, after the widget has checked (and, if the user agrees, installed)
# the Python requirements, so the module always loads.
from DCEPKFittingLib import slicer_dependencies

MODELS = ["etofts", "tofts", "patlak", "2cxm", "2cum"]
POPULATION_AIFS = ["parker", "georgiou", "weinmann"]
PHANTOM_VFA_FLIP_ANGLES_DEG = (2.0, 5.0, 10.0, 15.0, 20.0)


#
# Module
#
class DCEPKFitting(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("DCE PK Fitting")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Quantification")]
        self.parent.dependencies = ["Sequences", "Markups", "Segmentations", "Plots"]
        self.parent.contributors = ["DCEPK contributors"]
        self.parent.helpText = _("""
Pharmacokinetic maps from a dynamic contrast-enhanced (DCE) MRI series by voxel-wise tracer-kinetic
model fitting: Tofts, extended Tofts, Patlak, two-compartment exchange (2CXM) and uptake (2CUM).<br>
<b>Steps</b>: choose the DCE volume sequence; check flip angle (degrees) and TR (milliseconds), read from
the series when it has them; give pre-contrast T1 (T10 in seconds, a T1 map, or a variable-flip-angle
series); place an ROI (box) or paint a segment on an artery for the input function, or choose a population
AIF; choose the model and press Apply. Fitting runs in the background and can be cancelled; the scene is
only changed when it has finished.<br>
<b>Outputs and units</b> (OSIPI lexicon): Ktrans and kep in 1/min, ve and vp as fractions, Fp in
ml/100ml/min, PS in 1/min, standard errors as &lt;name&gt;_se in the same units, R2 (goodness of fit),
rmse in mM, status codes (masked, converged, hit bound, failed, invalid input). Frame times are in seconds
(Slicer's MultiVolume frame labels, in ms, are converted).<br>
Tick <i>Voxel curve on click</i> to see the measured and fitted concentration of the voxel under the mouse.
""")
        self.parent.helpText += self.getDefaultModuleDocumentationLink()
        self.parent.acknowledgementText = _("""
DCEPK is an open-source project. Fitting follows the OSIPI DCE-MRI lexicon and is checked against the OSIPI
DCE-DSC-MRI CodeCollection test data and the QIBA DCE-MRI digital reference object. The MultiVolume test
phantoms come from the PkModeling project (3D Slicer licence).
""")
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """One-click 'DCEPK phantom' in the Sample Data module: generated locally, nothing is downloaded."""
    import SampleData

    iconsPath = os.path.join(os.path.dirname(__file__), "Resources", "Icons")
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="DCEPK",
        sampleName="DCEPK phantom",
        uris="local:DCEPKFittingLib.phantom.make_phantom",  # not a download: customDownloader builds it
        fileNames="dce.seq.nrrd",
        nodeNames="DCEPK phantom",
        thumbnailFileName=os.path.join(iconsPath, "DCEPKPhantom.png"),
        loadFileType="SequenceFile",
        customDownloader=lambda source: DCEPKFittingLogic().loadPhantomSample(),
    )


#
# Parameter node
#
@parameterNodeWrapper
class DCEPKFittingParameterNode:
    """GUI state, saved with the scene. Units in the names: Deg, Ms (milliseconds), plain seconds otherwise."""

    inputSequence: vtkMRMLSequenceNode
    flipAngleDeg: Annotated[float, WithinRange(0.1, 90.0)] = 15.0
    repetitionTimeMs: Annotated[float, WithinRange(0.1, 100.0)] = 5.0
    t10Mode: Annotated[str, Choice(["fixed", "map", "vfa"])] = "fixed"
    t10Value: Annotated[float, WithinRange(0.05, 10.0)] = 1.4  # s
    t10Map: vtkMRMLScalarVolumeNode
    t10MapUnit: Annotated[str, Choice(["ms", "s"])] = "ms"
    vfaSequence: vtkMRMLSequenceNode
    vfaFlipAngles: str = ""  # degrees, comma-separated
    vfaTrMs: Annotated[float, WithinRange(0.1, 100.0)] = 5.0
    relaxivity: Annotated[float, WithinRange(0.1, 20.0)] = 4.5  # 1/(mM s)
    aifSource: Annotated[str, Choice(["roi", "segment", "population"])] = "roi"
    aifRoi: vtkMRMLMarkupsROINode
    aifSegmentation: vtkMRMLSegmentationNode
    aifSegmentId: str = ""
    populationAif: Annotated[str, Choice(POPULATION_AIFS)] = "parker"
    aifTopFraction: Annotated[float, WithinRange(0.01, 1.0)] = 1.0
    hematocrit: Annotated[float, WithinRange(0.0, 0.99)] = 0.45
    aifDelay: Annotated[float, WithinRange(-60.0, 60.0)] = 0.0  # s
    model: Annotated[str, Choice(MODELS)] = "etofts"
    method: Annotated[str, Choice(["nlls", "linear"])] = "nlls"
    fitDelay: bool = False
    fitMask: Union[vtkMRMLSegmentationNode, vtkMRMLMarkupsROINode, vtkMRMLLabelMapVolumeNode]
    statisticsSegmentation: vtkMRMLSegmentationNode
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    outputPrefix: str = "DCEPK"
    updateExisting: bool = True


#
# Widget
#
class DCEPKBackgroundJobWidgetMixin:
    """Widget behaviour shared by the DCEPK modules (DCEPKInference imports it from here).

    The Logic's ``compute(request)`` runs in a ``BackgroundJob``; a QTimer drains its queue on the
    GUI thread (progress bar, status line), and only a finished job is published into the scene
    through the module's ``publishJobResult(request, result)``. Cancel, failure and a scene closed
    meanwhile publish nothing. Needs ``self.logic``, ``self.ui.progressBar``, ``self.ui.statusLabel``
    and ``self._updateGuiState``; call ``setupBackgroundJob()`` in ``setup``.
    """

    def setupBackgroundJob(self) -> None:
        self._job = None
        self._jobRequest = None
        self._jobTimer = qt.QTimer()
        self._jobTimer.setInterval(200)
        self._jobTimer.connect("timeout()", self.onJobTimer)

    def startBackgroundJob(self, request, jobName: str, statusText: str) -> None:
        from DCEPKFittingLib.jobs import BackgroundJob

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

    def onJobTimer(self) -> None:
        from DCEPKFittingLib.jobs import JobState

        job = self._job
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
            with slicer.util.tryWithErrorDisplay(_("The job finished but its maps could not be shown."),
                                                 waitCursor=True):
                self.publishJobResult(request, job.result)
                self.ui.progressBar.value = 100
        elif job.state == JobState.CANCELLED:
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = _("Cancelled: the scene is unchanged.")
        else:
            self.ui.statusLabel.text = _("Failed: the scene is unchanged.")
            slicer.util.errorDisplay(str(job.error), detailedText=job.error_traceback)

    def exportStatisticsTable(self, table) -> None:
        if table is None or table.GetScene() is None:
            return
        path = qt.QFileDialog.getSaveFileName(None, _("Export statistics"), table.GetName() + ".csv", "CSV (*.csv)")
        if not path:
            return
        from DCEPKFittingLib import mrml_bridge

        with slicer.util.tryWithErrorDisplay(_("The table could not be saved."), waitCursor=True):
            # The file dialog already asked before replacing an existing file.
            mrml_bridge.save_table_csv(slicer.mrmlScene, table, path, overwrite=True)
            self.ui.statusLabel.text = _("Statistics saved to {path}").format(path=path)


class DCEPKFittingWidget(DCEPKBackgroundJobWidgetMixin, ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Wires the GUI to the Logic; holds no science."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._observedRoi = None
        self._crosshair = None
        self._seriesCache = (None, None, None)  # (node id, node MTime, DCESeries) for the live AIF plot
        self._aifChart = None
        self._voxelChart = None
        self._statisticsTable = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DCEPKFitting.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = DCEPKFittingLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.exportTableButton.connect("clicked(bool)", self.onExportTable)
        self.ui.inputSequenceSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onInputSequenceChanged)
        self.ui.aifRoiSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onAifRoiChanged)
        self.ui.aifSegmentSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onAifSegmentationChanged)
        self.ui.aifSegmentSelector.connect("currentSegmentChanged(QString)", self.onAifSegmentChanged)
        self.ui.voxelCurveCheckBox.connect("toggled(bool)", self.onVoxelCurveToggled)

        self.setupBackgroundJob()
        # Throttles: dragging an ROI or moving the mouse fires many events; redraw at most every 300 ms.
        self._aifTimer = qt.QTimer()
        self._aifTimer.setSingleShot(True)
        self._aifTimer.setInterval(300)
        self._aifTimer.connect("timeout()", self.updateAifPlot)
        self._voxelTimer = qt.QTimer()
        self._voxelTimer.setSingleShot(True)
        self._voxelTimer.setInterval(150)
        self._voxelTimer.connect("timeout()", self.updateVoxelPlot)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self._job is not None:
            self._job.cancel()
        self._jobTimer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGuiState)

    def onSceneStartClose(self, caller, event) -> None:
        self.discardBackgroundJob()
        self._aifChart = self._voxelChart = None
        self._seriesCache = (None, None, None)
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputSequence:
            firstSequence = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSequenceNode")
            if firstSequence:
                self._parameterNode.inputSequence = firstSequence

    def setParameterNode(self, inputParameterNode: Optional[DCEPKFittingParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGuiState)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGuiState)
        self._updateGuiState()

    def _updateGuiState(self, caller=None, event=None) -> None:
        p = self._parameterNode
        running = self._job is not None
        ready = bool(p and p.inputSequence) and not running
        if p and p.aifSource == "roi":
            ready = ready and bool(p.aifRoi)
        elif p and p.aifSource == "segment":
            ready = ready and bool(p.aifSegmentation and p.aifSegmentId)
        self.ui.applyButton.enabled = ready
        self.ui.applyButton.toolTip = _("Fit the model to every voxel (runs in the background).") if ready else \
            _("Choose a DCE series and an input function first.")
        self.ui.cancelButton.enabled = running
        if p:
            self.ui.t10ValueSpinBox.enabled = p.t10Mode == "fixed"
            self.ui.t10MapSelector.enabled = self.ui.t10MapUnitComboBox.enabled = p.t10Mode == "map"
            for widget in (self.ui.vfaSequenceSelector, self.ui.vfaFlipAnglesLineEdit, self.ui.vfaTrSpinBox):
                widget.enabled = p.t10Mode == "vfa"
            self.ui.aifRoiSelector.enabled = p.aifSource == "roi"
            self.ui.aifSegmentSelector.enabled = p.aifSource == "segment"
            # The segment selector has no parameter-node connector: mirror the saved choice into it.
            if self.ui.aifSegmentSelector.currentNode() != p.aifSegmentation:
                self.ui.aifSegmentSelector.setCurrentNode(p.aifSegmentation)
            if p.aifSegmentId and self.ui.aifSegmentSelector.currentSegmentID() != p.aifSegmentId:
                self.ui.aifSegmentSelector.setCurrentSegmentID(p.aifSegmentId)
            self.ui.populationAifComboBox.enabled = p.aifSource == "population"
            self.ui.aifTopFractionSpinBox.enabled = p.aifSource != "population"
            self._observeRoi(p.aifRoi if p.aifSource == "roi" else None)

    # ---------------------------------------------------------------- inputs
    def onInputSequenceChanged(self, node) -> None:
        """Fill FA/TR from the series' attributes (still editable): most DICOM-derived series have them."""
        if node is None or self._parameterNode is None:
            return
        from DCEPKFittingLib import mrml_bridge

        try:
            flipAngleDeg, trSeconds = mrml_bridge.acquisition_from_sequence(node)
        except Exception as error:  # noqa: BLE001  (a bad series is reported at Apply, not while browsing)
            self.ui.statusLabel.text = str(error)
            return
        found = []
        if flipAngleDeg is not None:
            self._parameterNode.flipAngleDeg = flipAngleDeg
            found.append(_("flip angle"))
        if trSeconds is not None:
            self._parameterNode.repetitionTimeMs = trSeconds * 1000.0
            found.append(_("TR"))
        self.ui.statusLabel.text = (_("{items} read from the series (editable).").format(items=" and ".join(found))
                                    if found else _("The series has no flip angle or TR: check them."))
        self._aifTimer.start()

    def onAifSegmentationChanged(self, node) -> None:
        if self._parameterNode:
            self._parameterNode.aifSegmentation = node

    def onAifSegmentChanged(self, segmentId) -> None:
        if self._parameterNode:
            self._parameterNode.aifSegmentId = segmentId or ""

    # ---------------------------------------------------------------- live AIF curve
    def onAifRoiChanged(self, node) -> None:
        self._observeRoi(node)
        self._aifTimer.start()

    def _observeRoi(self, roi) -> None:
        if roi is self._observedRoi:
            return
        if self._observedRoi is not None:
            self.removeObserver(self._observedRoi, slicer.vtkMRMLMarkupsNode.PointModifiedEvent, self.onRoiModified)
        self._observedRoi = roi
        if roi is not None:
            self.addObserver(roi, slicer.vtkMRMLMarkupsNode.PointModifiedEvent, self.onRoiModified)

    def onRoiModified(self, caller, event) -> None:
        self._aifTimer.start()  # restart: redraw once the ROI has stopped moving for a moment

    def _currentSeries(self):
        from DCEPKFittingLib import mrml_bridge

        sequence = self._parameterNode.inputSequence if self._parameterNode else None
        if sequence is None:
            return None
        nodeId, mtime, series = self._seriesCache
        if nodeId != sequence.GetID() or mtime != sequence.GetMTime():
            series = mrml_bridge.series_from_sequence(sequence)
            self._seriesCache = (sequence.GetID(), sequence.GetMTime(), series)
        return series

    def updateAifPlot(self) -> None:
        p = self._parameterNode
        if p is None or p.aifSource != "roi" or p.aifRoi is None or p.inputSequence is None:
            return
        from DCEPKFittingLib import mrml_bridge

        try:
            series = self._currentSeries()
            reference = mrml_bridge.reference_volume(series.spatial_shape, series.geometry)
            mask = mrml_bridge.mask_from_roi(p.aifRoi, reference)
            if not mask.any():
                self.ui.statusLabel.text = _("The AIF ROI holds no voxel of the series: move it over the artery.")
                return
            curve = mrml_bridge.mean_curve_in_mask(series, mask)
        except Exception as error:  # noqa: BLE001  (live preview: say what is wrong, never interrupt)
            self.ui.statusLabel.text = str(error)
            return
        self._aifChart = mrml_bridge.plot_curves(
            slicer.mrmlScene, "DCEPK AIF (ROI mean)", series.times_s, {f"mean signal, {int(mask.sum())} voxels": curve},
            "time (s)", "signal (a.u.)", chart=self._aifChart)
        slicer.modules.plots.logic().ShowChartInLayout(self._aifChart)

    # ---------------------------------------------------------------- voxel curve under the mouse
    def onVoxelCurveToggled(self, enabled) -> None:
        if self._crosshair is not None:
            self.removeObserver(self._crosshair, slicer.vtkMRMLCrosshairNode.CursorPositionModifiedEvent,
                                self.onCursorMoved)
            self._crosshair = None
        if enabled:
            self._crosshair = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLCrosshairNode")
            self.addObserver(self._crosshair, slicer.vtkMRMLCrosshairNode.CursorPositionModifiedEvent,
                             self.onCursorMoved)

    def onCursorMoved(self, caller, event) -> None:
        self._voxelTimer.start()

    def updateVoxelPlot(self) -> None:
        output = self.logic.lastOutput if self.logic else None
        if output is None or self._crosshair is None:
            return
        from DCEPKFittingLib import mrml_bridge

        ras = [0.0, 0.0, 0.0]
        if not self._crosshair.GetCursorPositionRAS(ras):
            return
        index = mrml_bridge.voxel_index_at_ras(output.geometry, output.concentration.shape, ras)
        if index is None:
            return
        k, j, i = index
        curves = {"measured (mM)": output.concentration[k, j, i, :], "fitted (mM)": output.model_curve(k, j, i)}
        title = _("DCEPK voxel (k={k}, j={j}, i={i})").format(k=k, j=j, i=i)
        self._voxelChart = mrml_bridge.plot_curves(slicer.mrmlScene, "DCEPK voxel curve", output.times_s, curves,
                                                   "time (s)", "concentration (mM)", chart=self._voxelChart)
        self._voxelChart.SetTitle(title)
        slicer.modules.plots.logic().ShowChartInLayout(self._voxelChart)

    # ---------------------------------------------------------------- apply / cancel
    def ensureDependencies(self) -> bool:
        """Ask before installing what Slicer's Python lacks; never at import time."""
        requirements = slicer_dependencies.read_requirements(self.resourcePath("requirements.txt"))
        installed = slicer_dependencies.ensure_requirements(
            requirements, confirm=slicer.util.confirmOkCancelDisplay,
            install=slicer_dependencies.installer_for_slicer(slicer), requester="DCEPK Fitting")
        if not installed:
            return False
        try:
            import torch  # noqa: F401
        except ImportError:
            # torch comes from the PyTorch extension, which picks the CPU or CUDA build for this computer.
            try:
                import PyTorchUtils
            except ImportError:
                slicer.util.errorDisplay(_("DCEPK needs PyTorch: install the 'PyTorch' extension from the "
                                           "Extensions Manager, restart Slicer and try again."))
                return False
            if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True) is None:
                return False
        return True

    def onApplyButton(self) -> None:
        if self._job is not None:
            return
        if not self.ensureDependencies():
            self.ui.statusLabel.text = _("Python packages missing: nothing was run.")
            return
        try:
            with slicer.util.tryWithErrorDisplay(_("The fit could not start."), waitCursor=True):
                options = self.logic.optionsFromParameterNode(self._parameterNode)
                deviceText = self.logic.describeDevice(options["device"])
                request = self.logic.prepare(self._parameterNode.inputSequence, **options)
                self.startBackgroundJob(request, "DCEPK fit", _("Fitting on {device}...").format(device=deviceText))
        finally:  # the error was shown; the buttons must still reflect whether a job runs
            self._updateGuiState()

    def publishJobResult(self, request, output) -> None:
        nodes = self.logic.publish(request, output)
        self.showResults(nodes)
        self.ui.statusLabel.text = _("Done: {n} maps. {messages}").format(
            n=len([k for k in nodes if k != "statistics"]), messages=" ".join(output.messages))

    def showResults(self, nodes) -> None:
        """Ktrans over the DCE frame, with a colour legend; the statistics table can be exported."""
        mapNode = nodes.get("Ktrans") or nodes.get("PS") or next(iter(nodes.values()))
        background = None
        sequence = self._parameterNode.inputSequence
        browser = slicer.modules.sequences.logic().GetFirstBrowserNodeForSequenceNode(sequence) if sequence else None
        if browser is not None:
            background = browser.GetProxyNode(sequence)
        slicer.util.setSliceViewerLayers(background=background, foreground=mapNode, foregroundOpacity=0.7)
        try:
            slicer.modules.colors.logic().AddDefaultColorLegendDisplayNode(mapNode)
        except AttributeError:  # colour legends arrived in Slicer 4.13; the map shows without one
            pass
        self.ui.exportTableButton.enabled = "statistics" in nodes
        self._statisticsTable = nodes.get("statistics")

    def onExportTable(self) -> None:
        self.exportStatisticsTable(self._statisticsTable)


#
# Logic
#
class DCEPKFittingLogic(ScriptedLoadableModuleLogic):
    """Fitting from the scene, without any GUI (no Qt here): usable from the Python console.

    ``run`` is synchronous. The widget splits it in three so the slow part runs in a thread:
    ``prepare`` (reads nodes, main thread) -> ``compute`` (pure ``pipeline.run_fit``, thread-safe)
    -> ``publish`` (writes nodes, main thread). Nothing is written before ``compute`` succeeds, so a
    cancel or an error leaves the scene as it was. ``lastOutput`` keeps the last ``FitOutput``
    (concentration curves, fitted model curves) for the voxel plot.
    """

    def __init__(self, scene=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._scene = scene
        self.lastOutput = None
        self.lastNodes = {}

    @property
    def scene(self):
        return self._scene if self._scene is not None else slicer.mrmlScene

    def getParameterNode(self):
        return DCEPKFittingParameterNode(super().getParameterNode())

    def run(self, sequenceNode, model="etofts", method="nlls", aifRoi=None, aifSegmentation=None,
            aifSegmentId=None, populationAif=None, aifTopFraction=None, aifDelay_s=0.0, hematocrit=0.45,
            t10_s=1.4, t10Map=None, t10MapUnit="ms", vfaSequence=None, vfaFlipAngles_deg=None, vfaTr_s=None,
            flipAngle_deg=None, tr_s=None, r1_per_mM_s=None, mask=None, fitDelay=False, device="auto",
            statisticsSegmentation=None, outputPrefix="DCEPK", updateExisting=True, progress=None, cancel=None):
        """Fit ``model`` to every voxel of ``sequenceNode`` and put the maps in the scene; returns ``{map: node}``.

        Units: times and T10 in seconds, flip angles in degrees, TR in seconds, r1 in 1/(mM s),
        haematocrit as a fraction. ``t10MapUnit`` ('ms' or 's') is the unit of ``t10Map``'s voxels.
        Input function: ``aifRoi`` (markups ROI), ``aifSegmentation`` + ``aifSegmentId``, or
        ``populationAif`` ('parker', 'georgiou', 'weinmann'). ``mask``: segmentation, ROI, label map
        or bool array. ``progress(fraction, message)`` and ``cancel`` (``threading.Event``) are optional.
        Flip angle and TR default to the series' attributes.
        """
        request = self.prepare(
            sequenceNode, model=model, method=method, aifRoi=aifRoi, aifSegmentation=aifSegmentation,
            aifSegmentId=aifSegmentId, populationAif=populationAif, aifTopFraction=aifTopFraction,
            aifDelay_s=aifDelay_s, hematocrit=hematocrit, t10_s=t10_s, t10Map=t10Map, t10MapUnit=t10MapUnit,
            vfaSequence=vfaSequence, vfaFlipAngles_deg=vfaFlipAngles_deg, vfaTr_s=vfaTr_s,
            flipAngle_deg=flipAngle_deg, tr_s=tr_s, r1_per_mM_s=r1_per_mM_s, mask=mask, fitDelay=fitDelay,
            device=device, statisticsSegmentation=statisticsSegmentation, outputPrefix=outputPrefix,
            updateExisting=updateExisting)
        output = self.compute(request, progress=progress, cancel=cancel)
        return self.publish(request, output)

    def prepare(self, sequenceNode, model="etofts", method="nlls", aifRoi=None, aifSegmentation=None,
                aifSegmentId=None, populationAif=None, aifTopFraction=None, aifDelay_s=0.0, hematocrit=0.45,
                t10_s=1.4, t10Map=None, t10MapUnit="ms", vfaSequence=None, vfaFlipAngles_deg=None, vfaTr_s=None,
                flipAngle_deg=None, tr_s=None, r1_per_mM_s=None, mask=None, fitDelay=False, device="auto",
                statisticsSegmentation=None, outputPrefix="DCEPK", updateExisting=True):
        """Read the inputs from the scene (main thread); raises ``DCEPKInputError`` naming any problem."""
        from DCEPKFittingLib import mrml_bridge

        return mrml_bridge.prepare_scene_fit(
            sequenceNode, model=model, method=method, aif_roi=aifRoi, aif_segmentation=aifSegmentation,
            aif_segment_id=aifSegmentId, population_aif=populationAif, aif_top_fraction=aifTopFraction,
            aif_delay_s=aifDelay_s, hct=hematocrit, t10_s=t10_s, t10_map=t10Map, t10_map_unit=t10MapUnit,
            vfa_sequence=vfaSequence, vfa_flip_angles_deg=vfaFlipAngles_deg, vfa_tr_s=vfaTr_s, fa_deg=flipAngle_deg,
            tr_s=tr_s, r1_per_mM_s=r1_per_mM_s, mask=mask, fit_delay=fitDelay, device=device,
            statistics_segmentation=statisticsSegmentation, output_prefix=outputPrefix,
            update_existing=updateExisting)

    @staticmethod
    def compute(request, progress=None, cancel=None):
        """The fit itself (``pipeline.run_fit``): touches no node, so it may run in a worker thread."""
        from DCEPKFittingLib import mrml_bridge

        return mrml_bridge.compute_scene_fit(request, progress=progress, cancel=cancel)

    def publish(self, request, output):
        """Write the maps and statistics into the scene (main thread); returns ``{map name: node}``."""
        from DCEPKFittingLib import mrml_bridge

        nodes = mrml_bridge.publish_scene_fit(self.scene, request, output)
        self.lastOutput, self.lastNodes = output, nodes
        return nodes

    @staticmethod
    def optionsFromParameterNode(p):
        """Keyword arguments of ``run``/``prepare`` from the GUI state (ms converted to s here)."""
        options = dict(model=p.model, method=p.method, hematocrit=p.hematocrit, aifDelay_s=p.aifDelay,
                       flipAngle_deg=p.flipAngleDeg, tr_s=p.repetitionTimeMs / 1000.0, r1_per_mM_s=p.relaxivity,
                       mask=p.fitMask, fitDelay=p.fitDelay, device=p.device,
                       statisticsSegmentation=p.statisticsSegmentation, outputPrefix=p.outputPrefix,
                       updateExisting=p.updateExisting,
                       aifTopFraction=p.aifTopFraction if p.aifTopFraction < 1.0 else None)
        if p.aifSource == "roi":
            options["aifRoi"] = p.aifRoi
        elif p.aifSource == "segment":
            options.update(aifSegmentation=p.aifSegmentation, aifSegmentId=p.aifSegmentId)
        else:
            options["populationAif"] = p.populationAif
        if p.t10Mode == "fixed":
            options["t10_s"] = p.t10Value
        elif p.t10Mode == "map":
            options.update(t10_s=None, t10Map=p.t10Map, t10MapUnit=p.t10MapUnit)
        else:
            angles = [float(a) for a in p.vfaFlipAngles.replace(";", ",").split(",") if a.strip()]
            options.update(t10_s=None, vfaSequence=p.vfaSequence, vfaFlipAngles_deg=angles or None,
                           vfaTr_s=p.vfaTrMs / 1000.0)
        return options

    @staticmethod
    def describeDevice(device="auto"):
        """Where the fit will run, in words, for the status line; refuses 'cuda' without a GPU."""
        from DCEPKFittingLib.errors import DCEPKInputError

        try:
            import torch
        except ImportError:
            return _("CPU (PyTorch not installed)")
        hasGpu = torch.cuda.is_available()
        if device == "cuda" and not hasGpu:
            raise DCEPKInputError(_("No CUDA GPU is available: choose device 'auto' or 'cpu'."))
        if device == "cpu":
            return _("CPU")
        if hasGpu:
            return _("GPU ({name})").format(name=torch.cuda.get_device_name(0))
        return _("CPU (no GPU found)")

    def loadPhantomSample(self, returnPhantom=False):
        """Generate the synthetic DCE phantom, keep a copy of its files in the cache, load it into the scene."""
        from DCEPKFittingLib import mrml_bridge
        from DCEPKFittingLib.phantom import make_phantom, write_phantom

        phantom = make_phantom(vfa_flip_angles_deg=PHANTOM_VFA_FLIP_ANGLES_DEG)
        cacheFolder = os.path.join(slicer.app.cachePath, "DCEPK", "phantom")
        if not os.path.exists(os.path.join(cacheFolder, "dce.seq.nrrd")):
            try:
                write_phantom(phantom, cacheFolder)  # the same files `dcepk phantom` writes, for scripts
            except Exception as error:  # noqa: BLE001  (the cache copy is a convenience; loading goes on)
                logging.warning(f"DCEPK phantom not cached in {cacheFolder}: {error}")
        nodes = mrml_bridge.phantom_to_scene(self.scene, phantom, "DCEPK phantom",
                                             slicer.modules.sequences.logic())
        browser = slicer.modules.sequences.logic().GetFirstBrowserNodeForSequenceNode(nodes["sequence"])
        if browser is not None:
            slicer.util.setSliceViewerLayers(background=browser.GetProxyNode(nodes["sequence"]), fit=True)
        return (phantom, nodes) if returnPhantom else [nodes["sequence"]]


#
# Test
#
class DCEPKFittingTest(ScriptedLoadableModuleTest):
    """Whole workflow in Slicer on the built-in phantom, checked against its ground truth."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_PhantomWorkflow()
        self.setUp()
        self.test_CancelLeavesSceneUnchanged()

    def test_PhantomWorkflow(self):
        import numpy as np

        self.delayDisplay("Generating the DCEPK phantom")
        logic = DCEPKFittingLogic()
        phantom, nodes = logic.loadPhantomSample(returnPhantom=True)
        self.delayDisplay("Fitting the extended Tofts model")
        outputs = logic.run(nodes["sequence"], model="etofts", aifSegmentation=nodes["aifSegmentation"],
                            aifSegmentId=nodes["aifSegmentation"].GetSegmentation().GetNthSegmentID(0),
                            t10_s=None, vfaSequence=nodes["vfa"], r1_per_mM_s=phantom.protocol.r1_per_mM_s,
                            hematocrit=phantom.protocol.hct, mask=nodes["tissues"],
                            statisticsSegmentation=nodes["tissues"])
        for name in ("Ktrans", "ve", "vp", "R2", "status"):
            self.assertIn(name, outputs)
        ktrans = slicer.util.arrayFromVolume(outputs["Ktrans"])
        ve = slicer.util.arrayFromVolume(outputs["ve"])
        rimValue = next(v for v, n in phantom.label_names.items() if "rim" in n)
        rim = phantom.labels == rimValue
        self.assertGreater(int(rim.sum()), 20)
        ktransError = np.nanmedian(np.abs(ktrans[rim] - phantom.truth["Ktrans"][rim]) / phantom.truth["Ktrans"][rim])
        veError = np.nanmedian(np.abs(ve[rim] - phantom.truth["ve"][rim]))
        self.assertLess(ktransError, 0.15, f"median relative Ktrans error in the tumour rim: {ktransError:.3f}")
        self.assertLess(veError, 0.05, f"median absolute ve error in the tumour rim: {veError:.3f}")
        table = outputs["statistics"].GetTable()
        segments = nodes["tissues"].GetSegmentation().GetNumberOfSegments()
        statisticsMaps = [name for name in outputs if name not in ("status", "statistics")]
        self.assertEqual(table.GetNumberOfRows(), segments * len(statisticsMaps))

        self.delayDisplay("Re-running updates the same nodes")
        count = slicer.mrmlScene.GetNumberOfNodes()
        again = logic.run(nodes["sequence"], model="etofts", aifSegmentation=nodes["aifSegmentation"],
                          aifSegmentId=nodes["aifSegmentation"].GetSegmentation().GetNthSegmentID(0),
                          t10_s=None, vfaSequence=nodes["vfa"], r1_per_mM_s=phantom.protocol.r1_per_mM_s,
                          mask=nodes["tissues"], method="linear")
        self.assertIs(again["Ktrans"], outputs["Ktrans"])
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), count)
        self.delayDisplay("Phantom workflow passed")

    def test_CancelLeavesSceneUnchanged(self):
        import threading

        from DCEPKFittingLib.errors import JobCancelledError

        logic = DCEPKFittingLogic()
        phantom, nodes = logic.loadPhantomSample(returnPhantom=True)
        count = slicer.mrmlScene.GetNumberOfNodes()
        cancel = threading.Event()
        cancel.set()
        with self.assertRaises(JobCancelledError):
            logic.run(nodes["sequence"], aifRoi=nodes["aifRoi"], t10_s=1.4, cancel=cancel)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), count)
        self.delayDisplay("Cancel test passed")
