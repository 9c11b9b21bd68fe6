"""TLS and mutual TLS over real gRPC on 127.0.0.1, with certificates made here by
openssl: a CA, the broker's certificate (for 127.0.0.1 and localhost) and a client's."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from streamd.client import Admin, StreamdError
from streamd.client._channel import Security

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("certs")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=streamd test CA", cwd=d)
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"), ("worker-1", "")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=d)
        extra = []
        if ext:
            (d / f"{name}.ext").write_text(ext + "\n")
            extra = ["-extfile", f"{name}.ext"]
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", *extra, cwd=d)
    # A CA the broker does not trust, and a client certificate it signed.
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "other.key", "-out", "other.pem",
             "-days", "2", "-subj", "/CN=someone else", cwd=d)
    return d


def tls_server(make_server, certs: Path, *, mutual: bool):
    return make_server(tls_cert_file=str(certs / "server.pem"), tls_key_file=str(certs / "server.key"),
                       tls_client_ca_file=str(certs / "ca.pem") if mutual else "")


def topics(address: str, security: Security) -> list[str]:
    with Admin(address, security=security) as admin:
        return [t.name for t in admin.list_topics()]


def test_a_tls_broker_talks_to_clients_that_trust_its_ca(make_server, certs):
    server = tls_server(make_server, certs, mutual=False)
    assert topics(server.address, Security(tls=True, ca_file=str(certs / "ca.pem"))) == []
    with pytest.raises(StreamdError) as err:  # a client that does not trust the CA
        topics(server.address, Security(tls=True, ca_file=str(certs / "other.pem")))
    assert err.value.code == "UNAVAILABLE"
    with pytest.raises(StreamdError):  # plain text to a TLS port
        topics(server.address, Security())


def test_mutual_tls_needs_a_client_certificate_from_the_ca(make_server, certs):
    server = tls_server(make_server, certs, mutual=True)
    ca = str(certs / "ca.pem")
    good = Security(tls=True, ca_file=ca, cert_file=str(certs / "worker-1.pem"), key_file=str(certs / "worker-1.key"))
    assert topics(server.address, good) == []
    for bad in (Security(tls=True, ca_file=ca),  # no certificate
                Security(tls=True, ca_file=ca, cert_file=str(certs / "other.pem"), key_file=str(certs / "other.key"))):
        with pytest.raises(StreamdError) as err:
            topics(server.address, bad)
        assert err.value.code == "UNAVAILABLE"


def test_the_environment_configures_every_client(make_server, certs, monkeypatch):
    server = tls_server(make_server, certs, mutual=True)
    monkeypatch.setenv("STREAMD_TLS_CA", str(certs / "ca.pem"))
    monkeypatch.setenv("STREAMD_TLS_CERT", str(certs / "worker-1.pem"))
    monkeypatch.setenv("STREAMD_TLS_KEY", str(certs / "worker-1.key"))
    with Admin(server.address) as admin:
        admin.create_topic("secure", 1)
        assert [t.name for t in admin.list_topics()] == ["secure"]
    assert Security.from_env().token == ""
    monkeypatch.setenv("STREAMD_TOKEN", "sdt_x")
    assert Security.from_env().token == "sdt_x"


def test_a_token_is_never_sent_in_plain_text_to_a_remote_broker():
    from streamd.client._channel import sync_channel

    with pytest.raises(ValueError, match="only over TLS"):
        sync_channel("10.1.2.3:50051", security=Security(token="sdt_x"))
    sync_channel("127.0.0.1:50051", security=Security(token="sdt_x")).close()  # loopback: local credentials


def test_half_a_tls_config_is_refused():
    from streamd.config import BrokerConfig

    with pytest.raises(ValueError, match="go together"):
        BrokerConfig(tls_cert_file="a.pem")
    with pytest.raises(ValueError, match="mutual TLS"):
        BrokerConfig(tls_client_ca_file="ca.pem")


def test_a_client_certificate_names_its_principal_and_a_token_rides_on_tls(make_server, certs, tmp_path):
    from streamd.auth import new_token
    from streamd.client import StreamdError as Error

    token, digest = new_token()
    auth = tmp_path / "auth.toml"
    auth.write_text(f'[[principal]]\nname = "worker-1"\n[[principal]]\nname = "ops"\ntoken_sha256 = ["{digest}"]\n'
                    '[[allow]]\nprincipal = "worker-1"\noperations = ["consume"]\ntopics = ["jobs"]\n'
                    '[[allow]]\nprincipal = "ops"\noperations = ["admin"]\ntopics = ["*"]\n')
    server = make_server(tls_cert_file=str(certs / "server.pem"), tls_key_file=str(certs / "server.key"),
                         tls_client_ca_file=str(certs / "ca.pem"), auth_file=str(auth))
    ca = str(certs / "ca.pem")
    worker = Security(tls=True, ca_file=ca, cert_file=str(certs / "worker-1.pem"), key_file=str(certs / "worker-1.key"))
    ops = Security(tls=True, ca_file=ca, cert_file=str(certs / "worker-1.pem"), key_file=str(certs / "worker-1.key"),
                   token=token)
    with Admin(server.address, security=ops) as admin:
        admin.create_topic("jobs", 1)  # the token's principal (ops) wins over the certificate's
        admin.create_topic("other", 1)
    with Admin(server.address, security=worker) as admin:
        assert [t.name for t in admin.list_topics()] == ["jobs"]  # consume implies describe, on jobs only
        with pytest.raises(Error) as err:
            admin.create_topic("mine", 1)
        assert (err.value.code, err.value.reason) == ("PERMISSION_DENIED", "PERMISSION_DENIED")


def test_clients_and_the_cli_take_tls_files_directly(make_server, certs, tmp_path):
    import os
    import subprocess
    import sys

    from streamd.client import Security as PublicSecurity

    server = tls_server(make_server, certs, mutual=True)
    files = {"ca_file": str(certs / "ca.pem"), "cert_file": str(certs / "worker-1.pem"),
             "key_file": str(certs / "worker-1.key")}
    with Admin(server.address, security=PublicSecurity(tls=True, **files)) as admin:
        admin.create_topic("direct", 1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMD_")}
    base = [sys.executable, "-m", "streamd", "--server", server.address]
    flags = ["--tls-ca", files["ca_file"], "--tls-client-cert", files["cert_file"], "--tls-client-key",
             files["key_file"]]
    ok = subprocess.run(base + flags + ["topics", "list"], env=env, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "direct" in ok.stdout, ok.stderr
    plain = subprocess.run(base + ["topics", "list"], env=env, capture_output=True, text=True, timeout=60)
    assert plain.returncode != 0
