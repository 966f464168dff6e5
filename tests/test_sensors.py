"""Power sensors against fake sysfs trees with the real layouts, and energy integration over
known power traces (fake clocks, so nothing depends on timing)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from embedded.sensors import (
    EnergyMeter,
    NullSensor,
    SensorError,
    counter_delta,
    detect,
    integrate_counter,
    integrate_power,
)
from embedded.sensors.ina219 import INA219Sensor
from embedded.sensors.jetson import JetsonINA3221
from embedded.sensors.rapl import RaplSensor
from embedded.sensors.system import system_info


def write(root, rel: str, value) -> None:
    p = os.path.join(str(root), rel)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    with open(p, "w") as f:
        f.write(f"{value}\n")


def nano_tree(root, input_index: int = 0):
    """Jetson Nano, L4T 32: legacy ina3221x IIO device (powers in mW)."""
    d = "sys/bus/i2c/drivers/ina3221x/6-0040/iio:device0"
    names = ["POM_5V_GPU", "POM_5V_CPU"]
    names.insert(input_index, "POM_5V_IN")
    powers = {"POM_5V_IN": 3120, "POM_5V_GPU": 480, "POM_5V_CPU": 1210}
    for i, n in enumerate(names):
        write(root, f"{d}/rail_name_{i}", n)
        write(root, f"{d}/in_power{i}_input", powers[n])
        write(root, f"{d}/in_voltage{i}_input", 5000 if n == "POM_5V_IN" else 4950)
        write(root, f"{d}/in_current{i}_input", powers[n] * 1000 // 5000)
        write(root, f"{d}/crit_current_limit_{i}", 4000)
        write(root, f"{d}/warn_current_limit_{i}", 3000)
    write(root, f"{d}/name", "ina3221x")
    write(root, f"{d}/running_mode", 1)
    return os.path.join(str(root), d), names.index("POM_5V_IN")


def orin_tree(root, hwmon: int = 3, with_second_device: bool = True):
    """Jetson Orin Nano, JetPack 6: mainline ina3221 hwmon (bus mV, current mA)."""
    d = f"sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon{hwmon}"
    rails = {1: ("VDD_IN", 5056, 1232), 2: ("VDD_CPU_GPU_CV", 5040, 300),
             3: ("VDD_SOC", 5048, 410)}
    write(root, f"{d}/name", "ina3221")
    for ch, (label, mv, ma) in rails.items():
        write(root, f"{d}/in{ch}_label", label)
        write(root, f"{d}/in{ch}_input", mv)
        write(root, f"{d}/curr{ch}_input", ma)
        write(root, f"{d}/curr{ch}_crit", 32760)
        write(root, f"{d}/curr{ch}_max", 32760)
        write(root, f"{d}/in{ch + 3}_input", 10)   # shunt voltages, unlabelled
        write(root, f"{d}/in{ch}_enable", 1)
    write(root, f"{d}/in7_input", 30)
    write(root, f"{d}/curr4_input", 1900)          # sum of shunt currents, not a rail
    write(root, f"{d}/update_interval", 1000)
    if with_second_device:
        d2 = "sys/bus/i2c/drivers/ina3221/1-0041/hwmon/hwmon4"
        write(root, f"{d2}/in1_label", "VDDQ_VDD2_1V8AO")
        write(root, f"{d2}/in1_input", 1800)
        write(root, f"{d2}/curr1_input", 20)
    return os.path.join(str(root), d)


def rapl_tree(root, psys: bool = False, energy=(1000, 2000, 3000, 4000, 5000)):
    base = "sys/class/powercap"
    write(root, f"{base}/intel-rapl/enabled", 1)
    zones = {"intel-rapl:0": "package-0", "intel-rapl:0:0": "core", "intel-rapl:0:1": "uncore",
             "intel-rapl:0:2": "dram", "intel-rapl:1": "package-1"}
    for (z, name), e in zip(zones.items(), energy, strict=True):
        write(root, f"{base}/{z}/name", name)
        write(root, f"{base}/{z}/energy_uj", e)
        write(root, f"{base}/{z}/max_energy_range_uj", 262143328850)
        write(root, f"{base}/{z}/enabled", 1)
    if psys:
        write(root, f"{base}/intel-rapl:2/name", "psys")
        write(root, f"{base}/intel-rapl:2/energy_uj", 7)
        write(root, f"{base}/intel-rapl:2/max_energy_range_uj", 262143328850)
    return os.path.join(str(root), base)


# --- Jetson -----------------------------------------------------------------------------------
@pytest.mark.parametrize("idx", [0, 2])
def test_jetson_legacy_reads_the_input_rail_only(tmp_path, idx):
    d, ch = nano_tree(tmp_path, idx)
    s = JetsonINA3221(root=str(tmp_path))
    assert (s.driver, s.rail) == ("ina3221x", "POM_5V_IN")
    assert s.read_power_w() == pytest.approx(3.120)          # not 3.12 + 0.48 + 1.21
    write(tmp_path, os.path.relpath(f"{d}/in_power{ch}_input", tmp_path), 4500)
    assert s.read_power_w() == pytest.approx(4.5)
    assert s.describe()["rails"] == ["POM_5V_CPU", "POM_5V_GPU", "POM_5V_IN"]


def test_jetson_legacy_without_power_file_uses_voltage_times_current(tmp_path):
    d, ch = nano_tree(tmp_path)
    os.remove(f"{d}/in_power{ch}_input")
    assert JetsonINA3221(root=str(tmp_path)).read_power_w() == pytest.approx(5.0 * 0.624)


@pytest.mark.parametrize("hwmon", [1, 3, 7])
def test_jetson_hwmon_globs_the_index_and_multiplies_mv_by_ma(tmp_path, hwmon):
    orin_tree(tmp_path, hwmon)
    s = JetsonINA3221(root=str(tmp_path))
    assert (s.driver, s.rail) == ("hwmon", "VDD_IN")
    assert s.path.endswith(f"1-0040/hwmon/hwmon{hwmon}")
    assert s.read_power_w() == pytest.approx(5.056 * 1.232)


def test_jetson_rail_choice_errors_and_override(tmp_path):
    d = "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon0"
    for ch, label in ((1, "VDD_GPU_SOC"), (2, "VDD_CPU_CV")):
        write(tmp_path, f"{d}/in{ch}_label", label)
        write(tmp_path, f"{d}/in{ch}_input", 5000)
        write(tmp_path, f"{d}/curr{ch}_input", 100 * ch)
    with pytest.raises(SensorError, match=r"no input rail .*VDD_CPU_CV.*pass rail=NAME"):
        JetsonINA3221(root=str(tmp_path))
    s = JetsonINA3221(root=str(tmp_path), rail="VDD_CPU_CV")
    assert s.read_power_w() == pytest.approx(1.0)
    with pytest.raises(SensorError, match="rail 'VDD_X' not found"):
        JetsonINA3221(root=str(tmp_path), rail="VDD_X")
    with pytest.raises(SensorError, match="no ina3221"):
        JetsonINA3221(root=str(tmp_path / "empty"))


def test_jetson_nonsense_value_is_a_clear_error(tmp_path):
    d = orin_tree(tmp_path, with_second_device=False)
    s = JetsonINA3221(root=str(tmp_path))
    with open(f"{d}/curr1_input", "w") as f:
        f.write("garbage\n")
    with pytest.raises(SensorError, match="curr1_input: expected a number"):
        s.read_power_w()


# --- RAPL -------------------------------------------------------------------------------------
def test_rapl_sums_packages_and_dram_not_subzones(tmp_path):
    base = rapl_tree(tmp_path)
    s = RaplSensor(root=str(tmp_path))
    assert sorted(s.names) == ["dram", "package-0", "package-1"]
    assert s.read_energy_j() == 0.0
    # +1 J package-0, +0.5 J core (inside the package), +0.25 J dram, +2 J package-1
    for z, e in (("intel-rapl:0", 1_001_000), ("intel-rapl:0:0", 502_000),
                 ("intel-rapl:0:2", 254_000), ("intel-rapl:1", 2_005_000)):
        write(tmp_path, os.path.relpath(f"{base}/{z}/energy_uj", tmp_path), e)
    assert s.read_energy_j() == pytest.approx(3.25)


def test_rapl_prefers_psys(tmp_path):
    rapl_tree(tmp_path, psys=True)
    assert RaplSensor(root=str(tmp_path)).names == ["psys"]


def test_rapl_wraparound(tmp_path):
    base = rapl_tree(tmp_path)
    mx = 262143328850
    write(tmp_path, os.path.relpath(f"{base}/intel-rapl:0/energy_uj", tmp_path), mx - 1_000_000)
    s = RaplSensor(root=str(tmp_path))
    write(tmp_path, os.path.relpath(f"{base}/intel-rapl:0/energy_uj", tmp_path), 2_000_000)
    assert s.read_energy_j() == pytest.approx(3.0)   # 1 J to the wrap point + 2 J after it
    assert counter_delta(10, 5, 100) == 95 and counter_delta(5, 10, 100) == 5


def test_rapl_missing(tmp_path):
    with pytest.raises(SensorError, match="no intel-rapl zones"):
        RaplSensor(root=str(tmp_path))


# --- INA219 / INA260 --------------------------------------------------------------------------
class FakeBus:
    """smbus2.SMBus stand-in: big-endian 16-bit registers of one device."""

    def __init__(self, address: int, regs: dict[int, int]) -> None:
        self.address, self.regs = address, regs

    def read_i2c_block_data(self, addr, reg, n):
        if addr != self.address:
            raise OSError(121, "Remote I/O error")
        v = self.regs[reg]
        return [v >> 8 & 0xFF, v & 0xFF]


def test_ina219_power_from_shunt_and_bus_registers():
    # 5.000 V bus: 5.0 / 4 mV = 1250, stored in bits 15..3; 0.5 A through 0.1 ohm = 50 mV shunt
    # = 5000 LSB of 10 uV
    bus = FakeBus(0x40, {0x02: 1250 << 3 | 0b10, 0x01: 5000})
    s = INA219Sensor(smbus=bus, shunt_ohms=0.1)
    assert s.read_bus_voltage_v() == pytest.approx(5.0)
    assert s.read_current_a() == pytest.approx(0.5)
    assert s.read_power_w() == pytest.approx(2.5)
    bus.regs[0x01] = 0x10000 - 5000          # two's complement: current flowing back
    assert s.read_current_a() == pytest.approx(-0.5)


def test_ina260_uses_its_power_register():
    bus = FakeBus(0x41, {0x01: 400, 0x02: 4000, 0x03: 250})
    s = INA219Sensor(smbus=bus, address=0x41, chip="ina260")
    assert s.read_power_w() == pytest.approx(2.5)
    assert s.read_bus_voltage_v() == pytest.approx(5.0)
    assert s.read_current_a() == pytest.approx(0.5)


def test_ina219_errors(tmp_path):
    with pytest.raises(SensorError, match="failed"):
        INA219Sensor(smbus=FakeBus(0x40, {}), address=0x45)
    with pytest.raises(SensorError, match="dev/i2c-1 does not exist"):
        INA219Sensor(root=str(tmp_path))
    write(tmp_path, "dev/i2c-1", "")
    try:
        import smbus2  # noqa: F401
    except ImportError:
        with pytest.raises(SensorError, match="smbus2 is not installed"):
            INA219Sensor(root=str(tmp_path))


# --- detection --------------------------------------------------------------------------------
def test_detect(tmp_path):
    assert isinstance(detect("auto", root=str(tmp_path)), NullSensor)
    with pytest.raises(SensorError):
        detect("jetson-ina3221", root=str(tmp_path))
    with pytest.raises(SensorError, match="expected one of"):
        detect("thermometer")
    orin_tree(tmp_path / "orin")
    assert detect("auto", root=str(tmp_path / "orin")).kind == "jetson-ina3221"
    rapl_tree(tmp_path / "x86")
    assert detect("auto", root=str(tmp_path / "x86")).kind == "rapl"
    assert detect("none").kind == "none"


# --- integration ------------------------------------------------------------------------------
class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_integrate_power_is_exact_for_piecewise_linear_traces():
    t = [0.0, 1.0, 2.0, 4.0]
    p = [1.0, 3.0, 3.0, 1.0]
    # by hand: [0,1] 2 J, [1,2] 3 J, [2,4] 4 J
    assert integrate_power(t, p, 0.0, 4.0) == pytest.approx(9.0)
    # window edges inside segments: [0.5,1] avg(2,3)*.5 = 1.25; [1,2] 3; [2,3] avg(3,2) = 2.5
    assert integrate_power(t, p, 0.5, 3.0) == pytest.approx(6.75)
    # beyond the trace the last value is held
    assert integrate_power(t, p, 4.0, 6.0) == pytest.approx(2.0)
    assert integrate_counter([0.0, 2.0], [10.0, 14.0], 0.5, 1.5) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        integrate_power(t, p, 2.0, 1.0)


def test_meter_on_a_jetson_tree_with_idle_baseline(tmp_path):
    """Power written to in_power0_input as a fake clock advances: 2 W idle, then a ramp
    P(t) = 2 + t W for the work; energy over [1, 5] is 2*4 + (5^2 - 1^2)/2 = 20 J."""
    d, ch = nano_tree(tmp_path)
    path = f"{d}/in_power{ch}_input"
    clock = FakeClock()
    meter = EnergyMeter(JetsonINA3221(root=str(tmp_path)), clock=clock)

    def set_power(w: float) -> None:
        with open(path, "w") as f:
            f.write(f"{int(round(w * 1000))}\n")

    set_power(2.0)
    clock.t = -3.0

    def fake_sleep(s: float) -> None:   # idle: 2 W, sampled every 0.25 s
        end = clock.t + s
        while clock.t < end - 1e-9:
            clock.t += 0.25
            meter.sample()

    assert meter.measure_idle(2.0, sleep=fake_sleep) == pytest.approx(2.0)
    clock.t = 1.0
    set_power(3.0)
    t0 = meter.begin()
    ts, ps = [1.0], [3.0]
    while clock.t < 5.0 - 1e-9:
        clock.t += 0.125
        set_power(2.0 + clock.t)
        meter.sample()
        ts.append(clock.t)
        ps.append(2.0 + clock.t)
    r = meter.end(t0)
    assert r.energy_j == pytest.approx(20.0, abs=1e-3)   # mW resolution of the sysfs file
    assert r.energy_j == pytest.approx(float(np.trapezoid(ps, ts)), abs=1e-3)
    assert r.idle_energy_j == pytest.approx(8.0)
    assert r.dynamic_energy_j == pytest.approx(12.0, abs=1e-3)
    assert r.duration_s == pytest.approx(4.0) and r.mean_power_w == pytest.approx(5.0, abs=1e-3)
    assert r.provenance == "measured" and r.sensor == "jetson-ina3221"
    assert r.samples == len(ts) + 1   # begin's own sample, the loop's, and end's


def test_meter_on_rapl_counters_across_a_wrap(tmp_path):
    base = rapl_tree(tmp_path)
    rel = os.path.relpath(f"{base}/intel-rapl:0/energy_uj", tmp_path)
    mx = 262143328850
    e = mx - 3_000_000
    write(tmp_path, rel, e)
    clock = FakeClock()
    meter = EnergyMeter(RaplSensor(root=str(tmp_path)), clock=clock)
    t0 = meter.begin()
    for _ in range(6):                  # 2 W for 3 s in 0.5 s steps, wrapping after 1.5 s
        clock.t += 0.5
        e = (e + 1_000_000) % mx
        write(tmp_path, rel, e)
        meter.sample()
    r = meter.end(t0)
    assert r.energy_j == pytest.approx(6.0)
    assert r.mean_power_w == pytest.approx(2.0)
    assert r.dynamic_energy_j is None     # no idle baseline measured


def test_meter_background_thread_with_constant_power(tmp_path):
    orin_tree(tmp_path)
    meter = EnergyMeter(JetsonINA3221(root=str(tmp_path)), period_s=0.005).start()
    try:
        t0 = meter.begin()
        import time
        time.sleep(0.1)
        r = meter.end(t0)
    finally:
        meter.stop()
    assert r.samples >= 2
    assert r.energy_j == pytest.approx(5.056 * 1.232 * r.duration_s)


def test_meter_without_sensor_is_estimated():
    meter = EnergyMeter(NullSensor()).start()
    assert meter.measure_idle(0.0) is None
    r = meter.end(meter.begin())
    meter.stop()
    assert r.energy_j is None and r.provenance == "estimated"


# --- system info ------------------------------------------------------------------------------
def test_system_info_from_a_pi_like_tree(tmp_path):
    write(tmp_path, "proc/cpuinfo", "processor\t: 0\nBogoMIPS\t: 108.00\nCPU implementer\t: "
          "0x41\nCPU part\t: 0xd08\n\nHardware\t: BCM2835\nModel\t: Raspberry Pi 4 Model B "
          "Rev 1.4")
    write(tmp_path, "proc/meminfo", "MemTotal:        3884096 kB\nMemFree:  100 kB\n"
          "MemAvailable:    3000000 kB\n")
    write(tmp_path, "proc/device-tree/model", "Raspberry Pi 4 Model B Rev 1.4\x00")
    write(tmp_path, "sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq", 1500000)
    write(tmp_path, "sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq", 1800000)
    write(tmp_path, "sys/class/thermal/thermal_zone0/type", "cpu-thermal")
    write(tmp_path, "sys/class/thermal/thermal_zone0/temp", 48312)
    write(tmp_path, "sys/devices/platform/soc/soc:firmware/get_throttled", "50005")
    info = system_info(str(tmp_path))
    assert info["cpu_model"] == "Raspberry Pi 4 Model B Rev 1.4"
    assert info["board_model"] == "Raspberry Pi 4 Model B Rev 1.4"
    assert info["memory"] == {"total_bytes": 3884096 * 1024, "available_bytes": 3000000 * 1024}
    assert info["freq"]["cur_mhz"] == 1500 and info["freq"]["max_mhz"] == 1800
    assert info["temperature_c"] == {"cpu-thermal": pytest.approx(48.312)}
    th = info["throttling"]
    assert th["under_voltage"] and th["throttled"] and not th["freq_capped"]
    assert th["under_voltage_occurred"] and th["throttled_occurred"]
    empty = system_info(str(tmp_path / "nothing"))
    assert empty["memory"]["total_bytes"] is None and empty["throttling"] is None
