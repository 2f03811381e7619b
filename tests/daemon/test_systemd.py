"""systemd/infinitetalkd.service: it verifies, and its hardening exposure stays at 3.0 or lower."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.daemon.conftest import REPO

UNIT = REPO / "systemd" / "infinitetalkd.service"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed (apt-get install systemd)")


def keys(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";")):
            k, v = line.split("=", 1)
            out.setdefault(k.strip(), []).append(v.strip())
    return out


def test_unit_has_the_contract() -> None:
    k = keys(UNIT.read_text())
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


@needs_analyze
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify insists that ExecStart's binary exists; point it at one that does, change nothing else.
    text = re.sub(r"^ExecStart=\S+", "ExecStart=/bin/true", UNIT.read_text(), flags=re.M)
    unit = tmp_path / "infinitetalkd.service"
    unit.write_text(text)
    r = subprocess.run([str(ANALYZE), "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "infinitetalkd.service" not in r.stderr, r.stderr  # no warnings about our unit


@needs_analyze
def test_systemd_analyze_security_exposure_at_most_3() -> None:
    r = subprocess.run([str(ANALYZE), "security", "--offline=yes", "--threshold=30", "--no-pager", str(UNIT)],
                       capture_output=True, text=True, timeout=60)
    if "--offline" in r.stderr and "unrecognized" in r.stderr:
        pytest.skip("this systemd-analyze has no --offline mode (systemd < 250)")
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", r.stdout)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= 3.0, r.stdout
    assert r.returncode == 0
