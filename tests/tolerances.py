"""The one tolerance table (STYLE.md): rtol = atol per dtype."""

import torch

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}
REDUCED_FLOAT32 = 2e-4  # float32 after a reduction over N >= 2^16


def tolerance(dtype: torch.dtype, reduced_over: int = 0) -> dict[str, float]:
    """Keyword arguments for torch.testing.assert_close."""
    value = TOLERANCE[dtype]
    if dtype == torch.float32 and reduced_over >= 2**16:
        value = REDUCED_FLOAT32
    return {"rtol": value, "atol": value}
