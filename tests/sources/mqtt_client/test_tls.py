"""mqtts:// with a client certificate against mosquitto with ``require_certificate true``."""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

PEBBLE = [{"filter": "pebble/+/data", "device": "pebble/{device}/data"}]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _ca(d: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "1", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=d,
    )  # fmt: skip


def _leaf(d: Path, name: str, ca: str, ext: str) -> None:
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d,
    )  # fmt: skip
    (d / f"{name}.ext").write_text(ext)
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
        "-out", f"{name}.crt", "-days", "1", "-extfile", f"{name}.ext", cwd=d,
    )  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1/localhost, a client certificate, and an unrelated CA."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl is not installed (run 'make system-deps')")
    d = tmp_path_factory.mktemp("pki")
    _ca(d, "ca")
    _ca(d, "other-ca")
    _leaf(d, "server", "ca", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    _leaf(d, "client", "ca", "extendedKeyUsage=clientAuth\n")
    return d


@pytest.fixture
def tls_broker(mosquitto: Any, pki: Path) -> Any:
    broker = mosquitto(
        extra=[
            f"cafile {pki / 'ca.crt'}",
            f"certfile {pki / 'server.crt'}",
            f"keyfile {pki / 'server.key'}",
            "require_certificate true",
        ]
    )
    return broker


def _tls_source(kit: Any, broker: Any, pki: Path, ca: str = "ca.crt", **extra: Any) -> Any:
    return kit.source(
        "pebble",
        f"mqtts://127.0.0.1:{broker.port}",
        PEBBLE,
        ca_file=str(pki / ca),
        cert_file=str(pki / "client.crt"),
        key_file=str(pki / "client.key"),
        **extra,
    )


async def test_mqtts_with_client_certificate(tls_broker: Any, kit: Any, pki: Path) -> None:
    rt = await kit.start([_tls_source(kit, tls_broker, pki)])
    await tls_broker.wait_log("Sending SUBACK to isthmus-pebble")
    await kit.pub(
        tls_broker.port, "pebble/node-7/data", {"t": 1},
        extra=["--cafile", str(pki / "ca.crt"), "--cert", str(pki / "client.crt"), "--key", str(pki / "client.key")],
    )  # fmt: skip
    (record,) = await kit.wait_records(rt, 1)
    assert record.frame.source == "pebble" and record.frame.meta["topic"] == "pebble/node-7/data"


@pytest.mark.parametrize("problem", ["wrong CA", "no client certificate"])
async def test_tls_failures_are_logged_once_retried_and_the_source_keeps_running(
    tls_broker: Any, kit: Any, pki: Path, caplog: pytest.LogCaptureFixture, problem: str
) -> None:
    caplog.set_level(logging.DEBUG, logger="isthmus.sources.mqtt_client")
    if problem == "wrong CA":
        source = _tls_source(kit, tls_broker, pki, ca="other-ca.crt")
    else:
        source = kit.source("pebble", f"mqtts://127.0.0.1:{tls_broker.port}", PEBBLE, ca_file=str(pki / "ca.crt"))
    rt = await kit.start([source])

    def attempts() -> list[logging.LogRecord]:
        return [r for r in caplog.records if "connect to" in r.getMessage() and "failed" in r.getMessage()]

    async def retried() -> bool:
        return len(attempts()) >= 2

    await kit.wait_for(retried, what="the source retried")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "cannot connect" in r.getMessage()]
    assert len(warnings) == 1, "the failure is logged once, the retries at debug level"
    if problem == "wrong CA":
        assert "CERTIFICATE_VERIFY_FAILED" in warnings[0].getMessage()
    (task,) = rt._source_tasks
    assert not task.done(), "the source keeps running (retrying), it did not crash"
    assert kit.sample(rt, "isthmus_mqtt_client_connected", source="pebble") == 0
