"""config.yaml's web: section (cfg.web.host/port/token_file/token_env/max_upload_mb) and the token rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.config import ConfigError, WebConfig, parse_config
from daemon.web.security import TokenError, check_bind, is_loopback, load_token


def test_defaults_and_values(tmp_path: Path) -> None:
    assert parse_config({}, base=tmp_path).web == WebConfig()
    web = parse_config({"web": {"host": "0.0.0.0", "port": 9000, "token_file": "secret/web.token",
                                "token_env": "MY_TOKEN", "max_upload_mb": 10}}, base=tmp_path).web
    assert web == WebConfig(host="0.0.0.0", port=9000, token_file=(tmp_path / "secret" / "web.token").resolve(),
                            token_env="MY_TOKEN", max_upload_mb=10)


@pytest.mark.parametrize(("web", "where"), [({"port": 0}, "web.port"), ({"prt": 1}, "web.prt"),
                                            ({"max_upload_mb": 0}, "web.max_upload_mb"), ({"host": ""}, "web.host")])
def test_errors_name_the_key(tmp_path: Path, web: dict[str, object], where: str) -> None:
    with pytest.raises(ConfigError, match=where):
        parse_config({"web": web}, base=tmp_path)


def test_token_sources_and_the_bind_rule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ITD_T", raising=False)
    assert load_token(WebConfig(token_env="ITD_T")) is None
    check_bind(WebConfig(host="127.0.0.1"), None)  # loopback without a token is allowed
    check_bind(WebConfig(host="::1"), None)
    for host in ("0.0.0.0", "192.168.1.5", "::", "nas.local"):
        assert not is_loopback(host)
        with pytest.raises(TokenError, match="no token is set"):
            check_bind(WebConfig(host=host), None)
    monkeypatch.setenv("ITD_T", "  env-token-0123456789  ")
    assert load_token(WebConfig(token_env="ITD_T")) == "env-token-0123456789"
    f = tmp_path / "web.token"
    f.write_text("file-token-0123456789\n")
    assert load_token(WebConfig(token_file=f, token_env="ITD_T")) == "file-token-0123456789"  # the file wins
    with pytest.raises(TokenError, match="cannot read"):  # an unreadable token file never means "no token"
        load_token(WebConfig(token_file=tmp_path / "missing"))
    f.write_text("short\n")
    with pytest.raises(TokenError, match="at least 16"):
        load_token(WebConfig(token_file=f))
