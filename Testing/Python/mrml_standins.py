"""Inert stand-ins for the CTK and qMRML widget classes, and a .ui loader that builds a module's panel.

See ``qt_standins`` (the Qt classes, their properties and signals). ``load_ui`` builds the widget
tree of a module's .ui file, each widget of the exact class the file names (the parameterNodeWrapper's
GUI connectors test ``type(widget)``), with its properties; ``make_modules`` gives the ``qt`` and
``ctk`` modules. Nothing is drawn.
"""

import types
import xml.etree.ElementTree as ET

from qt_standins import (QT_CLASSES, QAbstractButton, QAbstractSpinBox, QCheckBox, QComboBox, QPushButton,
                         QWidget, Signal)


class ctkCollapsibleButton(QAbstractButton):
    pass


class ctkCheckBox(QCheckBox):
    pass


class ctkCheckablePushButton(QPushButton):
    pass


class ctkSliderWidget(QAbstractSpinBox):
    pass


class ctkDoubleSlider(QAbstractSpinBox):
    pass


class ctkDoubleSpinBox(QAbstractSpinBox):
    pass


class ctkComboBox(QComboBox):
    pass


class ctkRangeWidget(QWidget):
    pass


class ctkDoubleRangeSlider(QWidget):
    pass


class ctkPathLineEdit(QWidget):
    pass


class ctkDirectoryButton(QWidget):
    pass


class ctkColorPickerButton(QWidget):
    pass


class qMRMLWidget(QWidget):
    pass


class qSlicerWidget(QWidget):
    pass


class qMRMLSliderWidget(QAbstractSpinBox):
    pass


class qMRMLSpinBox(QAbstractSpinBox):
    pass


class qMRMLRangeWidget(QWidget):
    pass


class qMRMLTableView(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.table = None

    def setMRMLTableNode(self, node):
        self.table = node


class qMRMLNodeComboBox(QWidget):
    """Node selector: the current node, cleared when the scene removes it (as the real one does)."""
    currentNodeChanged = Signal()
    currentNodeIDChanged = Signal()
    nodeAddedByUser = Signal()

    def __init__(self, parent=None):
        super().__init__(parent)
        self.nodeTypes = ()
        self.noneEnabled = self.addEnabled = self.removeEnabled = self.renameEnabled = False
        self.showChildNodeTypes = True
        self._scene = None
        self._observer = None
        self._node = None

    def mrmlScene(self):
        return self._scene

    def setMRMLScene(self, scene):
        if self._scene is not None and self._observer is not None:
            self._scene.RemoveObserver(self._observer)
        self._scene, self._observer = scene, None
        if scene is not None:
            self._observer = scene.AddObserver(scene.NodeRemovedEvent, self._onNodeRemoved)

    def _onNodeRemoved(self, scene, event):
        if self._node is not None and self._node.GetScene() is None:
            self.setCurrentNode(None)

    def currentNode(self):
        return self._node

    def currentNodeID(self):
        return self._node.GetID() if self._node is not None else ""

    def setCurrentNode(self, node):
        if node is not self._node:
            self._node = node
            self.emit("currentNodeChanged", node)
            self.emit("currentNodeIDChanged", self.currentNodeID())

    def addNodeByUser(self):
        """What the combo box's 'Create new ...' entry does: a new, empty node of the first type."""
        node = self._scene.AddNewNodeByClass(self.nodeTypes[0])
        self.setCurrentNode(node)
        self.emit("nodeAddedByUser", node)
        return node


class qMRMLSegmentSelectorWidget(qMRMLNodeComboBox):
    """Segmentation + segment picker, in the order of Slicer's qMRMLSegmentSelectorWidget: choosing a
    segmentation repopulates the segment list first, keeps the widget's remembered segment if the new
    segmentation has it (silently), else selects the first segment and emits ``currentSegmentChanged``;
    only then is ``currentNodeChanged`` emitted. A new widget remembers no segment."""
    currentSegmentChanged = Signal()

    def __init__(self, parent=None):
        super().__init__(parent)
        self._segment_id = ""

    def _segment_ids(self):
        segmentation = self._node.GetSegmentation() if self._node is not None else None
        return [segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())] \
            if segmentation is not None else []

    def setCurrentNode(self, node):
        if node is self._node:
            return
        self._node = node
        ids = self._segment_ids()
        if ids and self._segment_id not in ids:
            self._segment_id = ids[0]
            self.emit("currentSegmentChanged", self._segment_id)
        self.emit("currentNodeChanged", node)
        self.emit("currentNodeIDChanged", self.currentNodeID())

    def currentSegmentID(self):
        return self._segment_id if self._segment_id in self._segment_ids() else ""

    def setCurrentSegmentID(self, segment_id):
        if segment_id in self._segment_ids() and segment_id != self._segment_id:
            self._segment_id = segment_id
            self.emit("currentSegmentChanged", self._segment_id)


# ----------------------------------------------------------------------------- modules and the .ui loader
CTK_CLASSES = [ctkCollapsibleButton, ctkCheckBox, ctkCheckablePushButton, ctkSliderWidget, ctkDoubleSlider,
               ctkDoubleSpinBox, ctkComboBox, ctkRangeWidget, ctkDoubleRangeSlider, ctkPathLineEdit,
               ctkDirectoryButton, ctkColorPickerButton]
SLICER_WIDGET_CLASSES = [qMRMLWidget, qSlicerWidget, qMRMLSliderWidget, qMRMLSpinBox, qMRMLRangeWidget,
                         qMRMLTableView, qMRMLNodeComboBox, qMRMLSegmentSelectorWidget]


def make_modules():
    """(qt, ctk) stand-in modules."""
    qt = types.ModuleType("qt")
    for cls in QT_CLASSES:
        setattr(qt, cls.__name__, cls)
    ctk = types.ModuleType("ctk")
    for cls in CTK_CLASSES:
        setattr(ctk, cls.__name__, cls)
    return qt, ctk


_CLASSES = {cls.__name__: cls for cls in QT_CLASSES + CTK_CLASSES + SLICER_WIDGET_CLASSES}


def _value(element):
    if element.tag == "bool":
        return element.text == "true"
    if element.tag in ("double", "number"):
        return float(element.text) if element.tag == "double" else int(element.text)
    if element.tag == "stringlist":
        return tuple(s.text for s in element.findall("string"))
    if element.tag in ("string", "cstring", "enum", "set"):
        return element.text or ""
    return None


def load_ui(path):
    """The .ui file's widget tree as stand-ins: each widget of the class the file names, with its
    properties (dynamic ones such as SlicerParameterName as Qt properties). Raises KeyError for a class
    with no stand-in, so a widget kind the tests cannot see is noticed."""
    root = ET.parse(path).getroot().find("widget")

    def build(element, parent):
        widget = _CLASSES[element.get("class")](parent)
        widget.setObjectName(element.get("name"))
        for prop in element.findall("property"):
            value_element = prop.find("*")
            value = _value(value_element) if value_element is not None else None
            if value is None:
                continue
            if prop.get("stdset") == "0":
                widget.setProperty(prop.get("name"), value)
            elif prop.get("name") == "value":
                widget.value = value
            elif prop.get("name") == "checked":
                widget.checked = value
            elif prop.get("name") != "geometry":
                setattr(widget, prop.get("name"), value)
        for child in element.iter("widget"):
            if child is not element and _parent_widget(element, child):
                build(child, widget)
        return widget

    return build(root, None)


def _parent_widget(element, child):
    """True when ``child`` is a direct widget child of ``element`` (layouts and items in between)."""
    stack = list(element)
    while stack:
        node = stack.pop()
        if node is child:
            return True
        if node.tag != "widget":
            stack.extend(list(node))
    return False
