# Helpers shared by every layer's CMakeLists.txt.

# Warnings for our own targets only (never directory-wide).
function(archipelago_warnings target)
  target_compile_options(${target} PRIVATE -Wall -Wextra -Wno-unused-parameter)
endfunction()

# archipelago_layer(NAME DEPS...): a static library archipelago_<NAME> with
# alias archipelago::<NAME>, built from every .cpp in src/<NAME>/ (globbed so a
# new file needs no CMake edit). Public headers live in include/archipelago/.
function(archipelago_layer name)
  cmake_parse_arguments(L "" "" "DEPS;PRIVATE_DEPS" ${ARGN})
  file(GLOB_RECURSE srcs CONFIGURE_DEPENDS ${CMAKE_CURRENT_SOURCE_DIR}/*.cpp)
  if(NOT srcs)
    # A layer with no sources yet is a header-only interface target.
    add_library(archipelago_${name} INTERFACE)
    add_library(archipelago::${name} ALIAS archipelago_${name})
    target_include_directories(archipelago_${name} INTERFACE ${PROJECT_SOURCE_DIR}/include)
    target_link_libraries(archipelago_${name} INTERFACE ${L_DEPS})
    return()
  endif()
  add_library(archipelago_${name} STATIC ${srcs})
  add_library(archipelago::${name} ALIAS archipelago_${name})
  target_include_directories(archipelago_${name}
    PUBLIC ${PROJECT_SOURCE_DIR}/include
    PRIVATE ${PROJECT_SOURCE_DIR}/src)
  target_link_libraries(archipelago_${name} PUBLIC ${L_DEPS} PRIVATE ${L_PRIVATE_DEPS})
  set_target_properties(archipelago_${name} PROPERTIES POSITION_INDEPENDENT_CODE ON)
  archipelago_warnings(archipelago_${name})
  archipelago_fuzz_instrument(archipelago_${name})
endfunction()

# archipelago_torch_target(TARGET): a target with many files that include
# libtorch. Compiled in batches (ARCHIPELAGO_UNITY_BUILD, CMakeLists.txt),
# each batch parses torch.h once (about 5 s) and emits libtorch's inline
# functions and templates once: four runtime files took 98 s one by one and
# 37 s as one batch, on 2 cores. A precompiled torch.h costs about 40 s per
# target, which only files compiled one by one win back, so it is built
# only then.
function(archipelago_torch_target target)
  if(NOT ARCHIPELAGO_UNITY_BUILD)
    target_precompile_headers(${target} PRIVATE <torch/torch.h>)
  endif()
endfunction()

# In a -DARCHIPELAGO_FUZZ=ON build (clang) the layers' own code carries
# libFuzzer's coverage hooks and the sanitizers, not only the fuzz targets'
# files: the parsers under test live in the layers. Undefined behaviour
# aborts, so the fuzzer reports it as a crash. Whatever links a layer links
# the sanitizer runtimes.
function(archipelago_fuzz_instrument target)
  if(ARCHIPELAGO_FUZZ AND CMAKE_CXX_COMPILER_ID MATCHES "Clang")
    target_compile_options(${target} PRIVATE -fsanitize=fuzzer-no-link,address,undefined
                                             -fno-sanitize-recover=undefined)
    target_link_options(${target} INTERFACE -fsanitize=address,undefined)
  endif()
endfunction()

# archipelago_test_suite(NAME SRC_DIR DEPS... [TIMEOUT s] [COST c]): one
# GoogleTest binary per layer from tests/<layer>/*.cpp, each test registered
# with CTest and bounded in time. COST orders a fresh build's first ctest
# run (no timings recorded yet): the costliest start first, so a long test
# does not start last and run alone. Test code is compiled at -O1: it only
# drives libtorch and the layers (built -O2), and -O1 roughly halves the
# compile time of the libtorch-heavy test files (test_runtime's: 8-19 s
# each instead of 17-34 s).
function(archipelago_test_suite name)
  cmake_parse_arguments(T "" "TIMEOUT;COST" "DEPS" ${ARGN})
  file(GLOB srcs CONFIGURE_DEPENDS ${CMAKE_CURRENT_SOURCE_DIR}/${name}/*.cpp)
  if(NOT srcs)
    return()
  endif()
  if(NOT T_TIMEOUT)
    set(T_TIMEOUT 120)
  endif()
  if(NOT T_COST)
    set(T_COST 0)
  endif()
  # Fuzz smoke tests (tests/fuzz/mutator.h) read the seed corpora from the
  # source tree; only their own files get the definition, so adding one does
  # not rebuild the rest of a suite.
  foreach(src ${srcs})
    if(src MATCHES "fuzz_smoke_test\\.cpp$")
      set_property(SOURCE ${src} APPEND PROPERTY COMPILE_DEFINITIONS
                   ARCHIPELAGO_FUZZ_CORPUS_DIR="${PROJECT_SOURCE_DIR}/tests/fuzz/corpus")
    endif()
  endforeach()
  add_executable(test_${name} ${srcs})
  target_link_libraries(test_${name} PRIVATE ${T_DEPS} GTest::gtest GTest::gtest_main GTest::gmock)
  target_include_directories(test_${name} PRIVATE ${PROJECT_SOURCE_DIR}/src ${CMAKE_CURRENT_SOURCE_DIR})
  archipelago_warnings(test_${name})
  if(NOT ARCHIPELAGO_SANITIZE)
    target_compile_options(test_${name} PRIVATE -O1)
  endif()
  gtest_discover_tests(test_${name}
    DISCOVERY_TIMEOUT 60
    PROPERTIES TIMEOUT ${T_TIMEOUT} LABELS ${name} COST ${T_COST}
    EXTRA_ARGS --gtest_color=no)
endfunction()
