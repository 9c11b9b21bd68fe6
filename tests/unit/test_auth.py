"""The auth file, tokens, allow rules, and what each RPC needs."""

from __future__ import annotations

import pytest

from streamd import auth
from streamd.auth import GROUP, TOPIC, AuthFileError, Authority, needs_of, new_token, token_sha256
from streamd.v1 import streamd_pb2 as pb

TOKEN, DIGEST = new_token()


def authority(**extra) -> Authority:
    return Authority.parse({
        "principal": [{"name": "orders-api", "token_sha256": [DIGEST]}, {"name": "worker-1"}],
        "allow": [
            {"principal": "orders-api", "operations": ["produce"], "topics": ["orders", "orders.*"]},
            {"principal": "worker-1", "operations": ["consume"], "topics": ["orders"], "groups": ["mailers"]},
            {"principal": "*", "operations": ["describe"], "topics": ["public-*"]},
        ],
        **extra,
    })


def test_tokens_map_to_principals_by_their_hash_only():
    a = authority()
    assert a.principal_for_token(TOKEN) == "orders-api"
    assert a.principal_for_token(TOKEN + "x") is None and a.principal_for_token("") is None
    assert a.principal_for_certificate("worker-1") == "worker-1"
    assert a.principal_for_certificate("someone") is None
    assert token_sha256(TOKEN) == DIGEST and TOKEN not in str(vars(a))


def test_rules_allow_by_principal_operation_and_pattern():
    a = authority()
    assert a.allows("orders-api", "produce", TOPIC, "orders")
    assert a.allows("orders-api", "produce", TOPIC, "orders.eu")
    assert not a.allows("orders-api", "produce", TOPIC, "ordersX")  # patterns match whole names
    assert not a.allows("orders-api", "consume", TOPIC, "orders")
    assert a.allows("orders-api", "describe", TOPIC, "orders")  # implied by produce
    assert a.allows("worker-1", "consume", GROUP, "mailers") and not a.allows("worker-1", "consume", GROUP, "x")
    assert not a.allows("worker-1", "admin", TOPIC, "orders")
    assert a.allows("anyone", "describe", TOPIC, "public-news")  # "*": any authenticated principal
    assert not a.allows("anyone", "consume", TOPIC, "public-news")
    admin = Authority.parse({"principal": [{"name": "ops"}],
                             "allow": [{"principal": "ops", "operations": ["admin"], "topics": ["*"]}]})
    assert all(admin.allows("ops", op, TOPIC, "t") for op in auth.OPERATIONS)
    assert not admin.allows("ops", "consume", GROUP, "g")  # topics only


@pytest.mark.parametrize("raw, why", [
    ({"principals": []}, "unknown section"),
    ({"principal": [{"token_sha256": []}]}, "needs a name"),
    ({"principal": [{"name": "*"}]}, "needs a name"),
    ({"principal": [{"name": "a"}, {"name": "a"}]}, "listed twice"),
    ({"principal": [{"name": "a", "token_sha256": ["abc"]}]}, "64 hex digits"),
    ({"principal": [{"name": "a", "token": "x"}]}, "unknown key"),
    ({"principal": [{"name": "a", "token_sha256": [DIGEST]}, {"name": "b", "token_sha256": [DIGEST]}]},
     "two principals"),
    ({"allow": [{"principal": "nobody", "operations": ["consume"], "topics": ["*"]}]}, "not defined"),
    ({"allow": [{"principal": "*", "operations": ["write"], "topics": ["*"]}]}, "operations must be"),
    ({"allow": [{"principal": "*", "operations": []}]}, "operations must be"),
    ({"allow": [{"principal": "*", "operations": ["consume"]}]}, "topics or groups"),
    ({"allow": [{"principal": "*", "operations": ["consume"], "topics": "orders"}]}, "list of non-empty"),
])
def test_a_malformed_auth_file_is_refused_with_a_reason(raw, why):
    with pytest.raises(AuthFileError, match=why):
        Authority.parse(raw)


def test_loading_a_file(tmp_path):
    path = tmp_path / "auth.toml"
    path.write_text(f'[[principal]]\nname = "a"\ntoken_sha256 = ["{DIGEST}"]\n'
                    '[[allow]]\nprincipal = "a"\noperations = ["consume"]\ntopics = ["t"]\n')
    assert Authority.load(path).principal_for_token(TOKEN) == "a"
    (tmp_path / "bad.toml").write_text("[[principal]\n")
    with pytest.raises(AuthFileError, match="bad.toml"):
        Authority.load(tmp_path / "bad.toml")


def test_every_rpc_of_every_service_has_a_rule():
    rpcs = {m.name for s in pb.DESCRIPTOR.services_by_name.values() for m in s.methods}
    assert rpcs == set(auth.methods())


def test_what_rpcs_need_comes_from_their_requests():
    assert needs_of("Produce", pb.ProduceRequest(topic="orders")) == [("produce", TOPIC, "orders")]
    assert needs_of("CreateTopic", pb.CreateTopicRequest(topic="t")) == [("admin", TOPIC, "t")]
    assert needs_of("JoinGroup", pb.MemberJoin(group="g", topics=["b", "a"])) == [
        ("consume", GROUP, "g"), ("consume", TOPIC, "a"), ("consume", TOPIC, "b")]
    commit = pb.CommitOffsetsRequest(group="g", offsets=[pb.OffsetCommit(topic="t", partition=0, offset=1),
                                                          pb.OffsetCommit(topic="t", partition=1, offset=1)])
    assert needs_of("CommitOffsets", commit) == [("consume", GROUP, "g"), ("consume", TOPIC, "t")]
    assert needs_of("Receive", pb.ReceiveRequest(group="q", topic="t")) == [
        ("consume", GROUP, "q"), ("consume", TOPIC, "t")]
    for method in ("Ack", "Nack", "Extend", "Reject", "Settle"):  # queue RPCs name the topic too
        assert needs_of(method, getattr(pb, f"{method}Request")(group="q", topic="t")) == [
            ("consume", GROUP, "q"), ("consume", TOPIC, "t")]
    assert needs_of("DescribeQueueGroup", pb.DescribeQueueGroupRequest(group="q", topic="t")) == [
        ("describe", GROUP, "q"), ("describe", TOPIC, "t")]
    assert needs_of("InitProducer", pb.InitProducerRequest()) == []
    a = authority()
    assert a.missing("worker-1", needs_of("Receive", pb.ReceiveRequest(group="mailers", topic="orders"))) is None
    assert a.missing("worker-1", needs_of("Receive", pb.ReceiveRequest(group="mailers", topic="x"))) == (
        "consume", TOPIC, "x")
    with pytest.raises(KeyError):
        needs_of("Nope", pb.ProduceRequest())


def test_the_cli_prints_a_token_and_auth_file_lines_with_its_hash(capsys):
    import tomllib

    from streamd.cli.main import main

    assert main(["auth", "new-token", "--principal", "orders-api"]) == 0
    out = capsys.readouterr().out
    token = out.splitlines()[0].rsplit(" ", 1)[1]
    raw = tomllib.loads(out.split("\n", 1)[1])
    assert raw["principal"][0]["name"] == "orders-api"
    assert Authority.parse(raw).principal_for_token(token) == "orders-api"


def test_serve_flags_set_tls_and_auth(capsys, tmp_path):
    import tomllib

    from streamd.cli.main import main

    argv = ["serve", "--data-dir", str(tmp_path), "--tls-cert", "c.pem", "--tls-key", "k.pem",
            "--tls-client-ca", "ca.pem", "--auth-file", "auth.toml", "--print-config"]
    assert main(argv) == 0
    config = tomllib.loads(capsys.readouterr().out)
    assert (config["tls_cert_file"], config["tls_key_file"], config["tls_client_ca_file"], config["auth_file"]) == (
        "c.pem", "k.pem", "ca.pem", "auth.toml")


def test_produce_quotas_are_token_buckets_per_principal():
    from streamd.auth import ProduceQuotas, QuotaExceeded

    a = Authority.parse({"principal": [{"name": "a"}, {"name": "b"}],
                         "quota": [{"principal": "a", "produce_bytes_per_s": 1000},
                                   {"principal": "*", "produce_bytes_per_s": 10}]})
    assert a.quota("a") == 1000 and a.quota("b") == 10 and a.quota("c") == 10
    now = [100.0]
    q = ProduceQuotas(a, lambda: now[0])
    q.charge("a", 600)
    q.charge("a", 600)  # the bucket had 400 left: allowed, 200 in debt
    with pytest.raises(QuotaExceeded) as err:
        q.charge("a", 1)
    assert err.value.retry_after_ms == 201  # 200 bytes at 1000/s, rounded up
    now[0] += 0.2005
    q.charge("a", 1)  # paid off
    q.charge("b", 10)  # "b" has its own bucket under "*"
    with pytest.raises(QuotaExceeded):
        q.charge("b", 1)
    assert Authority.parse({}).quota("x") is None


@pytest.mark.parametrize("quota, why", [
    ({"principal": "nobody", "produce_bytes_per_s": 1}, "not defined"),
    ({"principal": "*", "produce_bytes_per_s": 0}, "positive"),
    ({"principal": "*", "produce_bytes_per_s": True}, "positive"),
    ({"principal": "*", "produce_bytes_per_s": 1, "burst": 5}, "unknown key"),
])
def test_a_malformed_quota_is_refused(quota, why):
    with pytest.raises(AuthFileError, match=why):
        Authority.parse({"quota": [quota]})


def test_answers_are_memoized_within_a_bound(monkeypatch):
    monkeypatch.setattr(auth, "MEMO_LIMIT", 3)
    a = authority()
    for i in range(10):  # client-chosen names: the memo never holds more than the limit
        assert not a.allows("orders-api", "produce", TOPIC, f"other-{i}")
        assert len(a._answers) <= 3
    assert a.allows("orders-api", "produce", TOPIC, "orders") and a.allows("orders-api", "produce", TOPIC, "orders")


def test_a_resource_only_the_broker_can_name_is_refused_without_its_resolver():
    every = pb.ResetOffsetsRequest(group="g", all_topics=True)
    with pytest.raises(KeyError):
        needs_of("ResetOffsets", every)
    topics = {"@group_topics_if_all": lambda r: ["a", "b"] if r.all_topics else []}
    assert needs_of("ResetOffsets", every, topics) == [("admin", GROUP, "g"), ("consume", TOPIC, "a"),
                                                       ("consume", TOPIC, "b")]
    named = pb.ResetOffsetsRequest(group="g", partitions=[pb.TopicPartitions(topic="a")])
    assert needs_of("ResetOffsets", named, topics) == [("admin", GROUP, "g"), ("consume", TOPIC, "a")]
