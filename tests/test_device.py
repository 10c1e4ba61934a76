"""One device helper, one dtype table, and the warning for half precision on a CPU without
native bf16 support."""

from __future__ import annotations

import warnings

import pytest
import torch

import qatune.utils.device as device
from qatune.train.runtime import pick_precision


@pytest.fixture
def no_native_bf16(monkeypatch):
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: False)
    device.warn_slow_cpu_precision.cache_clear()
    yield
    device.warn_slow_cpu_precision.cache_clear()


def test_half_precision_on_a_cpu_without_bf16_warns_once_with_the_measured_slowdown(no_native_bf16):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        device.warn_slow_cpu_precision("fp32")
        assert not caught
        device.warn_slow_cpu_precision("bf16")
        device.warn_slow_cpu_precision("bf16")
    assert len(caught) == 1
    assert "AVX512-BF16/AMX" in str(caught[0].message) and "~30x slower" in str(caught[0].message)


def test_auto_precision_is_fp32_on_cpu_and_names_are_checked():
    assert pick_precision("auto", torch.device("cpu")) == "fp32"
    assert device.dtype_of("bf16") is torch.bfloat16
    with pytest.raises(ValueError, match="precision 'fp8' is not one of fp32, bf16, fp16"):
        device.dtype_of("fp8")
    assert device.default_device("cpu") == torch.device("cpu")
