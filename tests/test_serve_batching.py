"""fastquant.app.serve.batching without Ray: one generate call for several requests gives each its own answer."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from test_serialization import tiny_llama  # noqa: E402

from fastquant.app.serve.batching import Job, generate_batch  # noqa: E402

GREEDY = (("do_sample", False),)


def _alone(model, ids, max_new_tokens, eos):
    with torch.inference_mode():
        out = model.generate(ids[None], max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    tokens = out[0, ids.numel() :].tolist()
    end = next((k for k, t in enumerate(tokens) if t in eos), None)
    return tokens if end is None else tokens[: end + 1]


def test_batched_requests_match_each_request_alone():
    import fastquant

    model = fastquant.patch(tiny_llama(), "int8")
    g = torch.Generator().manual_seed(0)
    jobs = [Job(torch.randint(1, 512, (n,), generator=g), m, GREEDY) for n, m in ((5, 6), (17, 3), (1, 9), (9, 1))]
    eos = {7}  # rows that emit it end there, the others run to their own max_tokens
    done = generate_batch(model, 0, eos, jobs)
    assert [d.batch for d in done] == [4] * 4
    assert all(d.first_token_at is not None for d in done)
    for job, d in zip(jobs, done, strict=True):
        alone = _alone(model, job.ids, job.max_new_tokens, eos)
        assert d.tokens == alone and d.eos == (alone[-1] in eos)
        assert 1 <= len(d.tokens) <= job.max_new_tokens


def test_different_sampling_settings_go_in_separate_calls_and_a_failure_stays_in_its_call():
    import fastquant

    model = fastquant.patch(tiny_llama(), "int8")
    ids = torch.tensor([3, 4, 5])
    bad = (("do_sample", True), ("temperature", -1.0))  # generate refuses it
    done = generate_batch(model, 0, set(), [Job(ids, 4, GREEDY), Job(ids, 4, bad), Job(ids, 2, GREEDY)])
    assert [d.batch for d in done] == [2, 1, 2]
    assert done[1].error is not None and done[1].tokens == []
    assert done[0].error is None and done[0].tokens[:2] == done[2].tokens and len(done[0].tokens) == 4
