# Sanitizer builds of the torch-free layers (docs/testing.md).
#
#   -DARCHIPELAGO_WITH_TORCH=OFF -DARCHIPELAGO_SANITIZE=address,undefined
#   -DARCHIPELAGO_WITH_TORCH=OFF -DARCHIPELAGO_SANITIZE=thread
#
# The flags are added to every target of the build, not to our targets one by
# one as warnings are: a sanitizer sees only what is instrumented, and an
# inline function (a std::vector, a std::shared_ptr count) compiled both with
# and without instrumentation in one program gives missed reports under ASan
# and false races under TSan. So the whole program is built one way.
#
# libtorch is not allowed in: Debian's build is not instrumented, its OpenMP
# pool races in TSan's eyes, and it would put an hour of compilation into a
# check that must fit in CI's budget.

set(ARCHIPELAGO_SANITIZE "" CACHE STRING
  "Sanitizers for a torch-free build: address,undefined | thread | empty for none")

if(ARCHIPELAGO_SANITIZE)
  if(ARCHIPELAGO_WITH_TORCH)
    message(FATAL_ERROR "ARCHIPELAGO_SANITIZE=${ARCHIPELAGO_SANITIZE} needs -DARCHIPELAGO_WITH_TORCH=OFF "
                        "(libtorch is not instrumented; see docs/testing.md)")
  endif()
  string(REPLACE "," ";" archipelago_san_list "${ARCHIPELAGO_SANITIZE}")
  foreach(s IN LISTS archipelago_san_list)
    if(NOT s MATCHES "^(address|undefined|thread|leak)$")
      message(FATAL_ERROR "ARCHIPELAGO_SANITIZE: '${s}' is not one of address, undefined, thread, leak")
    endif()
  endforeach()
  if("thread" IN_LIST archipelago_san_list AND
     ("address" IN_LIST archipelago_san_list OR "leak" IN_LIST archipelago_san_list))
    message(FATAL_ERROR "ARCHIPELAGO_SANITIZE: thread cannot be combined with address or leak "
                        "(one shadow memory per process); configure two build trees")
  endif()

  # Frame pointers give the sanitizers' fast unwinder whole stacks.
  set(archipelago_san_flags -fsanitize=${ARCHIPELAGO_SANITIZE} -fno-omit-frame-pointer)
  set(archipelago_san_link -fsanitize=${ARCHIPELAGO_SANITIZE})
  if("undefined" IN_LIST archipelago_san_list)
    # UBSan otherwise prints and carries on with exit status 0: a report must
    # fail its test, so every check aborts the process.
    list(APPEND archipelago_san_flags -fno-sanitize-recover=all)
    # Not part of "undefined" in GCC or clang, yet undefined behaviour that
    # the codecs and dtype conversions could meet: a float (NaN, inf, or out
    # of range) converted to an integer type that cannot hold it.
    list(APPEND archipelago_san_flags -fsanitize=float-cast-overflow)
    list(APPEND archipelago_san_link -fsanitize=float-cast-overflow)
  endif()
  add_compile_options(${archipelago_san_flags})
  add_link_options(${archipelago_san_link})
  # Code that must behave differently under a sanitizer runtime says why
  # where it tests this (e.g. the SentencePiece shim's dlopen flags).
  add_compile_definitions(ARCHIPELAGO_SANITIZED=1)
  message(STATUS "archipelago: sanitizers ${ARCHIPELAGO_SANITIZE} on every target")
endif()
