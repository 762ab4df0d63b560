"""Reading a Slicer module's source, .ui and CMake lists without Slicer, for the static tests."""

import ast
import re
import xml.etree.ElementTree as ET


def read_ui_widgets(ui_file):
    """{objectName: (class, {property name: value}, [nodeTypes])} of every widget in a .ui file."""
    widgets = {}
    for element in ET.parse(ui_file).getroot().iter("widget"):
        properties, node_types = {}, []
        for prop in element.findall("property"):
            value = prop.find("*")
            if value is not None and value.tag == "stringlist":
                node_types = [s.text for s in value.findall("string")]
            elif value is not None:
                properties[prop.get("name")] = value.text
        assert element.get("name") not in widgets, f"duplicate widget name {element.get('name')} in the .ui"
        widgets[element.get("name")] = (element.get("class"), properties, node_types)
    return widgets


def find_class(tree, name):
    return next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name)


def parameter_fields(tree):
    """{field: (annotation source, default node)} of the class decorated with @parameterNodeWrapper."""
    wrapped = [n for n in tree.body if isinstance(n, ast.ClassDef)
               and any(ast.unparse(d) == "parameterNodeWrapper" for d in n.decorator_list)]
    assert len(wrapped) == 1, "exactly one @parameterNodeWrapper class expected"
    return {n.target.id: (ast.unparse(n.annotation), n.value) for n in wrapped[0].body if isinstance(n, ast.AnnAssign)}


def ui_names_used(tree):
    """Every ``self.ui.<name>`` the module's code uses."""
    return {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
            and node.value.attr == "ui" and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"}


def cmake_list(text, variable, module_name):
    """Entries of ``set(<variable> ...)`` in a CMakeLists text, ``${MODULE_NAME}`` expanded, comments dropped."""
    body = re.search(r"set\(" + variable + r"\s+(.*?)\)", text, flags=re.S).group(1)
    return [line.strip().replace("${MODULE_NAME}", module_name) for line in body.splitlines()
            if line.strip() and not line.strip().startswith("#")]
