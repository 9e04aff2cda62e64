"""engine.triton in the daemon config: parsed, validated with the key named, round-tripped to the workers."""

from __future__ import annotations

import pytest

from edge_daemon.config import ConfigError, TlsSettings, TritonSettings, config_from_mapping


def _config(engine: dict, base_dir=None):
    return config_from_mapping({"engine": {"bundle": "/b", **engine}}, base_dir=base_dir)


def test_triton_section_parsed_with_defaults_and_options():
    cfg = _config({"backend": "triton", "triton": {"url": "pool:8001", "model": "tiny"}})
    assert cfg.engine.triton == TritonSettings(url="pool:8001", model="tiny")
    assert cfg.engine.backend_options() == {
        "url": "pool:8001", "model": "tiny", "protocol": "grpc", "timeout_s": 5.0, "connect_timeout_s": 5.0,
        "tls": False, "tls_ca": None, "tls_cert": None, "tls_key": None}
    assert _config({"backend": "onnxruntime"}).engine.backend_options() == {}


def test_triton_tls_paths_resolved_and_round_trip(tmp_path):
    for name in ("ca.pem", "c.pem", "k.pem"):
        (tmp_path / name).write_text("x")
    tls = {"ca": "ca.pem", "cert": "c.pem", "key": "k.pem"}
    cfg = _config({"backend": "triton", "triton": {"url": "pool:8001", "model": "m", "protocol": "http",
                                                   "timeout_s": 2, "tls": tls}}, base_dir=tmp_path)
    assert cfg.engine.triton.tls == TlsSettings(str(tmp_path / "ca.pem"), str(tmp_path / "c.pem"),
                                                str(tmp_path / "k.pem"))
    options = cfg.engine.backend_options()
    assert options["tls"] is True and options["tls_ca"] == str(tmp_path / "ca.pem")
    assert options["timeout_s"] == 2.0
    assert config_from_mapping(cfg.to_mapping()) == cfg  # what the workers get from state.json
    plain = _config({"backend": "onnxruntime"})
    assert config_from_mapping(plain.to_mapping()) == plain
    system_cas = _config({"backend": "triton", "triton": {"url": "h:1", "model": "m", "tls": {}}})
    assert system_cas.engine.backend_options()["tls"] is True


_OK = {"url": "h:1", "model": "m"}


@pytest.mark.parametrize("engine, message", [
    ({"backend": "triton"}, "engine.triton: is required with backend triton"),
    ({"backend": "onnxruntime", "triton": _OK}, "engine.triton: applies to backend triton"),
    ({"triton": {"model": "m"}}, "engine.triton.url: must be a non-empty string"),
    ({"triton": {"url": "http://h:1", "model": "m"}}, "engine.triton.url: must be host:port"),
    ({"triton": {"url": "h:1"}}, "engine.triton.model: must be a non-empty string"),
    ({"triton": {**_OK, "protocol": "udp"}}, "engine.triton.protocol: must be one of grpc, http"),
    ({"triton": {**_OK, "timeout_s": 0}}, "engine.triton.timeout_s"),
    ({"triton": {**_OK, "retry": 1}}, "engine.triton.retry: unknown key"),
    ({"triton": {**_OK, "tls": {"ca": "/nope.pem"}}}, "engine.triton.tls.ca: file /nope.pem does not exist"),
    ({"triton": {**_OK, "tls": {"pem": "x"}}}, "engine.triton.tls.pem: unknown key"),
])
def test_triton_config_errors_name_the_key(engine, message):
    with pytest.raises(ConfigError, match=message):
        _config({"backend": "triton", **engine})


def test_triton_tls_cert_needs_key(tmp_path):
    (tmp_path / "c.pem").write_text("x")
    with pytest.raises(ConfigError, match="engine.triton.tls.cert: cert and key come together"):
        _config({"backend": "triton", "triton": {"url": "h:1", "model": "m", "tls": {"cert": "c.pem"}}},
                base_dir=tmp_path)
