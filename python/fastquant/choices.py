"""Names and defaults shared by the Python API and the command line, importable without torch (so that
``fastquant --help`` lists them in a fraction of a second)."""

from __future__ import annotations

PRUNING_METHODS = ("magnitude", "global-magnitude", "wanda", "sparsegpt")
CALIBRATED_METHODS = ("wanda", "sparsegpt")
# The one default of fastquant.patch, fastquant.prune and the CLI. Calibrated: magnitude pruning at 50% takes
# SmolLM2-135M to 12.6x the float perplexity, SparseGPT to 1.26x (benchmarks/results/pruning-accuracy-*.md).
DEFAULT_PRUNING = "sparsegpt"
# 256-token windows of the embedded text when no calibration is given.
DEFAULT_CALIBRATION_SEQUENCES = 32

# The compression methods of `fastquant demo/eval/compress` (fastquant.app.evaluate.METHODS implements them).
# The demo runs the quick ones by default; the calibrated ones cost minutes each (measured in the README).
QUICK_METHODS = ("int8", "int8+lm_head", "int4")
CALIBRATED_CLI_METHODS = ("int8-gptq", "int4-gptq", "sparse", "int8+sparse")
CLI_METHODS = QUICK_METHODS + CALIBRATED_CLI_METHODS
