"""Data-parallel calibration: 2 gloo processes give the single-process statistics and plan,
also with unequal shares and with DDP- and FSDP2-wrapped models; every rank ends with every
sample's squared gradient norms, in rank order."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from _dist_worker import CASES, GATHER_LENGTHS, SAMPLES, run
from models import batches_of, random_samples, tiny_llama

import fimlora


@pytest.fixture(scope="module")
def rank_outputs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("dist")
    mp.spawn(run, args=(2, str(directory / "init"), str(directory)), nprocs=2, join=True)
    outputs = {
        case: [torch.load(directory / f"{case[0]}-{case[1]}-{rank}.pt", weights_only=False) for rank in range(2)]
        for case in CASES
    }
    outputs["gather"] = [torch.load(directory / f"gather-{rank}.pt") for rank in range(2)]
    outputs["auto"] = [torch.load(directory / f"auto-{rank}.pt", weights_only=False) for rank in range(2)]
    return outputs


@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_two_ranks_equal_one_process(rank_outputs, case):
    reference = fimlora.calibrate(
        tiny_llama(), batches_of(random_samples(SAMPLES, seed=11), 4), num_batches=2, progress=False
    )
    plan = fimlora.make_plan(reference, base_rank=4)
    for out in rank_outputs[case]:
        assert out["settings"]["samples"] == SAMPLES and out["settings"]["world_size"] == 2
        assert out["ranks"] == plan.ranks, "every rank must compute the single-process plan"
        for name, stats in reference.stats.items():
            count, mean, m2 = out["stats"][name]
            assert count == stats.count == SAMPLES
            torch.testing.assert_close(mean, stats.mean, rtol=1e-4, atol=1e-10)
            torch.testing.assert_close(m2, stats.m2, rtol=1e-4, atol=1e-12)
    # the norms: rank 0's samples, then rank 1's, identical on both ranks
    # (shares gives rank 0 samples[0::2] and rank 1 samples[1::2], or samples[:3] and samples[3:])
    order = [*range(0, SAMPLES, 2), *range(1, SAMPLES, 2)] if case[0] == "equal" else list(range(SAMPLES))
    for name, stats in reference.stats.items():
        gathered = [out["sample_sq"][name] for out in rank_outputs[case]]
        assert torch.equal(gathered[0], gathered[1]), f"{name}: the ranks disagree on the norms"
        torch.testing.assert_close(gathered[0], stats.sample_sq()[order], rtol=1e-4, atol=1e-12)


def test_gather_of_variable_length_norms(rank_outputs):
    for gathered in rank_outputs["gather"]:
        for layer, (lengths, norms) in enumerate(zip(GATHER_LENGTHS, gathered, strict=True)):
            expected = torch.cat([100.0 * r + 10 * layer + torch.arange(n, dtype=torch.float32)
                                  for r, n in enumerate(lengths)])
            assert torch.equal(norms, expected), f"layer {layer}: {norms} != {expected}"


def test_mpi_launch_without_accelerate_names_the_fix(monkeypatch):
    """`accelerate launch --cpu` starts processes with mpirun, which sets only its own variables."""
    from fimlora.cli import launch

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    monkeypatch.setitem(__import__("sys").modules, "accelerate", None)  # as if not installed
    assert launch.launched_world_size() == 2
    with pytest.raises(RuntimeError, match="pip install accelerate"):
        launch.init_from_environment()
    assert not torch.distributed.is_initialized()


def test_auto_stop_is_decided_together(rank_outputs):
    first, second = rank_outputs["auto"]
    print(f"auto stop with 2 ranks: {first['stop']['batches']} batches each ({first['stop']['why']}), "
          f"{first['samples']} samples in all")
    assert first["stop"] == second["stop"] and first["ranks"] == second["ranks"]
    assert first["samples"] == 2 * 4 * first["stop"]["batches"]  # both ranks ran the same batches
