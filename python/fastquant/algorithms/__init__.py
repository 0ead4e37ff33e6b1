"""Algorithms on weights: the int8/int4 rounding grids and GPTQ, pruning masks (magnitude, Wanda, SparseGPT) and
their calibration, and knowledge distillation of compressed models."""
