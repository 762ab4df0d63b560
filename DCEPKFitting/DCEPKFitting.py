"""DCEPK Fitting: pharmacokinetic maps from a DCE-MRI volume sequence by tracer-kinetic model fitting.

Qt shell only (see docs/ARCHITECTURE.md): the science is in ``DCEPKFittingLib`` (pure core) and
``DCEPKFittingLib.mrml`` (scene <-> arrays). The Logic is usable from the Python console:

    import DCEPKFitting
    logic = DCEPKFitting.DCEPKFittingLogic()
    nodes = logic.run(sequenceNode, model="etofts", aifRoi=roiNode, t10_s=1.4)  # {"Ktrans": volume node, ...}

Large fits run in a separate process (``dcepk fit``), so a cancel stops them at once and a crash cannot
take Slicer down; ``logic.computeIn = "thread"`` keeps them in Slicer's process.
"""

import logging
import os
import pathlib
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

# Only dependency-free helpers are imported at load time; the numerical Lib modules are imported
# inside functions, after the widget has checked (and, if the user agrees, installed) the Python
# requirements, so the module always loads.
from DCEPKFittingLib.panels import panel_state
from DCEPKFittingLib.widgets.module_widget import CONTRIBUTORS, DCEPKBackgroundJobWidgetMixin, missingComputePackages

MODELS = ["etofts", "tofts", "patlak", "2cxm", "2cum"]
POPULATION_AIFS = ["parker", "georgiou", "weinmann"]
AIF_SOURCES = ["roi", "segment", "csv", "population", "auto"]  # as dcepk fit (panel_state.FITTING_AIF_SOURCES)
AUTO_AIF_KINDS = ["either", "artery", "vein"]
PHANTOM_VFA_FLIP_ANGLES_DEG = (2.0, 5.0, 10.0, 15.0, 20.0)
PHANTOM_SAMPLE_NAME = "DCEPK phantom"
SELF_TEST_PHANTOM_SHAPE = (2, 48, 48)  # small enough for a self-test in seconds, every tissue included
# Slicer 5.8 is the oldest release with every API used here (volume sequences, parameterNodeWrapper with
# node unions, colour legends, table column titles as headers); slicer.packaging (5.12) and SampleData URL
# rewrite rules (5.10) are used where present.
MINIMUM_SLICER_VERSION = (5, 8)


#
# Module
#
class DCEPKFitting(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("DCE PK Fitting")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Quantification")]
        self.parent.dependencies = ["Sequences", "Markups", "Segmentations", "Plots"]
        self.parent.contributors = CONTRIBUTORS
        self.parent.helpText = _("""
Pharmacokinetic maps from a dynamic contrast-enhanced (DCE) MRI series by voxel-wise tracer-kinetic
model fitting: Tofts, extended Tofts, Patlak, two-compartment exchange (2CXM) and uptake (2CUM).<br>
<b>Steps</b>: choose the DCE volume sequence. Flip angle (degrees) and TR (milliseconds) come from the series
header (shown under the series); tick <i>Flip angle</i> or <i>TR</i> to type a value instead, which you must
do when the header has none. Give pre-contrast T1 (T10 in seconds, a T1 map, or a variable-flip-angle series,
whose TR also comes from its header unless <i>VFA TR</i> is ticked); give the input function (<i>Source</i>):
<i>roi</i>, create an ROI (box) in <i>AIF ROI</i> and drag it onto an artery; <i>segment</i>, a segment painted on
the artery; <i>csv</i>, a CSV file of time (s) and concentration (mM); <i>population</i>, a population AIF; or
<i>auto</i>, automatic detection of an artery or vein (<i>either</i>: the artery, else the vein), whose voxels
and curve are put in the scene after the fit (segmentation 'DCEPK AIF (detected)', segments 'artery' and 'vein',
and a chart). <i>Blood T10</i> (seconds; 0: the T10 given, detection with one T10 value: 1.6 s) converts the
vessel's signal. <i>Detect the input function</i> finds the vessel now: its voxels become an editable
segmentation chosen as the AIF segment, its curve is shown in a chart. Choose the model and press Apply.
Apply stays disabled, with the reason in its tooltip and the status line, until every input is there.
Fitting runs in the background (a large fit in a separate process, so that a crash cannot close Slicer) and
can be cancelled; the scene is only changed when it has finished.<br>
<b>Outputs and units</b> (OSIPI lexicon): Ktrans and kep in 1/min, ve and vp as fractions, Fp in
ml/100ml/min, PS in 1/min, standard errors as &lt;name&gt;_se in the same units, R2 (goodness of fit),
rmse in mM, and the fit status label map (one name per voxel: masked, converged, hit bound, failed, invalid
input, ...; <i>Show fit status</i> overlays it). Masked and failed voxels are transparent over the anatomy.
Frame times are in seconds (Slicer's MultiVolume frame labels, in ms, are converted).<br>
Tick <i>Voxel curve on click</i>, then click a voxel, to see its measured and fitted concentration.
""")
        self.parent.helpText += self.getDefaultModuleDocumentationLink()
        self.parent.acknowledgementText = _("""
DCEPK is an open-source project. Fitting follows the OSIPI DCE-MRI lexicon and is checked against the OSIPI
DCE-DSC-MRI CodeCollection test data and the QIBA DCE-MRI digital reference object. The MultiVolume test
phantoms come from the PkModeling project (3D Slicer licence).
""")
        if (slicer.app.majorVersion, slicer.app.minorVersion) < MINIMUM_SLICER_VERSION:
            logging.error("DCEPK needs Slicer %d.%d or later: install a newer Slicer", *MINIMUM_SLICER_VERSION)
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """'DCEPK phantom' in the Sample Data module: generated on this computer, nothing is downloaded.

    The Sample Data button runs ``customDownloader``: the whole phantom (DCE and VFA series, tissue and
    AIF segments, AIF box). ``SampleData.downloadSample("DCEPK phantom")`` fetches the DCE series from
    its URI, a file in DCEPK's cache; from Slicer 5.10 a URL rewrite rule writes that file when it is
    first asked for (on 5.8 the button or ``DCEPKFittingLogic().loadPhantomSample()`` writes it).
    """
    import SampleData

    uri = DCEPKFittingLogic.phantomSampleUri()
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="DCEPK",
        sampleName=PHANTOM_SAMPLE_NAME,
        uris=uri,
        fileNames="DCEPKPhantom.seq.nrrd",
        nodeNames=PHANTOM_SAMPLE_NAME,
        thumbnailFileName=os.path.join(os.path.dirname(__file__), "Resources", "Icons", "DCEPKPhantom.png"),
        loadFileTypes="SequenceFile",
        customDownloader=lambda source: DCEPKFittingLogic().loadPhantomSample(),
    )
    if hasattr(SampleData.SampleDataLogic, "registerUrlRewriteRule"):
        SampleData.SampleDataLogic.registerUrlRewriteRule(
            "DCEPKPhantom", lambda url: DCEPKFittingLogic.writePhantomSample() if url == uri else url)


#
# Parameter node
#
@parameterNodeWrapper
class DCEPKFittingParameterNode:
    """GUI state, saved with the scene. Units in the names: Deg, Ms (milliseconds), plain seconds otherwise.

    Flip angle and TRs are the user's overrides: a run uses them only when the matching ``use...`` is ticked,
    else the series header's values (see ``panel_state``).
    """

    inputSequence: vtkMRMLSequenceNode
    useFlipAngle: bool = False
    flipAngleDeg: Annotated[float, WithinRange(0.1, 90.0)] = 15.0
    useRepetitionTime: bool = False
    repetitionTimeMs: Annotated[float, WithinRange(0.1, 100.0)] = 5.0
    t10Mode: Annotated[str, Choice(["fixed", "map", "vfa"])] = "fixed"
    t10Value: Annotated[float, WithinRange(0.05, 10.0)] = 1.4  # s
    t10Map: vtkMRMLScalarVolumeNode
    t10MapUnit: Annotated[str, Choice(["ms", "s"])] = "ms"
    vfaSequence: vtkMRMLSequenceNode
    vfaFlipAngles: str = ""  # degrees, comma-separated
    useVfaRepetitionTime: bool = False
    vfaTrMs: Annotated[float, WithinRange(0.1, 100.0)] = 5.0
    relaxivity: Annotated[float, WithinRange(0.1, 20.0)] = 4.5  # 1/(mM s)
    aifSource: Annotated[str, Choice(AIF_SOURCES)] = "roi"
    aifRoi: vtkMRMLMarkupsROINode
    aifSegmentation: vtkMRMLSegmentationNode
    aifSegmentId: str = ""
    aifCsvPath: str = ""  # time (s), concentration (mM)
    autoAifKind: Annotated[str, Choice(AUTO_AIF_KINDS)] = "either"
    bloodT10: Annotated[float, WithinRange(0.0, 5.0)] = 0.0  # s; 0: the T10 given (automatic detection: 1.6 s)
    populationAif: Annotated[str, Choice(POPULATION_AIFS)] = "parker"
    aifTopFraction: Annotated[float, WithinRange(0.01, 1.0)] = 1.0
    hematocrit: Annotated[float, WithinRange(0.0, 0.99)] = 0.45
    aifDelay: Annotated[float, WithinRange(-60.0, 60.0)] = 0.0  # s
    model: Annotated[str, Choice(MODELS)] = "etofts"
    method: Annotated[str, Choice(["nlls", "linear"])] = "nlls"
    fitDelay: bool = False
    # A node union whose default is None must list None: the wrapper writes every default at creation.
    fitMask: Optional[Union[vtkMRMLSegmentationNode, vtkMRMLMarkupsROINode, vtkMRMLLabelMapVolumeNode]]
    statisticsSegmentation: vtkMRMLSegmentationNode
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    outputPrefix: str = "DCEPK"
    updateExisting: bool = True
    showFitStatus: bool = False


#
# Widget
#
class DCEPKFittingWidget(DCEPKBackgroundJobWidgetMixin, ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Wires the GUI to the Logic; holds no science and decides no panel state (``logic.panelState``)."""

    CLICK_TOLERANCE_PIXELS = 3  # a press and release closer than this is a click, not a drag
    LIB_PACKAGES = ("DCEPKFittingLib",)  # reloaded by Reload (onReload), with the Lib packages that use them

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._observedRoi = None
        self._seriesCache = (None, None, None)  # (node id, node MTime, DCESeries) for the live AIF plot
        self._aifChart = None
        self._voxelChart = None
        self._statisticsTable = None
        self._clickObservations = []  # (interactor, tags) of the slice views while 'Voxel curve on click' is on
        self._pressPosition = None

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
        self.ui.aifRoiSelector.connect("nodeAddedByUser(vtkMRMLNode*)", self.onAifRoiAdded)
        self.ui.aifSegmentSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onAifSegmentSelected)
        self.ui.aifSegmentSelector.connect("currentSegmentChanged(QString)", self.onAifSegmentSelected)
        self.ui.detectAifButton.connect("clicked(bool)", self.onDetectAif)
        self.ui.voxelCurveCheckBox.connect("toggled(bool)", self.onVoxelCurveToggled)
        self.ui.showFitStatusCheckBox.connect("toggled(bool)", self.onShowFitStatusToggled)

        self.setupBackgroundJob()
        # Throttle: dragging an ROI fires many events; redraw once it has stopped for 300 ms.
        self._aifTimer = qt.QTimer()
        self._aifTimer.setSingleShot(True)
        self._aifTimer.setInterval(300)
        self._aifTimer.connect("timeout()", self.updateAifPlot)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.stopBackgroundJob()
        self._aifTimer.stop()
        self.onVoxelCurveToggled(False)
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
        self.mirrorPanelView(self.logic.panelState(p, running=self._job is not None))
        if p:
            self._mirrorAifSegment(p)
            self._observeRoi(p.aifRoi if p.aifSource == "roi" else None)

    def _mirrorAifSegment(self, p) -> None:
        """The segment selector has no parameter-node connector: show the saved choice in it. Its own
        signals are blocked meanwhile, because choosing a segmentation makes it select (and announce) the
        first segment, which would overwrite the saved segment (after a scene reload, for example)."""
        selector = self.ui.aifSegmentSelector
        wasBlocked = selector.blockSignals(True)
        try:
            if selector.currentNode() is not p.aifSegmentation:
                selector.setCurrentNode(p.aifSegmentation)
            if selector.currentSegmentID() != p.aifSegmentId:
                selector.setCurrentSegmentID(p.aifSegmentId)
        finally:
            selector.blockSignals(wasBlocked)

    # ---------------------------------------------------------------- inputs
    def onInputSequenceChanged(self, node) -> None:
        self._aifTimer.start()  # FA/TR are shown from the header by the panel state; the AIF curve follows

    def onAifSegmentSelected(self, *args) -> None:
        """The user chose a segmentation or a segment: store both at once, so that the panel (one Modified
        event) never sees a segment of one segmentation paired with another."""
        if self._parameterNode:
            with slicer.util.NodeModify(self._parameterNode):
                self._parameterNode.aifSegmentation = self.ui.aifSegmentSelector.currentNode()
                self._parameterNode.aifSegmentId = self.ui.aifSegmentSelector.currentSegmentID() or ""

    def onDetectAif(self) -> None:
        """Detect the input function now: its voxels become the editable AIF segment (segmentation
        'DCEPK AIF (detected)'), its curve is shown in a chart."""
        if not self.ensureDependencies("DCEPK Fitting"):
            return
        p = self._parameterNode

        def detect():
            segmentation, chart, segmentId = self.logic.detectInputFunction(
                p.inputSequence, **self.logic.detectionOptionsFromParameterNode(p))
            slicer.modules.plots.logic().ShowChartInLayout(chart)
            with slicer.util.NodeModify(p):
                p.aifSource, p.aifSegmentation, p.aifSegmentId = "segment", segmentation, segmentId
            self.ui.statusLabel.text = _("Input function detected: segment '{segment}' of '{name}', now the AIF "
                                         "segment (edit it in Segment Editor).").format(segment=segmentId,
                                                                                        name=segmentation.GetName())

        self.runShowingErrors(_("The input function could not be detected."), detect)

    # ---------------------------------------------------------------- AIF box and its live curve
    def onAifRoiAdded(self, roi) -> None:
        """The selector's 'Create new' makes an empty box: give it a size on the series, where the user looks."""
        p = self._parameterNode
        if p is None or p.inputSequence is None:
            return
        # The crosshair (Shift + mouse move places it) marks where the user looks; else the series' middle.
        crosshair = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLCrosshairNode")
        centre = crosshair.GetCrosshairRAS() if crosshair is not None else None
        if self.runShowingErrors(_("The AIF box could not be placed."), self.logic.placeAifRoi, roi,
                                 p.inputSequence, centre):
            self.ui.statusLabel.text = _("AIF box placed: drag it (or its handles) onto the artery.")

    def onAifRoiChanged(self, node) -> None:
        self._observeRoi(node)
        self._aifTimer.start()

    def _observeRoi(self, roi) -> None:
        if roi is self._observedRoi:
            return
        if self._observedRoi is not None:
            self.removeObserver(self._observedRoi, vtk.vtkCommand.ModifiedEvent, self.onRoiModified)
        self._observedRoi = roi
        if roi is not None:
            # Modified, not only PointModified: a size change or a move of its parent transform changes the voxels too.
            self.addObserver(roi, vtk.vtkCommand.ModifiedEvent, self.onRoiModified)

    def onRoiModified(self, caller, event) -> None:
        self._aifTimer.start()  # restart: redraw once the ROI has stopped moving for a moment

    def _currentSeries(self):
        from DCEPKFittingLib import mrml as mrml_bridge

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
        from DCEPKFittingLib import mrml as mrml_bridge

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

    # ---------------------------------------------------------------- voxel curve of the clicked voxel
    def onVoxelCurveToggled(self, enabled) -> None:
        """Follow clicks (press and release in place) in the slice views; hovering and dragging do nothing."""
        for interactor, tags in self._clickObservations:
            for tag in tags:
                interactor.RemoveObserver(tag)
        self._clickObservations = []
        layoutManager = slicer.app.layoutManager()
        if not enabled or layoutManager is None:
            return
        for viewName in layoutManager.sliceViewNames():
            interactor = layoutManager.sliceWidget(viewName).sliceView().interactor()
            # Priority above the views' own handlers, which may consume the events.
            tags = [interactor.AddObserver(vtk.vtkCommand.LeftButtonPressEvent, self.onViewPressed, 1.0),
                    interactor.AddObserver(vtk.vtkCommand.LeftButtonReleaseEvent, self.onViewReleased, 1.0)]
            self._clickObservations.append((interactor, tags))

    def onViewPressed(self, interactor, event) -> None:
        self._pressPosition = interactor.GetEventPosition()

    def onViewReleased(self, interactor, event) -> None:
        press, self._pressPosition = self._pressPosition, None
        release = interactor.GetEventPosition()
        if press is None or max(abs(a - b) for a, b in zip(press, release)) > self.CLICK_TOLERANCE_PIXELS:
            return  # a drag (window/level, panning), not a click
        crosshair = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLCrosshairNode")
        ras = [0.0, 0.0, 0.0]
        if crosshair is not None and crosshair.GetCursorPositionRAS(ras):
            self.updateVoxelPlot(ras)

    def updateVoxelPlot(self, ras) -> None:
        from DCEPKFittingLib import mrml as mrml_bridge

        curves = self.logic.voxelCurves(ras)
        if curves is None:
            return
        title, times_s, series = curves
        self._voxelChart = mrml_bridge.plot_curves(slicer.mrmlScene, "DCEPK voxel curve", times_s, series,
                                                   "time (s)", "concentration (mM)", chart=self._voxelChart)
        self._voxelChart.SetTitle(title)
        slicer.modules.plots.logic().ShowChartInLayout(self._voxelChart)

    # ---------------------------------------------------------------- apply / cancel / results
    def onApplyButton(self) -> None:
        if self._job is not None:
            return
        if not self.ensureDependencies("DCEPK Fitting"):
            self._updateGuiState()
            return

        def start():
            options = self.logic.optionsFromParameterNode(self._parameterNode)
            deviceText = self.logic.describeDevice(options["device"])
            request = self.logic.prepare(self._parameterNode.inputSequence, **options)
            self.startBackgroundJob(request, _("Fitting on {device}...").format(device=deviceText))

        if not self.runShowingErrors(_("The fit could not start."), start):
            self.ui.statusLabel.text = _("The fit could not start: nothing was run (see the error message).")
        self._updateGuiState()  # the buttons reflect whether a job runs, whatever happened

    def publishJobResult(self, request, output) -> None:
        from DCEPKFittingLib import mrml as mrml_bridge

        nodes = self.logic.publish(request, output)
        self.showResults(nodes)
        if "input_function_chart" in nodes:   # detected during the run: its curve (its voxels: a segmentation)
            slicer.modules.plots.logic().ShowChartInLayout(nodes["input_function_chart"])
        self.ui.statusLabel.text = _("Done: {n} maps. {messages}").format(
            n=len([k for k in nodes if k not in mrml_bridge.NOT_MAPS]), messages=" ".join(output.messages))

    def showResults(self, nodes) -> None:
        """Ktrans over the DCE frame, with a colour legend; the statistics table can be exported."""
        sequence = self._parameterNode.inputSequence
        self.logic.showMaps(nodes, sequence, showFitStatus=self._parameterNode.showFitStatus)
        self.ui.exportTableButton.enabled = "statistics" in nodes
        self._statisticsTable = nodes.get("statistics")

    def onShowFitStatusToggled(self, show) -> None:
        self.logic.showFitStatus(self.logic.lastNodes.get("status"), show)

    def onExportTable(self) -> None:
        self.exportStatisticsTable(self._statisticsTable)


#
# Logic
#
class DCEPKFittingLogic(ScriptedLoadableModuleLogic):
    """Fitting from the scene, without any GUI (no Qt here): usable from the Python console.

    ``run`` is synchronous. It is three steps, which the widget calls one by one: ``prepare`` (reads
    nodes, main thread) -> ``startCompute`` (``pipeline.run_fit`` in the background, returns the job)
    -> ``publish`` (writes nodes, main thread). Nothing is written before the compute succeeded, so a
    cancel, an error or a crashed child process leaves the scene as it was. ``lastOutput`` keeps the last
    ``PKFit`` (concentration curves, fitted model curves) for the voxel plot.

    Where the compute runs, ``computeIn``: ``"child"``, a ``dcepk fit`` process started with
    ``pythonExecutable`` (None: Slicer's PythonSlicer) on the inputs written to a temporary folder (in
    ``childTemporaryFolder``, None: the system's), removed afterwards; cancel kills it at once.
    ``"thread"``: a worker thread of Slicer's process. ``"auto"`` (default): a child process for a large fit.
    """

    def __init__(self, scene=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._scene = scene
        self.lastOutput = None
        self.lastNodes = {}
        self.computeIn = "auto"
        self.pythonExecutable = None
        self.childTemporaryFolder = None

    @property
    def scene(self):
        return self._scene if self._scene is not None else slicer.mrmlScene

    def getParameterNode(self):
        return DCEPKFittingParameterNode(super().getParameterNode())

    def run(self, sequenceNode, model="etofts", method="nlls", aifRoi=None, aifSegmentation=None,
            aifSegmentId=None, populationAif=None, aifTopFraction=None, aifDelay_s=0.0, hematocrit=0.45,
            t10_s=1.4, t10Map=None, t10MapUnit="ms", vfaSequence=None, vfaFlipAngles_deg=None, vfaTr_s=None,
            flipAngle_deg=None, tr_s=None, r1_per_mM_s=None, mask=None, fitDelay=False, device="auto",
            statisticsSegmentation=None, outputPrefix="DCEPK", updateExisting=True, aifCsv="", autoAif=None,
            bloodT10_s=None, progress=None, cancel=None):
        """Fit ``model`` to every voxel of ``sequenceNode`` and put the maps in the scene; returns ``{map: node}``.

        Units: times and T10 in seconds, flip angles in degrees, TR in seconds, r1 in 1/(mM s),
        haematocrit as a fraction. ``t10MapUnit`` ('ms' or 's') is the unit of ``t10Map``'s voxels.
        Input function, one of (as ``dcepk fit``): ``aifRoi`` (markups ROI), ``aifSegmentation`` +
        ``aifSegmentId``, ``populationAif`` ('parker', 'georgiou', 'weinmann'), ``aifCsv`` (a CSV file:
        time s, concentration mM) or ``autoAif`` ('either', 'artery', 'vein': detected automatically;
        the voxels chosen come back as 'input_function', a segmentation with segments 'artery' and
        'vein', and its curve as 'input_function_chart'). ``bloodT10_s``: T10 of blood (s) for the
        vessel's signal (None: the T10 given; automatic detection with one T10 value: 1.6 s).
        ``mask``: segmentation, ROI, label map or bool array. ``progress(fraction, message)`` and
        ``cancel`` (``threading.Event``) are optional. Flip angle and TR default to the series' attributes.
        """
        request = self.prepare(
            sequenceNode, model=model, method=method, aifRoi=aifRoi, aifSegmentation=aifSegmentation,
            aifSegmentId=aifSegmentId, populationAif=populationAif, aifTopFraction=aifTopFraction,
            aifDelay_s=aifDelay_s, hematocrit=hematocrit, t10_s=t10_s, t10Map=t10Map, t10MapUnit=t10MapUnit,
            vfaSequence=vfaSequence, vfaFlipAngles_deg=vfaFlipAngles_deg, vfaTr_s=vfaTr_s,
            flipAngle_deg=flipAngle_deg, tr_s=tr_s, r1_per_mM_s=r1_per_mM_s, mask=mask, fitDelay=fitDelay,
            device=device, statisticsSegmentation=statisticsSegmentation, outputPrefix=outputPrefix,
            updateExisting=updateExisting, aifCsv=aifCsv, autoAif=autoAif, bloodT10_s=bloodT10_s)
        from DCEPKFittingLib import mrml as mrml_bridge
        from DCEPKFittingLib.core.child_process import wait_for_job

        if mrml_bridge.scene_fit_place(request, self.computeIn) == "thread":
            output = self.compute(request, progress=progress, cancel=cancel)  # on this thread, as before
        else:
            output = wait_for_job(self.startCompute(request), progress=progress, cancel=cancel)
        return self.publish(request, output)

    def prepare(self, sequenceNode, model="etofts", method="nlls", aifRoi=None, aifSegmentation=None,
                aifSegmentId=None, populationAif=None, aifTopFraction=None, aifDelay_s=0.0, hematocrit=0.45,
                t10_s=1.4, t10Map=None, t10MapUnit="ms", vfaSequence=None, vfaFlipAngles_deg=None, vfaTr_s=None,
                flipAngle_deg=None, tr_s=None, r1_per_mM_s=None, mask=None, fitDelay=False, device="auto",
                statisticsSegmentation=None, outputPrefix="DCEPK", updateExisting=True, aifCsv="", autoAif=None,
                bloodT10_s=None):
        """Read the inputs from the scene (main thread); raises ``DCEPKInputError`` naming any problem."""
        from DCEPKFittingLib import mrml as mrml_bridge

        return mrml_bridge.prepare_scene_fit(
            sequenceNode, model=model, method=method, aif_roi=aifRoi, aif_segmentation=aifSegmentation,
            aif_segment_id=aifSegmentId, population_aif=populationAif, aif_top_fraction=aifTopFraction,
            aif_delay_s=aifDelay_s, hct=hematocrit, t10_s=t10_s, t10_map=t10Map, t10_map_unit=t10MapUnit,
            vfa_sequence=vfaSequence, vfa_flip_angles_deg=vfaFlipAngles_deg, vfa_tr_s=vfaTr_s, fa_deg=flipAngle_deg,
            tr_s=tr_s, r1_per_mM_s=r1_per_mM_s, mask=mask, fit_delay=fitDelay, device=device,
            statistics_segmentation=statisticsSegmentation, output_prefix=outputPrefix,
            update_existing=updateExisting, aif_csv=aifCsv, auto_aif=autoAif, blood_t10_s=bloodT10_s)

    @staticmethod
    def compute(request, progress=None, cancel=None):
        """The fit itself (``pipeline.run_fit``) in this thread: touches no node, so it may run in a worker."""
        from DCEPKFittingLib import mrml as mrml_bridge

        return mrml_bridge.compute_scene_fit(request, progress=progress, cancel=cancel)

    def startCompute(self, request):
        """Start the fit of a prepared request where ``computeIn`` says; returns the running job (``poll()``
        it for progress, ``cancel()`` it; its ``result`` is what ``publish`` takes)."""
        from DCEPKFittingLib import mrml as mrml_bridge

        return mrml_bridge.start_scene_fit(request, self.computeIn, compute=self.compute,
                                           python=self.pythonExecutable, temp_parent=self.childTemporaryFolder)

    def publish(self, request, output):
        """Write the maps and statistics into the scene (main thread); returns ``{map name: node}``."""
        from DCEPKFittingLib import mrml as mrml_bridge

        nodes = mrml_bridge.publish_scene_fit(self.scene, request, output)
        self.lastOutput, self.lastNodes = output, nodes
        return nodes

    def runBatch(self, manifestPath, outDir, progress=None, cancel=None, wait=False, **options):
        """Run ``dcepk batch`` on a cohort manifest (README: Cohorts) in a child process (``pythonExecutable``,
        None: PythonSlicer); returns the started job at once, so Slicer stays responsive (``wait=True``:
        blocks and returns the result). ``job.poll()`` (e.g. from a ``qt.QTimer``) calls
        ``progress(fraction, message)``; ``job.cancel()`` or setting ``cancel`` kills the batch (finished
        subjects are kept; the same call resumes it); ``job.result``: exit code (0 all finished, 1 some failed)
        and counts. ``options`` are the command's (``workers=2``, ``network="hetero_encoder"``, ``force=True``)."""
        from DCEPKFittingLib import mrml as mrml_bridge
        from DCEPKFittingLib.core.child_process import wait_for_job
        from DCEPKFittingLib.workflows.batch_process import batch_job

        job = batch_job(mrml_bridge.child_python(self.pythonExecutable), manifestPath, outDir, progress=progress,
                        cancel=cancel, **options).start()
        return wait_for_job(job) if wait else job

    def panelState(self, p, running=False):
        """What the panel shows and allows for parameter node ``p`` (``panel_state.PanelView``)."""
        from DCEPKFittingLib import mrml as mrml_bridge

        header = panel_state.SeriesHeader()
        if p is not None:
            vfa = p.vfaSequence if p.t10Mode == "vfa" else None
            segmentation = p.aifSegmentation if p.aifSource == "segment" else None
            header = mrml_bridge.series_header(p.inputSequence, vfa, segmentation)
        return panel_state.fitting_panel(p, header, running)

    @staticmethod
    def optionsFromParameterNode(p):
        """Keyword arguments of ``run``/``prepare`` from the GUI state (ms converted to s here).

        Flip angle and TRs are passed only when the user ticked them; otherwise None, and the run
        takes the series headers' values (an error names the box to tick when there are none).
        """
        from DCEPKFittingLib.core.errors import DCEPKInputError

        flipAngle_deg, tr_s, vfaTr_s = panel_state.typed_acquisition(p, vfa=True)
        options = dict(model=p.model, method=p.method, hematocrit=p.hematocrit, aifDelay_s=p.aifDelay,
                       flipAngle_deg=flipAngle_deg, tr_s=tr_s, r1_per_mM_s=p.relaxivity, mask=p.fitMask,
                       fitDelay=p.fitDelay, device=p.device,
                       statisticsSegmentation=p.statisticsSegmentation, outputPrefix=p.outputPrefix,
                       updateExisting=p.updateExisting,
                       aifTopFraction=p.aifTopFraction if p.aifTopFraction < 1.0 else None)
        if p.aifSource == "roi":
            options["aifRoi"] = p.aifRoi
        elif p.aifSource == "segment":
            options.update(aifSegmentation=p.aifSegmentation, aifSegmentId=p.aifSegmentId)
        elif p.aifSource == "csv":
            options["aifCsv"] = p.aifCsvPath
        elif p.aifSource == "auto":
            options["autoAif"] = p.autoAifKind
        else:
            options["populationAif"] = p.populationAif
        if p.aifSource in ("roi", "segment", "auto"):   # a vessel's signal is converted
            options["bloodT10_s"] = p.bloodT10 or None
        if p.t10Mode == "fixed":
            options["t10_s"] = p.t10Value
        elif p.t10Mode == "map":
            options.update(t10_s=None, t10Map=p.t10Map, t10MapUnit=p.t10MapUnit)
        else:
            try:
                angles = panel_state.parse_flip_angles(p.vfaFlipAngles)
            except ValueError as error:
                raise DCEPKInputError(str(error)) from None
            options.update(t10_s=None, vfaSequence=p.vfaSequence, vfaFlipAngles_deg=angles or None, vfaTr_s=vfaTr_s)
        return options

    @staticmethod
    def detectionOptionsFromParameterNode(p):
        """Keyword arguments of ``detectInputFunction`` from the GUI state. With a VFA series as the T1 source
        the chart's curve is converted with the blood T10 (given, else 1.6 s); a fit of the detected segment
        then converts it with the VFA T1 map."""
        from DCEPKFittingLib.pipeline.input_function import DEFAULT_BLOOD_T10_S

        flipAngle_deg, tr_s, _ = panel_state.typed_acquisition(p)
        options = dict(flipAngle_deg=flipAngle_deg, tr_s=tr_s, autoAif=p.autoAifKind, bloodT10_s=p.bloodT10 or None,
                       r1_per_mM_s=p.relaxivity)
        if p.t10Mode == "fixed":
            options["t10_s"] = p.t10Value
        elif p.t10Mode == "map":
            options.update(t10Map=p.t10Map, t10MapUnit=p.t10MapUnit)
        else:
            options["t10_s"] = options["bloodT10_s"] = p.bloodT10 or DEFAULT_BLOOD_T10_S
        return options

    def detectInputFunction(self, sequenceNode, flipAngle_deg=None, tr_s=None, t10_s=None, t10Map=None,
                            t10MapUnit="ms", autoAif="either", bloodT10_s=None, r1_per_mM_s=None):
        """Detect the input function of ``sequenceNode`` (as ``dcepk fit --auto-aif``); returns
        ``(segmentation, chart, segmentId)``: the voxels found (segments 'artery', 'vein'; an earlier
        detection's segmentation is replaced), the blood curve in a plot chart, and the ID of the segment
        whose curve is the input function (``aifSegmentation`` + ``aifSegmentId`` to fit with it, edited or not)."""
        from DCEPKFittingLib import mrml as mrml_bridge

        segmentation, chart, number = mrml_bridge.detect_scene_input_function(
            self.scene, sequenceNode, fa_deg=flipAngle_deg, tr_s=tr_s, t10_s=t10_s, t10_map=t10Map,
            t10_map_unit=t10MapUnit, kind=autoAif, blood_t10_s=bloodT10_s, r1_per_mM_s=r1_per_mM_s)
        return segmentation, chart, mrml_bridge.segment_ids(segmentation)[number - 1] if number else ""

    @staticmethod
    def placeAifRoi(roiNode, sequenceNode, centreRas=None):
        """Size a new (empty) ROI as a small box on the series' grid, at ``centreRas`` when it lies in the series."""
        from DCEPKFittingLib import mrml as mrml_bridge

        return mrml_bridge.place_roi_on_series(roiNode, sequenceNode, centreRas)

    def voxelCurves(self, ras):
        """(title, times in s, {curve name: mM}) of the voxel at RAS point ``ras`` after the last fit, or None."""
        from DCEPKFittingLib import mrml as mrml_bridge

        output = self.lastOutput
        index = mrml_bridge.voxel_index_at_ras(output.geometry, output.concentration.shape, ras) if output else None
        if index is None:
            return None
        k, j, i = index
        curves = {"measured (mM)": output.concentration[k, j, i, :], "fitted (mM)": output.predict((k, j, i))}
        return _("DCEPK voxel (k={k}, j={j}, i={i})").format(k=k, j=j, i=i), output.times_s, curves

    def showMaps(self, nodes, sequenceNode=None, showFitStatus=False) -> None:
        """Ktrans (or PS) over the DCE series' current frame with a colour legend, the fit status as labels if
        asked, and the statistics table in the layout's table view."""
        mapNode = nodes.get("Ktrans") or nodes.get("PS") or next(iter(nodes.values()))
        if "statistics" in nodes:
            applicationLogic = slicer.app.applicationLogic()
            applicationLogic.GetSelectionNode().SetActiveTableID(nodes["statistics"].GetID())
            applicationLogic.PropagateTableSelection()
        browser = slicer.modules.sequences.logic().GetFirstBrowserNodeForSequenceNode(sequenceNode) \
            if sequenceNode else None
        background = browser.GetProxyNode(sequenceNode) if browser is not None else None
        slicer.util.setSliceViewerLayers(background=background, foreground=mapNode, foregroundOpacity=0.7)
        slicer.modules.colors.logic().AddDefaultColorLegendDisplayNode(mapNode)
        self.showFitStatus(nodes.get("status"), showFitStatus)

    @staticmethod
    def showFitStatus(statusNode, show=True) -> None:
        """The fit status label map in the views' label layer (each voxel's status named in the data probe)."""
        if statusNode is not None:
            slicer.util.setSliceViewerLayers(label=statusNode if show else None, labelOpacity=0.5)

    @staticmethod
    def describeDevice(device="auto"):
        """Where the fit will run, in words, for the status line; refuses 'cuda' without a GPU."""
        from DCEPKFittingLib.core.device import describe_device

        return describe_device(device)

    @staticmethod
    def phantomFolder():
        return os.path.join(slicer.app.cachePath, "DCEPK", "phantom")

    @classmethod
    def phantomSampleUri(cls):
        """Where Sample Data finds the phantom's DCE series: a file URI in DCEPK's cache (nothing is downloaded)."""
        return pathlib.Path(cls.phantomFolder(), "dce.seq.nrrd").as_uri()

    @classmethod
    def writePhantomSample(cls, phantom=None):
        """The default phantom's files (those ``dcepk phantom`` writes) in DCEPK's cache; returns the series URI."""
        from DCEPKFittingLib.sims.phantom import make_phantom, write_phantom

        if not os.path.exists(os.path.join(cls.phantomFolder(), "dce.seq.nrrd")):
            # Regenerated whole when the series file is missing: the folder is DCEPK's own cache.
            write_phantom(phantom or make_phantom(vfa_flip_angles_deg=PHANTOM_VFA_FLIP_ANGLES_DEG), cls.phantomFolder(),
                          overwrite=True)
        return cls.phantomSampleUri()

    def loadPhantomSample(self, returnPhantom=False, shape=None):
        """Generate the synthetic DCE phantom, load it into the scene (and cache the default one's files).

        ``shape`` (k, j, i) makes a smaller phantom (the self-tests); it is not cached.
        """
        from DCEPKFittingLib import mrml as mrml_bridge
        from DCEPKFittingLib.sims.phantom import make_phantom

        options = dict(shape=tuple(shape)) if shape is not None else {}
        phantom = make_phantom(vfa_flip_angles_deg=PHANTOM_VFA_FLIP_ANGLES_DEG, **options)
        if shape is None:
            try:
                self.writePhantomSample(phantom)
            except Exception as error:  # noqa: BLE001  (the cache copy is a convenience; loading goes on)
                logging.warning(f"DCEPK phantom not cached in {self.phantomFolder()}: {error}")
        nodes = mrml_bridge.phantom_to_scene(self.scene, phantom, PHANTOM_SAMPLE_NAME,
                                             slicer.modules.sequences.logic())
        browser = slicer.modules.sequences.logic().GetFirstBrowserNodeForSequenceNode(nodes["sequence"])
        if browser is not None:
            slicer.util.setSliceViewerLayers(background=browser.GetProxyNode(nodes["sequence"]), fit=True)
        return (phantom, nodes) if returnPhantom else [nodes["sequence"]]


#
# Test
#
class DCEPKFittingTest(ScriptedLoadableModuleTest):
    """Whole workflow in Slicer on a small phantom, checked against its ground truth.

    Needs PyTorch (the PyTorch extension): where it is missing, as on the extension build server,
    the tests are skipped with a message rather than failed.
    """

    def setUp(self):
        missing = missingComputePackages()
        if missing:
            self.skipTest(f"DCEPK Fitting's self-test needs {', '.join(missing)}, which this Slicer's Python "
                          "lacks: install the PyTorch extension (and press Apply once in the module)")
        slicer.mrmlScene.Clear()

    def runTest(self):
        missing = missingComputePackages()
        if missing:
            self.delayDisplay(f"DCEPK Fitting self-test skipped: {', '.join(missing)} not installed")
            return
        self.setUp()
        self.test_PhantomWorkflow()
        self.setUp()
        self.test_CancelLeavesSceneUnchanged()
        self.setUp()
        self.test_FitInChildProcess()

    def test_PhantomWorkflow(self):
        import numpy as np

        self.delayDisplay("Generating the DCEPK phantom")
        logic = DCEPKFittingLogic()
        phantom, nodes = logic.loadPhantomSample(returnPhantom=True, shape=SELF_TEST_PHANTOM_SHAPE)
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

        from DCEPKFittingLib.core.errors import JobCancelledError

        logic = DCEPKFittingLogic()
        phantom, nodes = logic.loadPhantomSample(returnPhantom=True, shape=SELF_TEST_PHANTOM_SHAPE)
        count = slicer.mrmlScene.GetNumberOfNodes()
        cancel = threading.Event()
        cancel.set()
        with self.assertRaises(JobCancelledError):
            logic.run(nodes["sequence"], aifRoi=nodes["aifRoi"], t10_s=1.4, cancel=cancel)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), count)
        self.delayDisplay("Cancel test passed")

    def test_FitInChildProcess(self):
        """A fit in a separate process (PythonSlicer running dcepk fit) gives the maps of a fit in Slicer's."""
        import numpy as np

        logic = DCEPKFittingLogic()
        phantom, nodes = logic.loadPhantomSample(returnPhantom=True, shape=SELF_TEST_PHANTOM_SHAPE)
        options = dict(populationAif="parker", t10_s=1.4, model="patlak", method="linear", mask=nodes["tissues"],
                       device="cpu")
        logic.computeIn = "thread"
        inThread = logic.run(nodes["sequence"], outputPrefix="DCEPK thread", **options)
        self.delayDisplay("Fitting in a separate process")
        logic.computeIn = "child"
        inChild = logic.run(nodes["sequence"], outputPrefix="DCEPK child", **options)
        self.assertEqual(set(inChild), set(inThread))
        for name in set(inThread) - {"statistics"}:  # every map, to the last bit of float32 (the files' type)
            expected = slicer.util.arrayFromVolume(inThread[name])
            got = slicer.util.arrayFromVolume(inChild[name])
            self.assertTrue(np.array_equal(got, expected.astype(got.dtype), equal_nan=True), name)
        self.delayDisplay("Child process test passed")
