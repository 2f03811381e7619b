"""systemd/infinitetalkd-web.service: hardened like the daemon's unit, with no GPU devices."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.daemon.conftest import REPO
from tests.daemon.test_systemd import ANALYZE, keys, needs_analyze

UNIT = REPO / "systemd" / "infinitetalkd-web.service"


def test_web_unit_has_the_contract() -> None:
    k = keys(UNIT.read_text())
    assert "web --config" in k["ExecStart"][0]
    assert k["Restart"] == ["on-failure"] and k["RestartPreventExitStatus"] == ["78"]
    assert k["PrivateDevices"] == ["yes"] and k["DevicePolicy"] == ["closed"] and "DeviceAllow" not in k
    assert k["NoNewPrivileges"] == ["yes"] and k["ProtectSystem"] == ["strict"] and k["PrivateTmp"] == ["yes"]
    assert k["IPAddressDeny"] == ["any"] and k["CapabilityBoundingSet"] == [""]
    assert k["ReadWritePaths"] == ["/srv/infinitetalkd"] and k["StateDirectory"] == ["infinitetalkd"]
    assert "/run/credentials/infinitetalkd-web.service/web.token" in UNIT.read_text()  # where token_file points
    assert "WantedBy" in k and "Install" in UNIT.read_text()


@needs_analyze
def test_web_unit_verifies(tmp_path: Path) -> None:
    text = re.sub(r"^ExecStart=\S+", "ExecStart=/bin/true", UNIT.read_text(), flags=re.M)
    unit = tmp_path / "infinitetalkd-web.service"
    unit.write_text(text)
    r = subprocess.run([str(ANALYZE), "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "infinitetalkd-web.service" not in r.stderr, r.stderr


@needs_analyze
def test_web_unit_exposure_is_low() -> None:
    r = subprocess.run([str(ANALYZE), "security", "--offline=yes", "--threshold=30", "--no-pager", str(UNIT)],
                       capture_output=True, text=True, timeout=60)
    if "--offline" in r.stderr and "unrecognized" in r.stderr:
        pytest.skip("this systemd-analyze has no --offline mode (systemd < 250)")
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", r.stdout)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= 2.5, r.stdout
