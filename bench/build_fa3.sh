#!/usr/bin/env bash
# Build a minimal FlashAttention-3 (Hopper) extension for the benchmarks: forward only, head dim 128, bf16 and
# fp8 e4m3, no split / paged / softcap / local / varlen / cluster variants (so two instantiation files compile
# instead of ~450). Not part of the product: the engine uses FA3 when ``flash_attn_interface`` is importable,
# however it was installed (a full build: ``cd flash-attention/hopper && pip install .``).
#
#   bench/build_fa3.sh SRC          SRC holds hopper/ and csrc/cutlass/include of a flash-attention checkout
#                                   (its cutlass submodule at the commit it pins); the .so lands in SRC/hopper
# then:  PYTHONPATH=SRC/hopper python3 bench/probe_attention_libs.py --out DIR
#
# CUDA 13 toolkits work with flash-attention's setup.py since it stopped downloading nvcc 12.x for them (2026).
set -euo pipefail
src=$(cd "$1" && pwd)
cd "$src/hopper"
for f in BACKWARD SPLIT PAGEDKV APPENDKV LOCAL SOFTCAP PACKGQA FP16 VARLEN CLUSTER HDIM64 HDIM96 HDIM192 HDIM256 \
         HDIMDIFF64 HDIMDIFF192 SM80; do
  export "FLASH_ATTENTION_DISABLE_$f=TRUE"
done
export FLASH_ATTENTION_FORCE_BUILD=TRUE MAX_JOBS=${MAX_JOBS:-8} NVCC_THREADS=${NVCC_THREADS:-2}
python3 setup.py build_ext --inplace
ls -la flash_attn_3/
