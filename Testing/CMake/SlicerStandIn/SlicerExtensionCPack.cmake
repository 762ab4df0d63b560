# Stand-in (see SlicerConfig.cmake): instead of packaging, write the extension metadata as CMake
# evaluated it, for the test to check against the Extensions Index's rules.
set(_metadata "{}")
foreach(_name HOMEPAGE CATEGORY CONTRIBUTORS DESCRIPTION ICONURL SCREENSHOTURLS DEPENDS)
  string(JSON _metadata SET "${_metadata}" "${_name}" "\"${EXTENSION_${_name}}\"")
endforeach()
string(JSON _metadata SET "${_metadata}" "PROJECT_NAME" "\"${PROJECT_NAME}\"")
file(WRITE "${CMAKE_BINARY_DIR}/extension-metadata.json" "${_metadata}")
