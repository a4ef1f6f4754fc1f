# A thread-sanitizer build of the in-process communicator test (not part of
# the normal build; pass this file as CMAKE_PROJECT_INCLUDE):
#
#   cmake -S . -B build-tsan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DEXPERTMESH_CUDA=OFF -DEXPERTMESH_UCX=OFF \
#     -DCMAKE_CXX_FLAGS=-fsanitize=thread -DCMAKE_C_FLAGS=-fsanitize=thread \
#     -DCMAKE_EXE_LINKER_FLAGS=-fsanitize=thread -DCMAKE_PROJECT_INCLUDE=$PWD/tests/comm/tsan.cmake
#   cmake --build build-tsan --target comm_inproc_test
#   build-tsan/tests/comm/comm_inproc_test --ranks=8 --gtest_repeat=5
#
# The target_clones (ifunc) resolvers of these two files run at relocation,
# before the TSan runtime is initialised, and would crash instrumented: they
# are built without it (the engine's fp8 packing and the CPU kernels go
# unchecked; the communicator, its callers and the harness are checked).
cmake_language(DEFER DIRECTORY ${CMAKE_SOURCE_DIR} CALL set_source_files_properties
  ${CMAKE_SOURCE_DIR}/worker/dispatch.cc TARGET_DIRECTORY em_worker PROPERTIES COMPILE_OPTIONS -fno-sanitize=thread)
cmake_language(DEFER DIRECTORY ${CMAKE_SOURCE_DIR} CALL set_source_files_properties
  ${CMAKE_SOURCE_DIR}/kernels/cpu/kernels.cc TARGET_DIRECTORY em_kernels_cpu PROPERTIES COMPILE_OPTIONS -fno-sanitize=thread)
