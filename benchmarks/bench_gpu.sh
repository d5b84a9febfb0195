#!/usr/bin/env bash
# The GPU matrix of `lcm-edge bench` in one go, for a lent NVIDIA machine (CUDA 12, onnxruntime-gpu).
#
#   benchmarks/bench_gpu.sh BUNDLE_FP16 BUNDLE_FP32 SOURCE_DIR OUT
#
# BUNDLE_FP16 (lcm-edge export --precision fp16) runs on the CUDA and TensorRT execution providers
# (TensorRT takes the plain graph: it has no com.microsoft ops) and OpenVINO GPU where present;
# BUNDLE_FP32 gives the fp32 reference rows; SOURCE_DIR holds the files both were exported from
# (full_size_export.py's WORK/inputs), for the PyTorch rows on cuda. Rows whose hardware or
# provider is missing are listed as skipped with the reason, never as zero.
set -euo pipefail
fp16=$1 fp32=$2 src=$3 out=$4
python -m pip install -q 'onnxruntime-gpu>=1.17' >/dev/null
source_args=(--torch-source "base=$src/personalized.safetensors" "base_folder=$src/sd15"
             "motion_module=$src/AnimateLCM_sd15_t2v.ckpt" "lora=$src/AnimateLCM_sd15_t2v_lora.safetensors:0.8")
python -m lcm_edge bench --bundle "$fp16" --reference-bundle "$fp32" \
    --runtime onnxruntime:cuda onnxruntime:tensorrt openvino:GPU pytorch:cuda pytorch-compile:cuda \
    --size 256x256x8 512x512x16 --warmup 2 --runs 3 --timeout 1800 "${source_args[@]}" --out "$out"
