"""Inert stand-ins for the Qt, CTK and qMRML widget classes, and a .ui loader that builds them.

No Qt exists on these machines, but Slicer's ``parameterNodeWrapper`` decides which GUI connector
binds a parameter by the *exact class* of the widget (``type(widget) in (qt.QDoubleSpinBox, ...)``)
and then drives it through properties and signals. These classes keep that contract: one class per
Qt/CTK/qMRML name, properties that behave as Qt's do where a result depends on it (a spin box
clamps to its range and rounds to its decimals; setting a value emits its change signal unless
signals are blocked; a node combo box drops a node the scene removed), and signals usable both as
``widget.valueChanged.connect(slot)`` and PythonQt's ``widget.connect("valueChanged(double)", slot)``.
The CTK and qMRML classes and the .ui loader are in ``mrml_standins``. Nothing is drawn.
"""

import inspect
import math


def _call(slot, args):
    """Call ``slot`` with as many of ``args`` as it accepts, as PythonQt does."""
    try:
        parameters = inspect.signature(slot).parameters.values()
    except (TypeError, ValueError):
        return slot(*args)
    if any(p.kind == p.VAR_POSITIONAL for p in parameters):
        return slot(*args)
    accepted = len([p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)])
    return slot(*args[:accepted])


class BoundSignal:
    def __init__(self, owner, name):
        self._owner, self._name = owner, name

    def connect(self, slot):
        self._owner._slots.setdefault(self._name, []).append(slot)

    def disconnect(self, slot=None):
        slots = self._owner._slots.get(self._name, [])
        if slot is None:
            slots.clear()
        elif slot in slots:
            slots.remove(slot)

    def emit(self, *args):
        self._owner.emit(self._name, *args)


class Signal:
    """Class attribute declaring a signal; instances get a ``BoundSignal``."""

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, instance, owner):
        return self if instance is None else BoundSignal(instance, self.name)


class QObject:
    def __init__(self, parent=None, *args, **kwargs):
        self._slots = {}
        self._properties = {}
        self._signals_blocked = False
        self._children = []
        self._parent = parent
        self.name = ""
        self.objectName = ""
        if isinstance(parent, QObject):
            parent._children.append(self)

    def connect(self, signature, slot):
        getattr(self, signature.split("(")[0]).connect(slot)
        return True

    def disconnect(self, signature, slot=None):
        getattr(self, signature.split("(")[0]).disconnect(slot)
        return True

    def emit(self, name, *args):
        if not self._signals_blocked:
            for slot in list(self._slots.get(name, [])):
                _call(slot, args)

    def blockSignals(self, block):
        previous, self._signals_blocked = self._signals_blocked, bool(block)
        return previous

    def signalsBlocked(self):
        return self._signals_blocked

    def property(self, name):
        return self._properties.get(name)

    def setProperty(self, name, value):
        self._properties[name] = value
        return True

    def children(self):
        return list(self._children)

    def parent(self):
        return self._parent

    def findChildren(self, cls=None):
        found = []
        for child in self._children:
            if cls is None or isinstance(child, cls):
                found.append(child)
            found += child.findChildren(cls)
        return found

    def setObjectName(self, name):
        self.name = self.objectName = name


class QWidget(QObject):
    def __init__(self, parent=None, *args, **kwargs):
        super().__init__(parent)
        self.enabled = True
        self.visible = True
        self.toolTip = ""
        self._layout = None

    def isWidgetType(self):
        return True

    def setEnabled(self, enabled):
        self.enabled = bool(enabled)

    def setVisible(self, visible):
        self.visible = bool(visible)

    def show(self):
        self.visible = True

    def hide(self):
        self.visible = False

    def setLayout(self, layout):
        self._layout = layout
        layout.owner = self

    def layout(self):
        return self._layout

    def setMRMLScene(self, scene):
        self.emit("mrmlSceneChanged", scene)
        for child in self.findChildren(QWidget):
            if hasattr(child, "mrmlScene"):
                child.setMRMLScene(scene)

    mrmlSceneChanged = Signal()


class QLayout(QObject):
    owner = None

    def __init__(self, parent=None, *args, **kwargs):
        super().__init__(parent)
        self._items = []

    def addWidget(self, widget, *args):
        """As Qt: a widget added to a layout becomes a child of the layout's widget."""
        self._items.append(widget)
        if self.owner is not None:
            widget._parent = self.owner
            self.owner._children.append(widget)

    def count(self):
        return len(self._items)

    def itemAt(self, index):
        return self._items[index] if 0 <= index < len(self._items) else None

    def removeItem(self, item):
        if item in self._items:
            self._items.remove(item)

    def addRow(self, *args):
        pass


class QVBoxLayout(QLayout):
    pass


class QHBoxLayout(QLayout):
    pass


class QFormLayout(QLayout):
    pass


def _text_and_parent(text, parent):
    """Qt's (text, parent) and (parent) constructor forms."""
    return ("", text) if isinstance(text, QObject) else (text or "", parent)


class QLabel(QWidget):
    def __init__(self, text="", parent=None):
        text, parent = _text_and_parent(text, parent)
        super().__init__(parent)
        self.text = text


class QAbstractButton(QWidget):
    clicked = Signal()
    toggled = Signal()
    stateChanged = Signal()

    def __init__(self, text="", parent=None):
        text, parent = _text_and_parent(text, parent)
        super().__init__(parent)
        self.text = text
        self.checkable = False
        self._checked = False

    @property
    def checked(self):
        return self._checked

    @checked.setter
    def checked(self, value):
        value = bool(value)
        if value != self._checked:
            self._checked = value
            self.emit("toggled", value)
            self.emit("stateChanged", 2 if value else 0)

    def setChecked(self, value):
        self.checked = value

    def isChecked(self):
        return self._checked

    def click(self):
        """What a user's click does: toggles a checkable button, then emits clicked."""
        if not self.enabled:
            return
        if self.checkable:
            self.checked = not self.checked
        self.emit("clicked", self.checked)


class QPushButton(QAbstractButton):
    pass


class QToolButton(QAbstractButton):
    pass


class QCheckBox(QAbstractButton):
    def __init__(self, text="", parent=None):
        super().__init__(text, parent)
        self.checkable = True


class QAbstractSpinBox(QWidget):
    valueChanged = Signal()

    def __init__(self, parent=None):
        super().__init__(parent)
        self.minimum, self.maximum, self.decimals, self.singleStep = 0.0, 99.99, 2, 1.0
        self._value = 0.0

    @property
    def value(self):
        return self._value

    @value.setter
    def value(self, value):
        value = min(max(float(value), self.minimum), self.maximum)
        if not math.isinf(value):
            value = round(value, int(self.decimals))
        if value != self._value:
            self._value = value
            self.emit("valueChanged", value)

    def setValue(self, value):
        self.value = value

    def setRange(self, minimum, maximum):
        self.minimum, self.maximum = minimum, maximum
        self.value = self._value   # clamped, as Qt does


class QDoubleSpinBox(QAbstractSpinBox):
    pass


class QSpinBox(QAbstractSpinBox):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.decimals = 0
        self._value = 0

    @property
    def value(self):   # Qt's QSpinBox holds an int
        return int(self._value)

    @value.setter
    def value(self, value):
        QAbstractSpinBox.value.fset(self, value)


class QSlider(QSpinBox):
    pass


class QProgressBar(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.value = 0


class QComboBox(QWidget):
    currentIndexChanged = Signal()
    currentTextChanged = Signal()

    def __init__(self, parent=None):
        super().__init__(parent)
        self._items = []
        self._index = -1

    def addItem(self, text, *args):
        self._items.append(str(text))
        if self._index < 0:
            self.currentIndex = 0

    def clear(self):
        self._items = []
        self.currentIndex = -1

    @property
    def count(self):
        return len(self._items)

    def itemText(self, index):
        return self._items[index]

    @property
    def currentIndex(self):
        return self._index

    @currentIndex.setter
    def currentIndex(self, index):
        index = int(index) if -1 <= int(index) < len(self._items) else -1
        if index != self._index:
            self._index = index
            self.emit("currentIndexChanged", index)
            self.emit("currentTextChanged", self.currentText)

    def setCurrentIndex(self, index):
        self.currentIndex = index

    @property
    def currentText(self):
        return self._items[self._index] if self._index >= 0 else ""

    def setCurrentText(self, text):
        if text in self._items:
            self.currentIndex = self._items.index(text)


class QLineEdit(QWidget):
    textChanged = Signal()

    def __init__(self, parent=None):
        super().__init__(parent)
        self._text = ""

    @property
    def text(self):
        return self._text

    @text.setter
    def text(self, value):
        if value != self._text:
            self._text = value
            self.emit("textChanged", value)


class QTextEdit(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        self._text = ""

    def setPlainText(self, text):
        self._text = text

    def setHtml(self, html):
        self._text = html

    def toPlainText(self):
        return self._text


class QTextBrowser(QTextEdit):
    pass


class QTimer(QObject):
    """A timer that never fires by itself: tests call ``timeout.emit()`` where time would pass."""
    timeout = Signal()

    def __init__(self, parent=None):
        super().__init__(parent)
        self.active = False
        self.interval = 0
        self.singleShot = False

    def setInterval(self, interval):
        self.interval = interval

    def setSingleShot(self, single):
        self.singleShot = single

    def start(self, *args):
        self.active = True

    def stop(self):
        self.active = False

    def isActive(self):
        return self.active


class QSettings:
    def __init__(self, *args):
        self._values = {}

    def value(self, key, default=None):
        return self._values.get(key, default)

    def setValue(self, key, value):
        self._values[key] = value

    def contains(self, key):
        return key in self._values


class QColor:
    def __init__(self, *args):
        self.args = args


class QIcon:
    def __init__(self, *args):
        self.args = args


class QFile:
    def __init__(self, path):
        self.path = path

    def exists(self):
        import os
        return os.path.exists(self.path)

    def remove(self):
        import os
        try:
            os.remove(self.path)
            return True
        except OSError:
            return False


class QFileDialog:
    saveFileName = ""

    @classmethod
    def getSaveFileName(cls, *args):
        return cls.saveFileName


class QMessageBox:
    Ok, Cancel, Yes, No, Critical, Warning, Information, Question = 1, 2, 4, 8, 3, 2, 1, 4


class Qt:
    WaitCursor = 3
    ShiftModifier = 0x02000000


QT_CLASSES = [QObject, QWidget, QLabel, QPushButton, QToolButton, QCheckBox, QDoubleSpinBox, QSpinBox, QSlider,
              QProgressBar, QComboBox, QLineEdit, QTextEdit, QTextBrowser, QTimer, QSettings, QColor, QIcon, QFile,
              QFileDialog, QMessageBox, Qt, QVBoxLayout, QHBoxLayout, QFormLayout]
