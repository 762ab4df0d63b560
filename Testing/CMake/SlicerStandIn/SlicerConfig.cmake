# Stand-in for a Slicer build tree's SlicerConfig.cmake, for Testing/Python/test_extension_build.py only.
#
# No Slicer build tree exists on these machines, and the slicer-core-sdk wheel's SlicerConfig.cmake
# (C++ MRML components only) defines no Slicer_USE_FILE, no slicerMacroBuildScriptedModule and no
# extension packaging. This package defines just what DCEPK's CMake lists call, generating the same
# build rules as Slicer's CMake/SlicerMacroBuildScriptedModule.cmake and CTK's
# ctkMacroCompilePythonScript.cmake do (one copy rule per script and resource into the shared
# qt-scripted-modules folder), so that a real CMake configure and a real Ninja build of the
# extension show what Slicer's build would: a missing file, or two rules writing one output.
set(Slicer_FOUND TRUE)
set(Slicer_VERSION_MAJOR 5)
set(Slicer_VERSION_MINOR 13)
set(Slicer_USE_FILE "${CMAKE_CURRENT_LIST_DIR}/UseSlicer.cmake")
set(Slicer_EXTENSION_GENERATE_CONFIG "${CMAKE_CURRENT_LIST_DIR}/SlicerExtensionGenerateConfig.cmake")
set(Slicer_EXTENSION_CPACK "${CMAKE_CURRENT_LIST_DIR}/SlicerExtensionCPack.cmake")
