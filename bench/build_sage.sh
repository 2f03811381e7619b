#!/usr/bin/env bash
# Build SageAttention 2's Hopper kernels for the benchmarks: only the sm90 extension (int8 Q·Kᵀ, fp8 P·V with fp32
# accumulation) and the fused quantisation kernels, not the sm80/sm89 ones its setup.py also builds on an H100.
# Not part of the product.
#
#   bench/build_sage.sh SRC      SRC holds csrc/ and sageattention/ of a SageAttention checkout; the extensions
#                                land in SRC/sageattention, so PYTHONPATH=SRC makes ``import sageattention`` work.
set -euo pipefail
cd "$1"
MAX_JOBS=${MAX_JOBS:-8} python3 - <<'PY'
import sys

import torch
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CUDAExtension

abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
cxx = ["-O3", "-fopenmp", "-lgomp", "-std=c++17", "-DENABLE_BF16", abi]
nvcc = ["-O3", "-std=c++17", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__", "--use_fast_math",
        "--threads=8", "-diag-suppress=174", abi, "-gencode", "arch=compute_90a,code=sm_90a"]
sys.argv = ["setup.py", "build_ext", "--inplace"]
setup(name="sageattention", cmdclass={"build_ext": BuildExtension}, ext_modules=[
    CUDAExtension("sageattention._qattn_sm90", ["csrc/qattn/pybind_sm90.cpp", "csrc/qattn/qk_int_sv_f8_cuda_sm90.cu"],
                  extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=["-lcuda"]),
    CUDAExtension("sageattention._fused", ["csrc/fused/pybind.cpp", "csrc/fused/fused.cu"],
                  extra_compile_args={"cxx": cxx, "nvcc": nvcc}),
])
PY
ls -la sageattention/*.so
