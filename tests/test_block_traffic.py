"""``benchmarks/block_traffic.py`` counts the bytes of inductor's kernels exactly, by kind."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "block_traffic.py"


def load_script():
    sys.path.insert(0, str(SCRIPT.parent))  # its sibling results_md
    try:
        spec = importlib.util.spec_from_file_location("block_traffic", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return module


@pytest.mark.filterwarnings("ignore:dynamo_pgo force disabled")  # the counter turns caches off
def test_counts_one_read_and_one_write_per_fused_kernel_and_the_matmul_operands() -> None:
    script = load_script()
    x, a, w = torch.randn(1 << 16), torch.randn(128, 64), torch.randn(64, 32)
    # two elementwise ops fuse into one kernel; relu fuses with nothing before the matmul, so it reads it back
    fn = torch.compile(lambda x, a, w: ((x * 2 + 1).sin(), (a @ w).relu()))
    traffic = script.count_traffic(lambda: fn(x, a, w))
    assert traffic["generated"] == 4 * (2 * x.numel() + 2 * 128 * 32)
    assert traffic["generated kernels"] == 2
    assert traffic["matmul/attention"] == 4 * (a.numel() + w.numel() + 128 * 32)
    assert traffic["matmul/attention kernels"] == 1
    assert "fallback" not in traffic
