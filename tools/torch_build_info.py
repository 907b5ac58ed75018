"""What CMakeLists.txt needs to know about the installed torch, one KEY=value per line.

Lists are comma-separated (CMake turns them into lists).  Like torch.utils.cpp_extension, the
include directories and libraries come from the torch package itself; for a CUDA torch, the
include/ and lib/ folders of its pip ``nvidia`` dependencies (cuBLAS, cuSPARSE, nvrtc, ...) are
listed too, since a machine with only nvcc has no other copy of those headers.
"""
import glob
import os
import sys


def main():
    import torch
    import pybind11
    from torch.utils import cpp_extension

    torch_dir = os.path.dirname(torch.__file__)
    info = {
        "TORCH_VERSION": torch.__version__,
        "TORCH_CUDA_VERSION": str(torch.version.cuda),
        "TORCH_CXX11_ABI": str(int(torch._C._GLIBCXX_USE_CXX11_ABI)),
        "TORCH_INCLUDE_DIRS": ",".join(cpp_extension.include_paths("cpu")),
        "TORCH_LIB_DIR": os.path.join(torch_dir, "lib"),
        "PYBIND11_CMAKE_DIR": pybind11.get_cmake_dir(),
    }
    inc, lib = [], []
    if torch.version.cuda is not None:
        try:
            import nvidia  # namespace package of the pip CUDA libraries (nvidia-cublas, ..., or nvidia/cu13)
            roots = list(nvidia.__path__)
        except ImportError:
            roots = []
        for root in roots:
            inc += sorted(glob.glob(os.path.join(root, "*", "include")))
            lib += sorted(glob.glob(os.path.join(root, "*", "lib")))
    info["NVIDIA_PIP_INCLUDE_DIRS"] = ",".join(inc)
    info["NVIDIA_PIP_LIB_DIRS"] = ",".join(lib)
    for k, v in info.items():
        if "\n" in v:
            sys.exit(f"torch_build_info: {k} has a newline: {v!r}")
        print(f"{k}={v}")


if __name__ == "__main__":
    main()
