"""The Qt shell's shared code (``module_widget``): the one Lib folder that imports ``qt``; only the module
files import it."""
