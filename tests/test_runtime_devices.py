"""Device choice per process and CUDA RNG states that do not depend on the machine's GPU count."""
import pytest
import torch

from protomem_plugin.train.runtime import capture_rng_state, cuda_state_for_this_device, local_device, restore_rng_state


def test_local_device_follows_what_the_process_sees():
    assert local_device(3, 0) == torch.device("cpu")
    assert local_device(5, 1) == torch.device("cuda", 0)  # one GPU per process (SLURM binding)
    assert local_device(5, 8) == torch.device("cuda", 5)
    with pytest.raises(RuntimeError, match="LOCAL_RANK 5 but this process sees only 4 GPUs"):
        local_device(5, 4)


def test_cuda_state_from_checkpoints_of_machines_with_other_gpu_counts():
    one = torch.arange(16, dtype=torch.uint8)
    eight = [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]
    assert cuda_state_for_this_device({"cuda_device": one}, 3) is one
    assert torch.equal(cuda_state_for_this_device({"cuda": eight}, 3), eight[3])  # older layout
    assert torch.equal(cuda_state_for_this_device({"cuda": eight[:2]}, 5), eight[0])  # fewer GPUs saved
    assert cuda_state_for_this_device({"cuda": []}, 0) is None
    assert cuda_state_for_this_device({}, 0) is None


def test_rng_state_round_trip_and_old_multi_gpu_layout_loads_on_cpu():
    state = capture_rng_state()
    expected = torch.rand(3)
    restore_rng_state(state)
    assert torch.equal(torch.rand(3), expected)
    # a checkpoint written on an 8-GPU machine restores here (no GPU) without error
    restore_rng_state({**state, "cuda": [torch.zeros(16, dtype=torch.uint8)] * 8}, local_rank=6)
    assert torch.equal(torch.rand(3), expected)
