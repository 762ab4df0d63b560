# Stand-in (see SlicerConfig.cmake): the scripted-module layout and macros of Slicer's build.
set(Slicer_USE_PYTHONQT ON)
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR "lib/Slicer-${Slicer_VERSION_MAJOR}.${Slicer_VERSION_MINOR}/qt-scripted-modules")
include(CTest)

# As SlicerMacroBuildScriptedModule + ctkMacroCompilePythonScript: every script and resource is one
# custom command copying it to ${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}/<its path>,
# the same folder for every scripted module of the extension.
macro(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(MY_SLICER "WITH_GENERIC_TESTS;WITH_SUBDIR;VERBOSE" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  if(MY_SLICER_UNPARSED_ARGUMENTS)
    message(FATAL_ERROR "Unknown keywords given to slicerMacroBuildScriptedModule(): \"${MY_SLICER_UNPARSED_ARGUMENTS}\"")
  endif()
  set(_copied)
  foreach(_file IN LISTS MY_SLICER_SCRIPTS MY_SLICER_RESOURCES)
    if(NOT EXISTS "${CMAKE_CURRENT_SOURCE_DIR}/${_file}")
      message(FATAL_ERROR "slicerMacroBuildScriptedModule given nonexistent file '${_file}'")
    endif()
    set(_target "${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}/${_file}")
    add_custom_command(OUTPUT "${_target}"
      COMMAND ${CMAKE_COMMAND} -E copy "${CMAKE_CURRENT_SOURCE_DIR}/${_file}" "${_target}"
      DEPENDS "${CMAKE_CURRENT_SOURCE_DIR}/${_file}"
      COMMENT "Copying python file: ${_file}")
    list(APPEND _copied "${_target}")
  endforeach()
  add_custom_target(Copy${MY_SLICER_NAME}PythonFiles ALL DEPENDS ${_copied})
  if(BUILD_TESTING AND MY_SLICER_WITH_GENERIC_TESTS)
    add_test(NAME py_nomainwindow_qSlicer${MY_SLICER_NAME}ModuleGenericTest COMMAND ${CMAKE_COMMAND} -E true)
  endif()
endmacro()

# As SlicerMacroPythonTesting's slicer_add_python_unittest: one CTest test per module script.
macro(slicer_add_python_unittest)
  cmake_parse_arguments(MY "" "TESTNAME_PREFIX;SCRIPT" "SLICER_ARGS" ${ARGN})
  get_filename_component(_test_name ${MY_SCRIPT} NAME_WE)
  add_test(NAME py_${MY_TESTNAME_PREFIX}${_test_name} COMMAND ${CMAKE_COMMAND} -E true)
endmacro()
