"""DCEPK Inference: pharmacokinetic maps with uncertainty from a DCE-MRI volume sequence by neural networks.

Qt shell only (see docs/ARCHITECTURE.md): the science is in ``DCEPKInferenceLib`` (pure core:
``inference.run_inference``) and ``DCEPKInferenceLib.mrml`` (scene <-> arrays). The Logic is
usable from the Python console:

    logic = slicer.util.getModuleLogic("DCEPKInference")
    nodes = logic.run(sequenceNode, modelName="hetero_encoder", uncertaintyThreshold=0.5)

Large runs go to a separate process (``dcepk infer``; ``logic.computeIn``, as in DCEPK Fitting).
"""

import logging
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

from DCEPKFittingLib.panels import panel_state
from DCEPKFittingLib.widgets.module_widget import CONTRIBUTORS, DCEPKBackgroundJobWidgetMixin, missingComputePackages

# No DCEPKInferenceLib import at load time: it needs torch and safetensors, which the widget checks
# (and, if the user agrees, installs) at the first Apply, so the module always loads.

DEFAULT_MODEL = "hetero_encoder"                  # AIF-free
DEFAULT_CONDITIONED_MODEL = "hetero_encoder_aif"   # AIF-conditioned (modes aif and image)
DEVICES = ["auto", "cpu", "cuda"]
THRESHOLD_MODES = ["none", "relative", "absolute"]
T10_MODES = ["fixed", "map"]
PARAMETERS = ["Ktrans", "ve", "vp", "kep"]
FIT_MODELS = ["etofts", "tofts", "patlak"]
POPULATION_AIFS = ["parker", "georgiou", "weinmann"]
MODES = ["aif", "image", "aif-free"]   # input function given / read from the image / none (AIF-free)
AIF_SOURCES = ["roi", "csv", "population", "auto"]
AUTO_AIF_KINDS = ["either", "artery", "vein"]


#
# Module
#
class DCEPKInference(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("DCEPK Inference")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Quantification")]
        self.parent.dependencies = ["DCEPKFitting"]
        self.parent.contributors = CONTRIBUTORS
        self.parent.helpText = _("""
Pharmacokinetic maps with per-voxel uncertainty from a dynamic contrast-enhanced (DCE) MRI signal series by
neural networks. <b>Input function</b>: in mode <i>aif</i> an AIF-conditioned network (e.g.
<i>hetero_encoder_aif</i>) is given the input function: an AIF ROI (a box, a label map or a segmentation on
an artery or vein; <i>ROI label</i> picks one label or segment), a CSV file, a population AIF, or automatic
detection; in mode <i>image</i> the input function is found in the image: detected automatically, and where no
usable vessel is found, read by the reader network (aif_reader), whose most-attended voxels and curve are then
shown as the segmentation and chart 'DCEPK AIF (read by network)';
<i>Detect the input function</i> shows the detected curve in a chart and makes its voxels an editable
segmentation ('artery', 'vein') chosen as the AIF ROI.
Mode <i>aif-free</i> runs the earlier networks that see no input function (Ktrans only up to its amplitude).<br>
<b>Networks</b> (trained by DCEPK on physics-based synthetic data; the model card of each is shown in the panel):
<i>hetero_encoder</i>, a voxel-wise temporal encoder with a heteroscedastic (Laplace/Gaussian NLL) output and a
small ensemble (<i>hetero_encoder_fast</i>: one smaller member, about twice as fast, slightly less accurate);
<i>ulas_cnn</i>, a 2D CNN with local and dilated global pathways and a tracer-kinetic loss;
<i>fcsa_net</i>, a frame/channel/spatial attention CNN; <i>tcn_punet</i>, a temporal convolutional network
followed by a probabilistic U-Net. Only the networks whose weights ship with this version are listed.<br>
<b>Steps</b>: choose the DCE volume sequence, optionally a mask (segmentation or label map; default: voxels with
signal), the network and the device, give T10 (one value in seconds, or a T1 map), and press Apply. The networks
convert the signal to concentration with flip angle (degrees), TR (milliseconds), T10 and the agent's r1, as the
conventional fit does; flip angle and TR come from the series header unless <i>Flip angle</i> / <i>TR</i> is ticked
(a series without them needs the box ticked: Apply says so). Inference runs
in the background and can be cancelled; the scene only changes when it has finished. A series whose frame count
or frame interval lies outside a network's training ranges (in its model card) is named in the messages, and the
network's uncertainty is then recalibrated for those frame times on simulated data (seconds to half a minute).<br>
<b>Outputs and units</b> (OSIPI lexicon): Ktrans and kep in 1/min, ve and vp as fractions; &lt;name&gt;_sd is
the network's uncertainty as one standard deviation in the same unit. kep = Ktrans/ve. The uncertainty
threshold hides (sets to NaN) voxels whose SD exceeds a fraction of the value (relative) or a limit per map
(absolute). <i>Show map with uncertainty</i> puts a map and its SD side by side. The statistics table gives,
per segment and map, count, mean, SD, median, IQR, 5th and 95th percentiles, the mean uncertainty and the
fraction of voxels excluded by the threshold. <i>Compare with conventional fit</i> also fits a tracer-kinetic
model with a population AIF (DCEPK Fitting) on the same voxels (fit_&lt;name&gt; maps).
""")
        self.parent.helpText += self.getDefaultModuleDocumentationLink()
        self.parent.acknowledgementText = _("""
DCEPK is an open-source project. The network architectures follow published DCE-MRI deep-learning methods
(local/global-pathway CNN with a tracer-kinetic loss; attention CNN; temporal convolutional network with a
probabilistic U-Net; heteroscedastic voxel-wise encoder); their weights were trained by DCEPK on simulated
data from the extended Tofts model with population AIFs (Parker, Georgiou, Weinmann).
""")


#
# Parameter node
#
@parameterNodeWrapper
class DCEPKInferenceParameterNode:
    """GUI state, saved with the scene. Units in the names: Deg, Ms (milliseconds); T10 and limits as noted."""

    inputSequence: vtkMRMLSequenceNode
    # A node union whose default is None must list None: the wrapper writes every default at creation.
    inferenceMask: Optional[Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode]]
    mode: Annotated[str, Choice(MODES)] = "aif"
    aifSource: Annotated[str, Choice(AIF_SOURCES)] = "auto"
    aifRoi: Optional[Union[vtkMRMLMarkupsROINode, vtkMRMLLabelMapVolumeNode, vtkMRMLSegmentationNode]]
    aifRoiLabel: Annotated[int, WithinRange(0, 255)] = 0  # label value / segment number; 0: all
    aifCsvPath: str = ""
    autoAifKind: Annotated[str, Choice(AUTO_AIF_KINDS)] = "either"
    bloodT10: Annotated[float, WithinRange(0.0, 5.0)] = 0.0  # s; 0: the T10 given (automatic detection: 1.6 s)
    modelName: str = DEFAULT_MODEL
    useFlipAngle: bool = False
    flipAngleDeg: Annotated[float, WithinRange(0.1, 90.0)] = 15.0
    useRepetitionTime: bool = False
    repetitionTimeMs: Annotated[float, WithinRange(0.1, 100.0)] = 5.0
    t10Mode: Annotated[str, Choice(T10_MODES)] = "fixed"
    t10Value: Annotated[float, WithinRange(0.05, 10.0)] = 1.4  # s
    t10Map: vtkMRMLScalarVolumeNode
    t10MapUnit: Annotated[str, Choice(["ms", "s"])] = "ms"
    device: Annotated[str, Choice(DEVICES)] = "auto"
    thresholdMode: Annotated[str, Choice(THRESHOLD_MODES)] = "none"
    relativeThreshold: Annotated[float, WithinRange(0.01, 10.0)] = 0.5  # SD / |value|
    ktransSdLimit: Annotated[float, WithinRange(0.0, 5.0)] = 0.05  # 1/min; 0: not thresholded
    veSdLimit: Annotated[float, WithinRange(0.0, 1.0)] = 0.1  # fraction
    vpSdLimit: Annotated[float, WithinRange(0.0, 1.0)] = 0.05  # fraction
    kepSdLimit: Annotated[float, WithinRange(0.0, 20.0)] = 0.0  # 1/min
    compareWithFit: bool = False
    fitModel: Annotated[str, Choice(FIT_MODELS)] = "etofts"
    populationAif: Annotated[str, Choice(POPULATION_AIFS)] = "parker"
    hematocrit: Annotated[float, WithinRange(0.0, 0.99)] = 0.45
    statisticsSegmentation: vtkMRMLSegmentationNode
    displayMap: Annotated[str, Choice(PARAMETERS)] = "Ktrans"
    outputPrefix: str = "DCEPK-NN"
    updateExisting: bool = True


#
# Widget
#
class DCEPKInferenceWidget(DCEPKBackgroundJobWidgetMixin, ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Wires the GUI to the Logic; holds no science."""

    LIB_PACKAGES = ("DCEPKFittingLib", "DCEPKInferenceLib")  # reloaded by Reload (onReload), in this order

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._cards = {}
        self._listedModels = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DCEPKInference.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = DCEPKInferenceLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.applyThresholdButton.connect("clicked(bool)", self.onApplyThreshold)
        self.ui.showUncertaintyButton.connect("clicked(bool)", self.onShowUncertainty)
        self.ui.exportTableButton.connect("clicked(bool)", self.onExportTable)
        self.ui.checkDeviceButton.connect("clicked(bool)", self.onCheckDevice)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.detectAifButton.connect("clicked(bool)", self.onDetectAif)

        self.setupBackgroundJob()

        self.populateModels()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.stopBackgroundJob()
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
        self.logic.forgetLastResult()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        p = self._parameterNode
        if self._cards and not self._modeModels(p.mode):   # no network of this mode shipped: one that is
            p.mode = "aif" if panel_state.models_for_mode(self._cards.values(), "aif") else "aif-free"
        if not self._parameterNode.inputSequence:
            firstSequence = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSequenceNode")
            if firstSequence:
                self._parameterNode.inputSequence = firstSequence

    def setParameterNode(self, inputParameterNode: Optional[DCEPKInferenceParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGuiState)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGuiState)
        self._updateGuiState()

    def _modeModels(self, mode):
        return panel_state.models_for_mode(self._cards.values(), mode)

    def _updateGuiState(self, caller=None, event=None) -> None:
        p = self._parameterNode
        modelNames = self._modeModels(p.mode) if p else list(self._cards)
        self._listModels(modelNames)
        if p and modelNames and p.modelName not in modelNames:   # another mode: its default network, else its first
            default = DEFAULT_MODEL if p.mode == "aif-free" else DEFAULT_CONDITIONED_MODEL
            p.modelName = default if default in modelNames else modelNames[0]   # (this observer runs again)
            return
        self.mirrorPanelView(self.logic.panelState(p, modelNames, running=self._job is not None))
        if p and p.modelName in modelNames and self.ui.modelComboBox.currentText != p.modelName:
            wasBlocked = self.ui.modelComboBox.blockSignals(True)
            self.ui.modelComboBox.setCurrentText(p.modelName)
            self.ui.modelComboBox.blockSignals(wasBlocked)
            self._showModelCard(p.modelName)

    # ---------------------------------------------------------------- networks and device
    def populateModels(self) -> None:
        """The shipped networks (read from their model cards, without torch) in the model picker."""
        try:
            cards = self.logic.modelCards()
        except Exception as error:  # noqa: BLE001  (a missing package must not stop the panel from loading)
            cards = []
            self.ui.modelCardBrowser.setPlainText(
                _("The network list could not be read ({error}). Press Apply to install what is missing.").format(
                    error=error))
        self._cards = {card["name"]: card for card in cards}
        self._listModels(list(self._cards))

    def _listModels(self, names) -> None:
        """The model picker lists ``names`` (the networks of the panel's mode)."""
        combo = self.ui.modelComboBox
        if self._listedModels == list(names):
            return
        self._listedModels = list(names)
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        for name in names:
            combo.addItem(name)
        combo.blockSignals(wasBlocked)
        if names:
            self._showModelCard(combo.currentText)
        elif not self.ui.modelCardBrowser.toPlainText():
            self.ui.modelCardBrowser.setPlainText(_("No network weights are installed with this extension."))

    def onModelChanged(self, index) -> None:
        name = self.ui.modelComboBox.currentText
        if self._parameterNode is not None and name:
            self._parameterNode.modelName = name
        self._showModelCard(name)

    def _showModelCard(self, name) -> None:
        card = self._cards.get(name)
        if card is not None:
            self.ui.modelCardBrowser.setHtml(self.logic.describeModelCard(card))

    def onDetectAif(self) -> None:
        """Detect the input function now: its voxels become the editable AIF ROI (a segmentation), its
        curve is shown in a chart."""
        if not self.ensureDependencies("DCEPK Inference"):
            return
        p = self._parameterNode

        def detect():
            segmentation, chart, segment = self.logic.detectInputFunction(
                p.inputSequence, **self.logic.detectionOptionsFromParameterNode(p))
            slicer.modules.plots.logic().ShowChartInLayout(chart)
            p.aifRoi, p.aifRoiLabel = segmentation, segment
            if p.mode == "aif":
                p.aifSource = "roi"   # the detected voxels, as the user may now edit them
            self.ui.statusLabel.text = _("Input function detected: {name} (edit it in Segment Editor).").format(
                name=segmentation.GetName())

        self.runShowingErrors(_("The input function could not be detected."), detect)

    def onCheckDevice(self) -> None:
        if not self.ensureDependencies("DCEPK Inference"):
            return

        def describe():
            self.ui.statusLabel.text = _("Would run on: {device}").format(
                device=self.logic.describeDevice(self._parameterNode.device))

        self.runShowingErrors(_("Device check failed."), describe)

    # ---------------------------------------------------------------- apply / cancel
    def onApplyButton(self) -> None:
        if self._job is not None:
            return
        if not self.ensureDependencies("DCEPK Inference"):
            self._updateGuiState()
            return

        def start():
            options = self.logic.optionsFromParameterNode(self._parameterNode)
            deviceText = self.logic.describeDevice(options["device"])
            request = self.logic.prepare(self._parameterNode.inputSequence, **options)
            self.startBackgroundJob(request, _("Running {model} on {device}...").format(
                model=options["modelName"], device=deviceText))

        if not self.runShowingErrors(_("The inference could not start."), start):
            self.ui.statusLabel.text = _("The inference could not start: nothing was run (see the error message).")
        self._updateGuiState()  # the buttons reflect whether a job runs, whatever happened

    def publishJobResult(self, request, result) -> None:
        nodes = self.logic.publish(request, result)
        self.showResults(nodes)
        if "input_function_chart" in nodes:   # detected during the run: its curve (its voxels: a segmentation)
            slicer.modules.plots.logic().ShowChartInLayout(nodes["input_function_chart"])
        self.ui.statusLabel.text = _("Done on {device}: {n} maps. {messages}").format(
            device=result.inference.device, n=len([k for k in nodes if k in result.maps]),
            messages=" ".join(result.messages))

    # ---------------------------------------------------------------- results
    def showResults(self, nodes) -> None:
        self.onShowUncertainty()
        table = nodes.get("statistics")
        self.ui.statisticsTableView.setMRMLTableNode(table)
        slicer.modules.colors.logic().AddDefaultColorLegendDisplayNode(nodes[self._parameterNode.displayMap])

    def onShowUncertainty(self) -> None:
        def show():
            self.logic.showMapWithUncertainty(self._parameterNode.displayMap, self._backgroundNode())
            slicer.util.resetSliceViews()

        self.runShowingErrors(_("The map and its uncertainty could not be shown."), show)

    def _backgroundNode(self):
        sequence = self._parameterNode.inputSequence if self._parameterNode else None
        browser = slicer.modules.sequences.logic().GetFirstBrowserNodeForSequenceNode(sequence) if sequence else None
        return browser.GetProxyNode(sequence) if browser is not None else None

    def onApplyThreshold(self) -> None:
        """New uncertainty threshold on the last result, without running the network again."""
        def apply():
            nodes = self.logic.applyUncertaintyThreshold(
                self.logic.uncertaintyThresholdFromParameterNode(self._parameterNode))
            self.ui.statisticsTableView.setMRMLTableNode(nodes.get("statistics"))
            self.ui.statusLabel.text = " ".join(self.logic.lastResult.messages) or _("Threshold removed.")

        self.runShowingErrors(_("The threshold could not be applied."), apply)

    def onExportTable(self) -> None:
        self.exportStatisticsTable(self.logic.lastNodes.get("statistics"))


#
# Logic
#
class DCEPKInferenceLogic(ScriptedLoadableModuleLogic):
    """Network inference from the scene, without any GUI (no Qt here): usable from the Python console.

    ``run`` is synchronous. It is three steps, which the widget calls one by one: ``prepare`` (reads
    nodes, main thread) -> ``startCompute`` (``run_inference`` and optionally ``pipeline.run_fit``,
    thresholding, statistics, in the background; returns the job) -> ``publish`` (writes nodes, main
    thread). Nothing is written before the compute succeeded, so a cancel, an error or a crashed child
    process leaves the scene as it was. ``lastResult`` keeps the raw outputs so a new uncertainty
    threshold needs no new run. ``computeIn``, ``pythonExecutable``, ``childTemporaryFolder``: where the
    compute runs, as in ``DCEPKFittingLogic`` (a ``dcepk infer`` child process for a large run).
    """

    def __init__(self, scene=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._scene = scene
        self.lastRequest = None
        self.lastResult = None
        self.lastNodes = {}
        self.computeIn = "auto"
        self.pythonExecutable = None
        self.childTemporaryFolder = None

    @property
    def scene(self):
        return self._scene if self._scene is not None else slicer.mrmlScene

    def getParameterNode(self):
        return DCEPKInferenceParameterNode(super().getParameterNode())

    def run(self, sequenceNode, modelName=DEFAULT_MODEL, maskNode=None, device="auto", flipAngle_deg=None,
            tr_s=None, t10_s=None, t10Map=None, t10MapUnit="ms", uncertaintyThreshold=None, compareWithFit=False,
            fitModel="etofts", populationAif="parker", hematocrit=0.45, r1_per_mM_s=None, segmentationNode=None,
            outputPrefix="DCEPK-NN", updateExisting=True, aifSource=None, aifRoi=None, aifRoiLabel=0, aifCsv="",
            autoAif="either", bloodT10_s=None, progress=None, cancel=None):
        """Run network ``modelName`` on ``sequenceNode`` and put the maps in the scene; returns ``{name: node}``.

        Maps Ktrans, kep (1/min), ve, vp (fractions) and their 1-SD uncertainty ``<name>_sd`` (same
        units), ``fit_<name>`` with ``compareWithFit``, and ``statistics`` (table node) when
        ``segmentationNode`` (or a segmentation ``maskNode``) is given. ``maskNode``: segmentation,
        label map, markups ROI or bool array (None: voxels with signal). ``flipAngle_deg``, ``tr_s``,
        ``t10_s`` (seconds) or ``t10Map`` (voxels in ``t10MapUnit``, 'ms' or 's'; one is required) and
        ``r1_per_mM_s`` (1/(mM s); None: the core's default) convert the signal to concentration (FA and TR
        default to the series' header). ``uncertaintyThreshold``: None, a number r
        (voxels with SD > r*|value| become NaN) or ``{'Ktrans': SD limit in 1/min, 've': ..., ...}``.
        An AIF-conditioned network (``modelName`` ``hetero_encoder_aif`` ...) needs ``aifSource``: 'roi'
        (``aifRoi``: markups ROI, label map or segmentation on an artery or vein; ``aifRoiLabel`` > 0: only
        that label value or segment number), 'csv' (``aifCsv``: time s, concentration mM), 'population'
        (``populationAif``), 'auto' (detected; ``autoAif`` 'either', 'artery' or 'vein': the voxels come
        back as the 'input_function' segmentation and chart) or 'image' (image-only mode: read by the reader
        network, its most-attended voxels and curve come back the same way); ``hematocrit``, ``bloodT10_s`` (vessel T10 in s;
        None: the T10 given, automatic: 1.6 s). AIF-free networks take no ``aifSource``.
        The comparison fit uses ``fitModel`` with the same input function (AIF-free: ``populationAif``) and
        the same T10. ``progress(fraction, message)`` and ``cancel`` (``threading.Event``) are optional.
        """
        request = self.prepare(
            sequenceNode, modelName=modelName, maskNode=maskNode, device=device, flipAngle_deg=flipAngle_deg,
            tr_s=tr_s, t10_s=t10_s, t10Map=t10Map, t10MapUnit=t10MapUnit, uncertaintyThreshold=uncertaintyThreshold,
            compareWithFit=compareWithFit, fitModel=fitModel, populationAif=populationAif, hematocrit=hematocrit,
            r1_per_mM_s=r1_per_mM_s, segmentationNode=segmentationNode, outputPrefix=outputPrefix,
            updateExisting=updateExisting, aifSource=aifSource, aifRoi=aifRoi, aifRoiLabel=aifRoiLabel, aifCsv=aifCsv,
            autoAif=autoAif, bloodT10_s=bloodT10_s)
        from DCEPKFittingLib.core.child_process import wait_for_job
        from DCEPKInferenceLib import mrml as mrml_bridge

        if mrml_bridge.scene_inference_place(request, self.computeIn) == "thread":
            result = self.compute(request, progress=progress, cancel=cancel)  # on this thread, as before
        else:
            result = wait_for_job(self.startCompute(request), progress=progress, cancel=cancel)
        return self.publish(request, result)

    def prepare(self, sequenceNode, modelName=DEFAULT_MODEL, maskNode=None, device="auto", flipAngle_deg=None,
                tr_s=None, t10_s=None, t10Map=None, t10MapUnit="ms", uncertaintyThreshold=None, compareWithFit=False,
                fitModel="etofts", populationAif="parker", hematocrit=0.45, r1_per_mM_s=None, segmentationNode=None,
                outputPrefix="DCEPK-NN", updateExisting=True, aifSource=None, aifRoi=None, aifRoiLabel=0, aifCsv="",
                autoAif="either", bloodT10_s=None):
        """Read the inputs from the scene (main thread); raises ``DCEPKInputError`` naming any problem."""
        from DCEPKInferenceLib import mrml as mrml_bridge

        return mrml_bridge.prepare_scene_inference(
            sequenceNode, model_name=modelName, mask=maskNode, device=device, fa_deg=flipAngle_deg, tr_s=tr_s,
            t10_s=t10_s, t10_map=t10Map, t10_map_unit=t10MapUnit, uncertainty_threshold=uncertaintyThreshold,
            compare_with_fit=compareWithFit, fit_model=fitModel, population_aif=populationAif, hct=hematocrit,
            r1_per_mM_s=r1_per_mM_s, statistics_segmentation=segmentationNode, output_prefix=outputPrefix,
            update_existing=updateExisting, aif_source=aifSource, aif_roi=aifRoi, aif_roi_label=aifRoiLabel,
            aif_csv=aifCsv, auto_aif=autoAif, blood_t10_s=bloodT10_s)

    @staticmethod
    def compute(request, progress=None, cancel=None):
        """The inference itself in this thread: touches no node, so it may run in a worker thread."""
        from DCEPKInferenceLib import mrml as mrml_bridge

        return mrml_bridge.compute_scene_inference(request, progress=progress, cancel=cancel)

    def startCompute(self, request):
        """Start a prepared inference where ``computeIn`` says; returns the running job (see ``run``)."""
        from DCEPKInferenceLib import mrml as mrml_bridge

        return mrml_bridge.start_scene_inference(request, self.computeIn, compute=self.compute,
                                                 python=self.pythonExecutable, temp_parent=self.childTemporaryFolder)

    def publish(self, request, result, existingNodes=None):
        """Write maps, uncertainty maps and statistics into the scene (main thread); returns ``{name: node}``."""
        from DCEPKInferenceLib import mrml as mrml_bridge

        nodes = mrml_bridge.publish_scene_inference(self.scene, request, result, existing_nodes=existingNodes)
        self.lastRequest, self.lastResult, self.lastNodes = request, result, nodes
        return nodes

    def forgetLastResult(self) -> None:
        self.lastRequest, self.lastResult, self.lastNodes = None, None, {}

    def applyUncertaintyThreshold(self, uncertaintyThreshold):
        """Re-threshold the last result into the same nodes (no new inference); returns ``{name: node}``."""
        from DCEPKFittingLib.core.errors import DCEPKInputError
        from DCEPKInferenceLib import mrml as mrml_bridge

        if self.lastResult is None:
            raise DCEPKInputError("no inference result to threshold: press Apply (or call run) first")
        request, result = mrml_bridge.rethreshold(self.lastRequest, self.lastResult, uncertaintyThreshold)
        return self.publish(request, result, existingNodes=self.lastNodes)

    def showMapWithUncertainty(self, mapName="Ktrans", backgroundNode=None) -> None:
        """``mapName`` (Ktrans, ve, vp, kep) and its uncertainty side by side in the Red and Yellow views."""
        from DCEPKInferenceLib import mrml as mrml_bridge

        mrml_bridge.show_map_with_uncertainty(self.scene, self.lastNodes.get(mapName),
                                              self.lastNodes.get(f"{mapName}_sd"), backgroundNode)

    @staticmethod
    def uncertaintyThresholdFromParameterNode(p):
        if p.thresholdMode == "relative":
            return p.relativeThreshold
        if p.thresholdMode == "absolute":
            limits = {"Ktrans": p.ktransSdLimit, "ve": p.veSdLimit, "vp": p.vpSdLimit, "kep": p.kepSdLimit}
            return {name: limit for name, limit in limits.items() if limit > 0} or None
        return None

    def panelState(self, p, modelNames, running=False):
        """What the panel shows and allows for parameter node ``p`` (``panel_state.PanelView``)."""
        from DCEPKFittingLib import mrml as mrml_bridge

        header = mrml_bridge.series_header(p.inputSequence) if p is not None else panel_state.SeriesHeader()
        return panel_state.inference_panel(p, header, modelNames, running, has_result=self.lastResult is not None,
                                           has_statistics="statistics" in self.lastNodes)

    @classmethod
    def optionsFromParameterNode(cls, p):
        """Keyword arguments of ``run``/``prepare`` from the GUI state (ms converted to s here).

        Flip angle and TR are passed only when ticked; otherwise the series header's values are used.
        """
        fixed = p.t10Mode == "fixed"
        flipAngle_deg, tr_s = panel_state.typed_acquisition(p)[:2]
        return dict(
            modelName=p.modelName, maskNode=p.inferenceMask, device=p.device, flipAngle_deg=flipAngle_deg, tr_s=tr_s,
            t10_s=p.t10Value if fixed else None, t10Map=None if fixed else p.t10Map, t10MapUnit=p.t10MapUnit,
            uncertaintyThreshold=cls.uncertaintyThresholdFromParameterNode(p),
            compareWithFit=p.compareWithFit, fitModel=p.fitModel, populationAif=p.populationAif,
            hematocrit=p.hematocrit, segmentationNode=p.statisticsSegmentation, outputPrefix=p.outputPrefix,
            updateExisting=p.updateExisting, aifSource=panel_state.inference_source(p), aifRoi=p.aifRoi,
            aifRoiLabel=p.aifRoiLabel, aifCsv=p.aifCsvPath, autoAif=p.autoAifKind if p.mode == "aif" else "either",
            bloodT10_s=p.bloodT10 or None)

    @classmethod
    def detectionOptionsFromParameterNode(cls, p):
        """Keyword arguments of ``detectInputFunction`` from the GUI state."""
        options = cls.optionsFromParameterNode(p)
        return {name: options[name] for name in ("flipAngle_deg", "tr_s", "t10_s", "t10Map", "t10MapUnit",
                                                 "autoAif", "bloodT10_s")}

    def detectInputFunction(self, sequenceNode, flipAngle_deg=None, tr_s=None, t10_s=None, t10Map=None,
                            t10MapUnit="ms", autoAif="either", bloodT10_s=None, r1_per_mM_s=None):
        """Detect the input function of ``sequenceNode`` (as ``dcepk infer --auto-aif``); returns
        ``(segmentation, chart, segment)``: the voxels found (segments 'artery', 'vein'; an earlier
        detection's segmentation is replaced), the blood curve in a plot chart, and the number of the
        segment whose curve is the input function (``aifRoiLabel`` to use it, edited or not, as the ROI)."""
        from DCEPKFittingLib import mrml as mrml_bridge

        return mrml_bridge.detect_scene_input_function(
            self.scene, sequenceNode, fa_deg=flipAngle_deg, tr_s=tr_s, t10_s=t10_s, t10_map=t10Map,
            t10_map_unit=t10MapUnit, kind=autoAif, blood_t10_s=bloodT10_s, r1_per_mM_s=r1_per_mM_s)

    @staticmethod
    def describeDevice(device="auto"):
        """Where the network will run, with free GPU memory, or why it falls back to the CPU."""
        from DCEPKFittingLib.core.device import describe_device

        return describe_device(device)

    @staticmethod
    def modelCards():
        from DCEPKInferenceLib import mrml as mrml_bridge

        return mrml_bridge.model_cards()

    @staticmethod
    def describeModelCard(card):
        from DCEPKInferenceLib import mrml as mrml_bridge

        return mrml_bridge.describe_model_card(card)


#
# Test
#
class DCEPKInferenceTest(ScriptedLoadableModuleTest):
    """Whole workflow in Slicer on a small phantom, checked against its ground truth.

    Needs PyTorch and safetensors: where they are missing, as on the extension build server, the
    tests are skipped with a message rather than failed.
    """

    def setUp(self):
        missing = missingComputePackages(("torch", "safetensors"))
        if missing:
            self.skipTest(f"DCEPK Inference's self-test needs {', '.join(missing)}, which this Slicer's Python "
                          "lacks: install the PyTorch extension (and press Apply once in the module)")
        slicer.mrmlScene.Clear()

    def runTest(self):
        missing = missingComputePackages(("torch", "safetensors"))
        if missing:
            self.delayDisplay(f"DCEPK Inference self-test skipped: {', '.join(missing)} not installed")
            return
        self.setUp()
        self.test_PhantomWorkflow()
        self.setUp()
        self.test_CancelAndErrorLeaveSceneUnchanged()

    def _loadPhantom(self):
        from DCEPKFitting import SELF_TEST_PHANTOM_SHAPE, DCEPKFittingLogic

        return DCEPKFittingLogic().loadPhantomSample(returnPhantom=True, shape=SELF_TEST_PHANTOM_SHAPE)

    def test_PhantomWorkflow(self):
        import numpy as np

        from DCEPKFittingLib import mrml as fitBridge
        from DCEPKInferenceLib.pipeline.inference import run_inference

        self.delayDisplay("Generating the DCEPK phantom")
        phantom, nodes = self._loadPhantom()
        logic = DCEPKInferenceLogic()
        self.delayDisplay(f"Running {DEFAULT_MODEL}")
        t10Node = self.addPhantomT10Map(slicer.mrmlScene, phantom)
        outputs = logic.run(nodes["sequence"], modelName=DEFAULT_MODEL, maskNode=nodes["tissues"],
                            segmentationNode=nodes["tissues"], device="auto", t10Map=t10Node, t10MapUnit="s")
        for name in PARAMETERS + [f"{p}_sd" for p in PARAMETERS] + ["statistics"]:
            self.assertIn(name, outputs)

        # The same numbers as the core on the same arrays, on the source grid.
        series = fitBridge.series_from_sequence(nodes["sequence"])
        direct = run_inference(series, DEFAULT_MODEL, mask=phantom.labels > 0, device="cpu",
                               t10_s=fitBridge.volume_array(t10Node).astype(np.float32))
        for name in ("Ktrans", "ve", "Ktrans_sd"):
            np.testing.assert_allclose(slicer.util.arrayFromVolume(outputs[name]), direct.maps[name],
                                       rtol=2e-3, atol=2e-4, err_msg=name)  # GPU (TF32 convolutions) vs CPU
        ijkToRas = vtk.vtkMatrix4x4()
        outputs["Ktrans"].GetIJKToRASMatrix(ijkToRas)
        np.testing.assert_allclose(slicer.util.arrayFromVTKMatrix(ijkToRas), phantom.series.geometry.ijk_to_ras(),
                                   atol=1e-6)

        # Against the phantom's ground truth (limits in phantomChecks).
        maps = {name: slicer.util.arrayFromVolume(outputs[name]).copy() for name in outputs if name != "statistics"}
        for description, passed in self.phantomChecks(phantom, maps):
            self.assertTrue(passed, description)
        rim = phantom.labels == next(v for v, n in phantom.label_names.items() if "rim" in n)

        # Statistics table: one row per segment and map, means as numpy computes them.
        rows = fitBridge.table_rows(outputs["statistics"])
        segments = nodes["tissues"].GetSegmentation().GetNumberOfSegments()
        self.assertEqual(len(rows), segments * len(PARAMETERS))
        rimRow = next(r for r in rows if "rim" in r["segment"] and r["map"] == "Ktrans")
        self.assertAlmostEqual(rimRow["mean"], float(np.mean(maps["Ktrans"][rim])), places=5)
        self.assertAlmostEqual(rimRow["mean_uncertainty"], float(np.mean(maps["Ktrans_sd"][rim])), places=5)

        self.delayDisplay("Uncertainty threshold on the same result, same nodes")
        count = slicer.mrmlScene.GetNumberOfNodes()
        thresholded = logic.applyUncertaintyThreshold(0.5)
        self.assertIs(thresholded["Ktrans"], outputs["Ktrans"])
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), count)
        inside = phantom.labels > 0
        expected = inside & (maps["Ktrans_sd"] > 0.5 * np.abs(maps["Ktrans"]))
        np.testing.assert_array_equal(np.isnan(slicer.util.arrayFromVolume(thresholded["Ktrans"])), expected)

        self.delayDisplay("Map and uncertainty side by side")
        logic.showMapWithUncertainty("Ktrans")
        layoutManager = slicer.app.layoutManager()
        if layoutManager is not None:
            red = layoutManager.sliceWidget("Red").mrmlSliceCompositeNode()
            yellow = layoutManager.sliceWidget("Yellow").mrmlSliceCompositeNode()
            self.assertEqual(red.GetForegroundVolumeID(), outputs["Ktrans"].GetID())
            self.assertEqual(yellow.GetForegroundVolumeID(), outputs["Ktrans_sd"].GetID())
        self.delayDisplay("Phantom workflow passed")

    @staticmethod
    def addPhantomT10Map(scene, phantom):
        """The phantom's T10 map (s) as a volume node, as a user's T1 map would be."""
        from DCEPKFittingLib import mrml as fitBridge

        return fitBridge.update_volume_from_array(scene, phantom.truth["T10"], phantom.series.geometry,
                                                  "DCEPK phantom T10", units="s", map_name="T10")

    # Relative error allowed on a tissue's median, against the phantom's truth. ve is weakly identified by
    # an AIF-free network (the shipped hetero_encoder reads the rim 41 % high); its vp is good in normal
    # brain (10-12 %) but 79 % high in the rim, so vp is checked in white and grey matter.
    PHANTOM_MEDIAN_LIMITS = (("Ktrans", "enhancing tumour rim", 0.30), ("ve", "enhancing tumour rim", 0.50),
                             ("vp", "white matter", 0.30), ("vp", "grey matter", 0.30))

    @staticmethod
    def phantomChecks(phantom, maps):
        """[(description, passed)] of the ground-truth checks of a network's maps on the phantom: tissue
        medians within ``PHANTOM_MEDIAN_LIMITS`` of the truth's, the tumour rim's Ktrans well above white
        matter's, and the SD covering the error. An all-zero or a constant map fails them. The headless
        tests run these same checks on the same phantom."""
        import numpy as np

        tissue = {n: phantom.labels == v for v, n in phantom.label_names.items()}
        rim, whiteMatter = tissue["enhancing tumour rim"], tissue["white matter"]
        checks = [(f"tumour rim has {int(rim.sum())} voxels (> 20)", int(rim.sum()) > 20)]
        for name, where, limit in DCEPKInferenceTest.PHANTOM_MEDIAN_LIMITS:
            estimate = float(np.median(maps[name][tissue[where]]))
            truth = float(np.median(phantom.truth[name][tissue[where]]))
            error = abs(estimate - truth) / truth
            checks.append((f"{where} median {name} {estimate:.4f} within {limit:.0%} of the truth {truth:.4f} "
                           f"({error:.0%})", error <= limit))
        rimKtrans, whiteKtrans = float(np.median(maps["Ktrans"][rim])), float(np.median(maps["Ktrans"][whiteMatter]))
        checks.append((f"tumour rim Ktrans {rimKtrans:.4f} > 5 x white matter {whiteKtrans:.4f} + 0.01 1/min",
                       rimKtrans > 5 * whiteKtrans + 0.01))
        covered = float(np.mean(np.abs(maps["Ktrans"][rim] - phantom.truth["Ktrans"][rim]) <= 2 * maps["Ktrans_sd"][rim]))
        checks.append((f"{covered:.0%} of rim voxels within 2 SD of the true Ktrans (> 70 %)", covered > 0.7))
        return checks

    def test_CancelAndErrorLeaveSceneUnchanged(self):
        import threading

        from DCEPKFittingLib.core.errors import DCEPKInputError, JobCancelledError

        phantom, nodes = self._loadPhantom()
        logic = DCEPKInferenceLogic()
        count = slicer.mrmlScene.GetNumberOfNodes()
        cancel = threading.Event()
        cancel.set()
        with self.assertRaises(JobCancelledError):
            logic.run(nodes["sequence"], maskNode=nodes["tissues"], t10_s=1.2, cancel=cancel)
        with self.assertRaises(DCEPKInputError):
            logic.run(nodes["sequence"], modelName="no_such_network")
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), count)
        logging.info("DCEPKInference cancel/error test passed")
        self.delayDisplay("Cancel and error test passed")
