"""systemd/infinitetalkd.service and the per-GPU template infinitetalkd@.service: they verify, their
hardening exposure stays at 3.0 or lower, and the template differs from the single unit only where a
per-GPU instance must."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.daemon.conftest import REPO

UNIT = REPO / "systemd" / "infinitetalkd.service"
TEMPLATE = REPO / "systemd" / "infinitetalkd@.service"
UNITS = pytest.mark.parametrize("unit", [UNIT, TEMPLATE], ids=["single", "template"])


def as_instance(unit: Path, tmp_path: Path, instance: str = "3") -> Path:
    """A copy systemd-analyze can load: the template under an instance name, ExecStart pointing at a
    binary that exists (verify insists on one); nothing else changed."""
    text = re.sub(r"^ExecStart=\S+", "ExecStart=/bin/true", unit.read_text(), flags=re.M)
    out = tmp_path / unit.name.replace("@.", f"@{instance}.")
    out.write_text(text)
    return out
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed (apt-get install systemd)")


def keys(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";")):
            k, v = line.split("=", 1)
            out.setdefault(k.strip(), []).append(v.strip())
    return out


@UNITS
def test_unit_has_the_contract(unit: Path) -> None:
    k = keys(unit.read_text())
    assert k["Type"] == ["notify"] and k["NotifyAccess"] == ["main"]
    assert k["Restart"] == ["on-failure"] and k["RestartPreventExitStatus"] == ["78"]
    assert "run --config" in k["ExecStart"][0]
    assert int(k["TimeoutStopSec"][0]) >= int(k["WatchdogSec"][0])  # a step fits in the stop timeout
    assert k["NoNewPrivileges"] == ["yes"] and k["ProtectSystem"] == ["strict"] and k["PrivateTmp"] == ["yes"]
    assert k["PrivateDevices"] == ["no"] and k["DevicePolicy"] == ["closed"]
    assert {"char-nvidiactl rw", "char-nvidia-uvm rw", "char-nvidia rw"} <= set(k["DeviceAllow"])
    assert k["ReadWritePaths"] and k["RequiresMountsFor"]
    for path in k["RequiresMountsFor"][0].split():
        assert any(path.startswith(p) or p.startswith(path) for p in k["ReadWritePaths"] + k["ReadOnlyPaths"])


    assert "ProcSubset" not in k  # hides /proc/driver/nvidia from the NVIDIA libraries (see the unit)
    assert k["IPAddressDeny"] == ["any"] and "localhost" in k["IPAddressAllow"]


def test_template_is_the_single_unit_per_gpu() -> None:
    single, per_gpu = keys(UNIT.read_text()), keys(TEMPLATE.read_text())
    env = dict(e.split("=", 1) for e in per_gpu["Environment"])
    assert env["INFINITETALKD_DEVICE"] == "cuda:%i"  # the worker name defaults to <host>/cuda:N
    assert env["INFINITETALKD_STATE"] == "/var/lib/infinitetalkd/%i"
    assert re.fullmatch(r"\d+%i", env["INFINITETALKD_METRICS_PORT"])
    assert per_gpu["StateDirectory"] == ["infinitetalkd infinitetalkd/%i"]  # shared + per instance
    assert per_gpu["CacheDirectory"] == ["infinitetalkd"]  # one cache for all GPUs
    # The database host of a fleet passes the IP filter; everything else is the single unit's.
    assert [a for a in per_gpu["IPAddressAllow"] if a != "localhost"]
    differ = {"Description", "Environment", "StateDirectory", "IPAddressAllow"}
    for key in set(single) | set(per_gpu):
        if key not in differ:
            assert single.get(key) == per_gpu.get(key), key
    assert set(e for e in single["Environment"]) <= set(per_gpu["Environment"])


@needs_analyze
@UNITS
def test_systemd_analyze_verify(unit: Path, tmp_path: Path) -> None:
    path = as_instance(unit, tmp_path)
    r = subprocess.run([str(ANALYZE), "verify", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert path.name not in r.stderr, r.stderr  # no warnings about our unit


@needs_analyze
@UNITS
def test_systemd_analyze_security_exposure_at_most_3(unit: Path, tmp_path: Path) -> None:
    path = as_instance(unit, tmp_path)
    r = subprocess.run([str(ANALYZE), "security", "--offline=yes", "--threshold=30", "--no-pager", str(path)],
                       capture_output=True, text=True, timeout=60)
    if "--offline" in r.stderr and "unrecognized" in r.stderr:
        pytest.skip("this systemd-analyze has no --offline mode (systemd < 250)")
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", r.stdout)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= 3.0, r.stdout
    assert r.returncode == 0
