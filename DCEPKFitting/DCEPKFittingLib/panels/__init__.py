"""The module panels' pure logic, loaded with the Slicer modules before any numerical package:
``panel_state`` (what each panel enables and why Apply is disabled), ``slicer_dependencies`` (the modules'
Python requirements: which are missing, installing them after asking). No slicer, qt or numpy import.
"""
