# Which libtorch the model and runtime layers compile against: the two build
# flavours of one source (docs/devices.md "Build flavours").
#
#   -DARCHIPELAGO_TORCH=system   (default) find_package(Torch): Debian's
#                                libtorch 1.13, the CPU flavour CI builds.
#   -DARCHIPELAGO_TORCH=python   the libtorch inside the PyTorch that
#                                ARCHIPELAGO_PYTHON imports: the CUDA flavour
#                                when that PyTorch has CUDA (or ROCm).
#
# Either way the layers get TORCH_LIBRARIES / TORCH_INCLUDE_DIRS, the build
# gets ARCHIPELAGO_WITH_CUDA (the code's ARCHIPELAGO_WITH_CUDA=1) when the
# libtorch has a GPU backend, and configure prints one line naming the
# flavour. Version differences in the code live in model/torch_compat.h,
# never here.

set(ARCHIPELAGO_TORCH system CACHE STRING "libtorch to build against: system (find_package(Torch)) | python (ARCHIPELAGO_PYTHON's PyTorch)")
set_property(CACHE ARCHIPELAGO_TORCH PROPERTY STRINGS system python)
set(ARCHIPELAGO_PYTHON python3 CACHE STRING "The Python whose PyTorch gives libtorch (ARCHIPELAGO_TORCH=python)")
set(ARCHIPELAGO_CUDA auto CACHE STRING "CUDA code paths: auto (when libtorch has CUDA) | on (stop when it has none) | off")
set_property(CACHE ARCHIPELAGO_CUDA PROPERTY STRINGS auto on off)
set(ARCHIPELAGO_TORCH_IMPORT auto CACHE STRING
  "python flavour: config (its TorchConfig.cmake) | direct (its include/ and lib/ folders) | auto")
set_property(CACHE ARCHIPELAGO_TORCH_IMPORT PROPERTY STRINGS auto config direct)

# Value of `key` in the probe's key=value lines.
function(_archipelago_probe_value out text key)
  if(text MATCHES "(^|\n)${key}=([^\n]*)")
    set(${out} "${CMAKE_MATCH_2}" PARENT_SCOPE)
  else()
    set(${out} "" PARENT_SCOPE)
  endif()
endfunction()

# The C++ ABI of the libraries this build links besides libtorch (yaml-cpp,
# fmt, spdlog, ... from the distribution or the bundle): the compiler's
# default, which distributions build their packages with.
function(_archipelago_default_cxx11_abi out)
  include(CheckCXXSourceCompiles)
  check_cxx_source_compiles("#include <string>
#if !_GLIBCXX_USE_CXX11_ABI
#error old ABI
#endif
int main() { return 0; }" ARCHIPELAGO_DEFAULT_CXX11_ABI)
  if(ARCHIPELAGO_DEFAULT_CXX11_ABI)
    set(${out} 1 PARENT_SCOPE)
  else()
    set(${out} 0 PARENT_SCOPE)
  endif()
endfunction()

# libstdc++ has two std::string / std::list layouts; one program must use
# one. PyTorch's pip wheels before 2.7 chose the old one, Debian and every
# current distribution the new one, and our own code passes std::string to
# both libtorch and yaml-cpp/fmt/spdlog, so a mismatch is a link error at
# best and a crash at worst: stop here instead.
function(_archipelago_check_abi torch_abi what)
  _archipelago_default_cxx11_abi(ours)
  if(NOT torch_abi STREQUAL ours)
    message(FATAL_ERROR
      "archipelago: ${what} was built with _GLIBCXX_USE_CXX11_ABI=${torch_abi}, but yaml-cpp, fmt and spdlog here "
      "use _GLIBCXX_USE_CXX11_ABI=${ours} (this compiler's default, as distributions build them): one program "
      "cannot mix the two std::string layouts. PyTorch pip wheels before 2.7 use the old ABI (0). Fix: a PyTorch "
      ">= 2.7 (-DARCHIPELAGO_PYTHON=/path/to/its/python3), or the cxx11-ABI libtorch from pytorch.org "
      "(-DARCHIPELAGO_TORCH=system -DTorch_DIR=<libtorch>/share/cmake/Torch).")
  endif()
endfunction()

# A wheel's include folder holds, beside libtorch's own headers, the
# third-party ones it was built with: PyTorch 2.11 ships fmt 12, which as an
# include directory would shadow the fmt that spdlog (and our code) build
# against, and break them. The build gets a folder of links to every entry
# but those this project takes from its own dependencies.
set(_archipelago_torch_shadowing fmt spdlog nlohmann yaml-cpp CLI openssl gtest gmock)
function(_archipelago_torch_include_view include view)
  file(REMOVE_RECURSE "${view}")
  file(MAKE_DIRECTORY "${view}")
  file(GLOB entries RELATIVE "${include}" "${include}/*")
  set(left_out)
  foreach(e IN LISTS entries)
    if(e IN_LIST _archipelago_torch_shadowing)
      list(APPEND left_out "${e}")
    else()
      file(CREATE_LINK "${include}/${e}" "${view}/${e}" SYMBOLIC)
    endif()
  endforeach()
  if(left_out)
    message(STATUS "archipelago: libtorch's bundled ${left_out} headers left out of the include path (${view})")
  endif()
endfunction()

# A GPU libtorch from its folders, without TorchConfig.cmake: that file
# also looks for a CUDA toolkit (nvcc, cuDNN, NVTX) that a host-only build
# does not use and a machine with only the wheel lacks.
function(_archipelago_import_torch_direct root nvidia_dirs abi)
  set(libs)
  foreach(n torch torch_cpu c10)
    if(NOT EXISTS "${root}/lib/lib${n}.so")
      message(FATAL_ERROR "archipelago: ${root}/lib/lib${n}.so is missing: this PyTorch installation has no "
                          "libtorch to link (ARCHIPELAGO_TORCH=python needs a full torch package, not a stub)")
    endif()
    list(APPEND libs "${root}/lib/lib${n}.so")
  endforeach()
  # The GPU backends register themselves from static constructors, which
  # --as-needed would drop: nothing of ours calls into them by name. One
  # flag item (CMake keeps flags in place and whole); their folder is
  # libtorch's, already on the RUNPATH.
  set(gpu_libs)
  foreach(n torch_cuda c10_cuda torch_hip c10_hip)
    if(EXISTS "${root}/lib/lib${n}.so")
      list(APPEND gpu_libs "${root}/lib/lib${n}.so")
    endif()
  endforeach()
  if(gpu_libs)
    string(REPLACE ";" "," gpu_libs "${gpu_libs}")
    list(APPEND libs "-Wl,--no-as-needed,${gpu_libs}" "-Wl,--as-needed")
  endif()
  add_library(archipelago_torch INTERFACE)
  add_library(archipelago::torch ALIAS archipelago_torch)
  set(inc "${CMAKE_BINARY_DIR}/torch_include" "${root}/include/torch/csrc/api/include")
  _archipelago_torch_include_view("${root}/include" "${CMAKE_BINARY_DIR}/torch_include")
  target_include_directories(archipelago_torch SYSTEM INTERFACE ${inc})
  target_link_libraries(archipelago_torch INTERFACE ${libs})
  target_compile_definitions(archipelago_torch INTERFACE _GLIBCXX_USE_CXX11_ABI=${abi})
  target_compile_features(archipelago_torch INTERFACE cxx_std_17)
  # libtorch_cuda's own dependencies (cudart, cuBLAS, ... in pip's nvidia-*
  # folders) are found at run time through its RUNPATH, as Python finds
  # them; the linker is shown where they are, and not asked to resolve
  # what only they define.
  foreach(d IN LISTS nvidia_dirs)
    target_link_options(archipelago_torch INTERFACE "LINKER:-rpath-link,${d}")
  endforeach()
  target_link_options(archipelago_torch INTERFACE "LINKER:--allow-shlib-undefined")
  set(TORCH_LIBRARIES archipelago_torch PARENT_SCOPE)
  set(TORCH_INCLUDE_DIRS ${inc} PARENT_SCOPE)
endfunction()

# ARCHIPELAGO_TORCH=python: ask the interpreter, check the ABI, import.
function(_archipelago_find_python_torch)
  execute_process(COMMAND "${ARCHIPELAGO_PYTHON}" "${CMAKE_CURRENT_FUNCTION_LIST_DIR}/torch_probe.py"
                  OUTPUT_VARIABLE probe ERROR_VARIABLE probe_err RESULT_VARIABLE rc)
  _archipelago_probe_value(err "${probe}" error)
  if(NOT rc EQUAL 0)
    if(NOT err)
      string(STRIP "${rc} ${probe_err}" err)
    endif()
    message(FATAL_ERROR "archipelago: ARCHIPELAGO_TORCH=python: '${ARCHIPELAGO_PYTHON}': ${err}. Set "
                        "-DARCHIPELAGO_PYTHON=/path/to/python3 of a PyTorch installation, or "
                        "-DARCHIPELAGO_TORCH=system for Debian's libtorch.")
  endif()
  foreach(k version root cmake_prefix_path cuda hip cxx11_abi nvidia_lib_dirs)
    _archipelago_probe_value(${k} "${probe}" ${k})
  endforeach()
  set(what "PyTorch ${version} (${root})")
  _archipelago_check_abi("${cxx11_abi}" "${what}")
  set(gpu OFF)
  if(cuda OR hip)
    set(gpu ON)
  endif()
  set(how "${ARCHIPELAGO_TORCH_IMPORT}")
  if(how STREQUAL "auto")
    # TorchConfig.cmake where it is whole and asks for nothing more;
    # Debian's python3-torch names a cmake_prefix_path it does not ship.
    if(EXISTS "${cmake_prefix_path}/Torch/TorchConfig.cmake" AND NOT gpu)
      set(how config)
    else()
      set(how direct)
    endif()
  endif()
  if(how STREQUAL "config")
    find_package(Torch REQUIRED CONFIG PATHS "${cmake_prefix_path}/Torch" NO_DEFAULT_PATH)
  elseif(how STREQUAL "direct")
    _archipelago_import_torch_direct("${root}" "${nvidia_lib_dirs}" "${cxx11_abi}")
  else()
    message(FATAL_ERROR "archipelago: ARCHIPELAGO_TORCH_IMPORT='${how}' (expected auto, config or direct)")
  endif()
  set(backend "CPU only")
  if(cuda)
    set(backend "CUDA ${cuda}")
  elseif(hip)
    set(backend "ROCm ${hip} (as the cuda device type)")
  endif()
  set(TORCH_LIBRARIES "${TORCH_LIBRARIES}" PARENT_SCOPE)
  set(TORCH_INCLUDE_DIRS "${TORCH_INCLUDE_DIRS}" PARENT_SCOPE)
  set(_torch_gpu ${gpu} PARENT_SCOPE)
  set(_torch_desc "python: ${what}, ${backend}, _GLIBCXX_USE_CXX11_ABI=${cxx11_abi}, imported via ${how}"
      PARENT_SCOPE)
endfunction()

# ARCHIPELAGO_TORCH=system: find_package(Torch) as CMake finds it (Debian's
# by default; Torch_DIR or CMAKE_PREFIX_PATH name another libtorch).
macro(_archipelago_find_system_torch)
  find_package(Torch REQUIRED)
  set(_torch_gpu OFF)
  if(TARGET torch_cuda OR TARGET torch_hip OR C10_CUDA_LIBRARY)
    set(_torch_gpu ON)
  endif()
  set(_torch_abi 1)
  if(TORCH_CXX_FLAGS MATCHES "_GLIBCXX_USE_CXX11_ABI=0")
    set(_torch_abi 0)
  endif()
  _archipelago_check_abi(${_torch_abi} "libtorch ${Torch_VERSION} (${Torch_DIR})")
  set(_torch_backend "CPU only")
  if(_torch_gpu)
    set(_torch_backend "GPU backend")
  endif()
  set(_torch_desc "system: libtorch ${Torch_VERSION} (${Torch_DIR}), ${_torch_backend}, _GLIBCXX_USE_CXX11_ABI=${_torch_abi}")
endmacro()

# Sets TORCH_LIBRARIES, TORCH_INCLUDE_DIRS and ARCHIPELAGO_WITH_CUDA.
macro(archipelago_find_torch)
  if(ARCHIPELAGO_TORCH STREQUAL "system")
    _archipelago_find_system_torch()
  elseif(ARCHIPELAGO_TORCH STREQUAL "python")
    _archipelago_find_python_torch()
  else()
    message(FATAL_ERROR "archipelago: ARCHIPELAGO_TORCH='${ARCHIPELAGO_TORCH}' (expected system or python)")
  endif()
  if(NOT ARCHIPELAGO_CUDA MATCHES "^(auto|on|ON|off|OFF)$")
    message(FATAL_ERROR "archipelago: ARCHIPELAGO_CUDA='${ARCHIPELAGO_CUDA}' (expected auto, on or off)")
  endif()
  if(ARCHIPELAGO_CUDA MATCHES "^(on|ON)$" AND NOT _torch_gpu)
    message(FATAL_ERROR "archipelago: ARCHIPELAGO_CUDA=on, but the libtorch found has no CUDA (${_torch_desc}). "
                        "Point -DARCHIPELAGO_PYTHON at the python3 of a CUDA build of PyTorch "
                        "(python3 -c 'import torch; print(torch.version.cuda)' prints a version), "
                        "or configure with -DARCHIPELAGO_CUDA=auto for a CPU build.")
  endif()
  set(ARCHIPELAGO_WITH_CUDA OFF)
  if(_torch_gpu AND NOT ARCHIPELAGO_CUDA MATCHES "^(off|OFF)$")
    set(ARCHIPELAGO_WITH_CUDA ON)
  endif()
  message(STATUS "archipelago: torch flavour ${_torch_desc}; ARCHIPELAGO_WITH_CUDA=${ARCHIPELAGO_WITH_CUDA}")
endmacro()
