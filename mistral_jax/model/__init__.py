"""The Mistral decoder (transformer.py) and its projections, whose weight type carries the
quantization (projections.py; FP8 under tensor parallelism in fp8_tp.py); the kernel each hot
operation runs is chosen once, in kernels.py."""
