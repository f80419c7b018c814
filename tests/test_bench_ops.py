"""bench/ops: --device cuda on a machine without CUDA is a usage error, not a traceback."""

import pytest
import torch

from bench.ops import bench_ops, bench_sparse


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("bench", [bench_ops, bench_sparse], ids=["bench_ops", "bench_sparse"])
def test_cuda_without_a_cuda_device_is_refused_with_a_message(bench, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--device", "cuda"])
    assert exit_.value.code == 2
    assert "--device cuda: torch here has no CUDA device" in capsys.readouterr().err
