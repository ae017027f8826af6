"""`launcher.plugin.usage.CpuMeter`: the cpu_percent of VmStats from successive CPU-time readings."""

from __future__ import annotations

from launcher.plugin.usage import CpuMeter


def test_cpu_use_between_two_readings() -> None:
    meter = CpuMeter()
    assert meter.percent(10.0, vcpus=2, now=100.0) == -1  # nothing to compare with yet
    assert meter.percent(11.0, vcpus=2, now=101.0) == 50  # one CPU second in one second, of two vCPUs
    assert meter.percent(13.0, vcpus=2, now=102.0) == 100
    assert meter.percent(13.0, vcpus=2, now=102.0) == -1  # no time passed
    assert meter.percent(13.0, vcpus=2, now=104.0) == 0


def test_reset_starts_a_new_measurement() -> None:
    meter = CpuMeter()
    meter.percent(10.0, vcpus=1, now=1.0)
    meter.reset()
    assert meter.percent(50.0, vcpus=1, now=2.0) == -1  # another run of the VM: nothing to compare with
    assert meter.percent(50.5, vcpus=1, now=3.0) == 50


def test_a_reading_that_goes_back_is_not_negative_use() -> None:
    meter = CpuMeter()
    meter.percent(10.0, vcpus=1, now=1.0)
    assert meter.percent(5.0, vcpus=1, now=2.0) == -1
