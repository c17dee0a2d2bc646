# What CMake needs to know about the PyTorch this interpreter imports, for
# the python build flavour (cmake/TorchFlavour.cmake, docs/devices.md "Build
# flavours"): one key=value a line. Importing torch is the only reliable
# source: a wheel's libtorch carries no version file of its own, and the C++
# ABI it was built with is known only to torch._C.
import os
import sys

try:
    import torch
except Exception as e:  # not installed, or an installation that fails to load
    lines = str(e).splitlines()
    print("error=cannot import torch: %s" % (lines[0] if lines else type(e).__name__))
    sys.exit(1)

root = os.path.dirname(os.path.abspath(torch.__file__))
print("version=%s" % torch.__version__)
print("root=%s" % root)
print("cmake_prefix_path=%s" % torch.utils.cmake_prefix_path)
# None for a CPU-only build; ROCm builds set version.hip and drive their
# GPUs through the cuda device type.
print("cuda=%s" % (torch.version.cuda or ""))
print("hip=%s" % (getattr(torch.version, "hip", None) or ""))
print("cxx11_abi=%d" % int(torch._C._GLIBCXX_USE_CXX11_ABI))
# Folders of the CUDA libraries pip installs beside torch (nvidia-*): the
# linker needs them to check libtorch_cuda's own dependencies.
site = os.path.dirname(root)
nvidia = os.path.join(site, "nvidia")
dirs = []
if os.path.isdir(nvidia):
    for dirpath, dirnames, _ in os.walk(nvidia):
        if os.path.basename(dirpath) == "lib":
            dirs.append(dirpath)
            dirnames[:] = []
print("nvidia_lib_dirs=%s" % ";".join(sorted(dirs)))
