# The C++ dependencies a machine may lack, carried from Debian by
# bench/gpu_bundle.sh (docs/devices.md "Build flavours"). A GPU machine
# often has PyTorch, a compiler and CMake but no yaml-cpp, spdlog, fmt,
# CLI11, nlohmann-json or OpenSSL headers, and no package registry to get
# them from.
#
#   -DARCHIPELAGO_BUNDLE=/path/to/.gpu_bundle
#
# A package the system has is taken from the system; the bundle fills only
# what is missing, and configure says which came from where. Without
# ARCHIPELAGO_BUNDLE every lookup is the plain find_package(... REQUIRED).

set(ARCHIPELAGO_BUNDLE "" CACHE PATH "Folder made by bench/gpu_bundle.sh: Debian's headers and libraries for packages this machine lacks")

if(ARCHIPELAGO_BUNDLE)
  if(NOT EXISTS "${ARCHIPELAGO_BUNDLE}/usr/include")
    message(FATAL_ERROR "archipelago: ARCHIPELAGO_BUNDLE=${ARCHIPELAGO_BUNDLE} holds no usr/include: "
                        "make it with `bash bench/gpu_bundle.sh ${ARCHIPELAGO_BUNDLE}` on a Debian 12 machine")
  endif()
  get_filename_component(ARCHIPELAGO_BUNDLE "${ARCHIPELAGO_BUNDLE}" ABSOLUTE)
  # Never on CMAKE_PREFIX_PATH, which CMake searches before the system:
  # every lookup names the bundle as its last resort (PATHS) instead.
  set(_archipelago_bundle_usr "${ARCHIPELAGO_BUNDLE}/usr")
  set(ARCHIPELAGO_BUNDLE_INCLUDE "${_archipelago_bundle_usr}/include")
  set(ARCHIPELAGO_BUNDLE_LIB "${_archipelago_bundle_usr}/lib/x86_64-linux-gnu")
endif()

# The folders of the bundle a package's CMake config file lives in (the
# Debian paths, which the bundle keeps so that the files find their own
# headers and libraries relative to themselves).
function(_archipelago_bundle_config_dirs out name)
  set(dirs)
  foreach(sub lib/x86_64-linux-gnu/cmake share/cmake lib/cmake)
    list(APPEND dirs "${_archipelago_bundle_usr}/${sub}/${name}")
  endforeach()
  set(${out} ${dirs} PARENT_SCOPE)
endfunction()

# Says where a package was found: the bundle or the system.
function(_archipelago_say_source name dir)
  string(FIND "${dir}" "${ARCHIPELAGO_BUNDLE}/" at)
  if(at EQUAL 0)
    message(STATUS "archipelago: ${name} from the bundle (${dir})")
  else()
    message(STATUS "archipelago: ${name} from the system (${dir})")
  endif()
endfunction()

# find_package(name ...) from the system, else from the bundle.
macro(archipelago_find_package name)
  if(NOT ARCHIPELAGO_BUNDLE)
    find_package(${name} REQUIRED ${ARGN})
  else()
    find_package(${name} QUIET ${ARGN})
    if(NOT ${name}_FOUND)
      _archipelago_bundle_config_dirs(_dirs ${name})
      # spdlog's config finds fmt itself: a bundled spdlog must get the
      # fmt it was built with, not the system's.
      if("${name}" STREQUAL "spdlog")
        _archipelago_bundle_config_dirs(_fmt_dirs fmt)
        find_package(fmt REQUIRED CONFIG PATHS ${_fmt_dirs} NO_DEFAULT_PATH)
      endif()
      find_package(${name} REQUIRED CONFIG ${ARGN} PATHS ${_dirs} NO_DEFAULT_PATH)
    endif()
    _archipelago_say_source(${name} "${${name}_DIR}")
  endif()
endmacro()

# OpenSSL comes through CMake's FindOpenSSL module, which takes a root.
macro(archipelago_find_openssl)
  if(NOT ARCHIPELAGO_BUNDLE)
    find_package(OpenSSL REQUIRED)
  else()
    find_package(OpenSSL QUIET)
    if(NOT OPENSSL_FOUND)
      # The module's own cache entries, pointed at the bundle (a failed
      # search left them NOTFOUND).
      set(OPENSSL_INCLUDE_DIR "${_archipelago_bundle_usr}/include" CACHE PATH "" FORCE)
      set(OPENSSL_SSL_LIBRARY "${_archipelago_bundle_usr}/lib/x86_64-linux-gnu/libssl.so" CACHE FILEPATH "" FORCE)
      set(OPENSSL_CRYPTO_LIBRARY "${_archipelago_bundle_usr}/lib/x86_64-linux-gnu/libcrypto.so" CACHE FILEPATH "" FORCE)
      find_package(OpenSSL REQUIRED)
    endif()
    _archipelago_say_source(OpenSSL "${OPENSSL_INCLUDE_DIR}")
  endif()
endmacro()

# find_package(name) from the system, else from the bundle, else a warning
# that says what the build goes without (`without`); name_FOUND tells.
macro(archipelago_find_optional_package name without)
  find_package(${name} QUIET)
  if(NOT ${name}_FOUND AND ARCHIPELAGO_BUNDLE)
    _archipelago_bundle_config_dirs(_dirs ${name})
    find_package(${name} QUIET CONFIG PATHS ${_dirs} NO_DEFAULT_PATH)
  endif()
  if(NOT ${name}_FOUND)
    message(WARNING "archipelago: ${name} not found: ${without}")
  endif()
endmacro()
