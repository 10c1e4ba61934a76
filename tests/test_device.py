"""One device helper, one dtype table, and the warning for bf16 on a CPU whose bf16 matmul
measured slower than fp32 (the probe `precision: auto` picks by: tests/test_precision_auto.py)."""

from __future__ import annotations

import warnings

import pytest
import torch

import qatune.utils.device as device
from qatune.utils.precision_probe import PrecisionChoice


def measured(monkeypatch, fp32: float, bf16: float) -> None:
    rates = {"fp32": fp32, "bf16": bf16}
    choice = PrecisionChoice("fp32", "auto", "measured", rates)
    monkeypatch.setattr(device, "cpu_choice", lambda: choice)
    device.warn_slow_cpu_precision.cache_clear()


def test_bf16_on_a_cpu_where_it_measured_slower_warns_once_with_the_rates(monkeypatch):
    measured(monkeypatch, fp32=100e9, bf16=25e9)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        device.warn_slow_cpu_precision("fp32")
        assert not caught
        device.warn_slow_cpu_precision("bf16")
        device.warn_slow_cpu_precision("bf16")
    device.warn_slow_cpu_precision.cache_clear()
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "measured 25 GFLOP/s against 100 in fp32" in message and "~30x slower" in message


def test_bf16_on_a_cpu_where_it_measured_faster_does_not_warn(monkeypatch):
    measured(monkeypatch, fp32=100e9, bf16=150e9)  # faster, if not enough for auto to pick it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        device.warn_slow_cpu_precision("bf16")
    device.warn_slow_cpu_precision.cache_clear()


def test_precision_names_are_checked():
    assert device.dtype_of("bf16") is torch.bfloat16
    with pytest.raises(ValueError, match="precision 'fp8' is not one of fp32, bf16, fp16"):
        device.dtype_of("fp8")
    assert device.default_device("cpu") == torch.device("cpu")
