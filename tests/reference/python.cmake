# The Python that runs the numpy reference checks: Debian's /usr/bin/python3
# (python3-numpy, installed by scripts/install-deps.sh) when present, else
# the interpreter CMake found. Sets EM_REF_PYTHON and EM_REF_DIR.
if(NOT DEFINED EM_REF_PYTHON)
  if(EXISTS /usr/bin/python3)
    set(EM_REF_PYTHON /usr/bin/python3 CACHE FILEPATH "Python with numpy for the reference tests")
  else()
    set(EM_REF_PYTHON ${Python3_EXECUTABLE} CACHE FILEPATH "Python with numpy for the reference tests")
  endif()
  execute_process(COMMAND ${EM_REF_PYTHON} -c "import numpy" RESULT_VARIABLE em_numpy_rc
                  OUTPUT_QUIET ERROR_QUIET)
  if(NOT em_numpy_rc EQUAL 0)
    message(WARNING "expertmesh: ${EM_REF_PYTHON} has no numpy; the reference tests will fail "
                    "(run scripts/install-deps.sh)")
  endif()
endif()
set(EM_REF_DIR ${CMAKE_SOURCE_DIR}/tests/reference)
