"""Run by tests/test_distillation.py under ``torchrun``: distills a tiny seeded Llama and saves the student's
trained weights (rank 0), so the test can compare N processes with one."""

from __future__ import annotations

import sys

import torch

from fastquant import SparseLinear
from fastquant.algorithms.distillation import DistillConfig, distill, init_distributed
from helpers import tiny_llama_config


def tiny_pair(seed: int = 0):
    """A tiny Llama (teacher) and its 50% magnitude-pruned sparse copy (student), the same on every process."""
    import copy

    import transformers

    import fastquant

    torch.manual_seed(seed)
    config = tiny_llama_config(
        num_key_value_heads=4,
        vocab_size=128,
        tie_word_embeddings=True,
        # Larger than Llama's 0.02: a random model with confident next-token distributions, so that pruning moves
        # them measurably and distillation has something to recover.
        initializer_range=0.2,
    )
    teacher = transformers.LlamaForCausalLM(config).eval()
    student = fastquant.patch(
        copy.deepcopy(teacher), "sparse", sparsity=0.5, pruning="magnitude", sparse_kernel="sparse", progress=False
    )
    return teacher, student


def tiny_data(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (16, 16), generator=torch.Generator().manual_seed(seed))


def trained_weights(student: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: module.dequantize() for name, module in student.named_modules() if isinstance(module, SparseLinear)}


def main(out: str) -> None:
    torch.set_num_threads(1)
    rank, _ = init_distributed()
    teacher, student = tiny_pair()
    config = DistillConfig(
        max_steps=3, batch_size=4, micro_batch_size=1, seq_len=16, lr=1e-3, warmup_steps=0, progress=False
    )
    result = distill(student, teacher, tiny_data(), config)
    if rank == 0:
        torch.save({"weights": trained_weights(student), "losses": result.losses, "world": result.world_size}, out)


if __name__ == "__main__":
    main(sys.argv[1])
