import pytest

from fedtrain.errors import SpecError
from fedtrain.policy import Decision, NodePolicy, load_policy, review_job
from fedtrain.privacy.ledger import PrivacyLedger
from fedtrain.spec import job_spec_from_json, load_job_spec, parse_job_spec

from conftest import make_spec


def test_spec_errors_name_the_field():
    with pytest.raises(SpecError) as err:
        parse_job_spec({"name": "x", "data": {"features": ["a"], "label": "y"},
                        "training": {"rounds": 0}, "privacy": {"epsilon": -1}, "bogus": 1})
    text = str(err.value)
    assert "training.rounds" in text and "privacy.epsilon" in text and "bogus" in text


def test_spec_rejects_inconsistent_models_and_columns():
    with pytest.raises(SpecError, match="an mlp needs at least one hidden layer"):
        make_spec(model={"kind": "mlp"})
    with pytest.raises(SpecError, match="also listed as a feature"):
        make_spec(data={"features": ["a", "y"], "label": "y"})
    with pytest.raises(SpecError, match="not valid JSON"):
        job_spec_from_json("{not json")
    # A model too large to exchange is refused on the spec, before anything is allocated.
    with pytest.raises(SpecError, match="the model has 67,153,922 parameters; a job may exchange at most 50,000,000"):
        make_spec(model={"kind": "mlp", "hidden": [4096] * 5})
    assert make_spec(model={"kind": "mlp", "hidden": [4096] * 2})


def test_spec_hash_is_canonical(tmp_path):
    spec = make_spec()
    path = tmp_path / "job.yaml"
    path.write_text("# comment\n" + __import__("yaml").safe_dump(spec.model_dump(mode="json")))
    assert load_job_spec(path).digest() == spec.digest()
    assert make_spec(training={"rounds": 3}).digest() != spec.digest()


def test_policy_file_errors(tmp_path):
    p = tmp_path / "policy.yaml"
    p.write_text("max_epsilon: 0\nrequire_aproval: true\n")
    with pytest.raises(SpecError) as err:
        load_policy(p)
    assert "max_epsilon" in str(err.value) and "require_aproval" in str(err.value)
    with pytest.raises(SpecError, match="does not exist"):
        load_policy(tmp_path / "missing.yaml")


@pytest.fixture
def ledger(tmp_path):
    led = PrivacyLedger(tmp_path / "ledger.db", max_epsilon=2.0, delta=1e-5)
    yield led
    led.close()


def test_review_accepts_within_policy_or_waits_for_approval(ledger):
    spec = make_spec()
    assert review_job(spec, NodePolicy(max_epsilon=2.0), ledger, 150).decision is Decision.ACCEPTED
    pending = review_job(spec, NodePolicy(max_epsilon=2.0, require_approval=True), ledger, 150)
    assert pending.decision is Decision.PENDING_APPROVAL


def test_review_names_every_violation(ledger):
    spec = make_spec(model={"kind": "mlp", "hidden": [8]}, training={"rounds": 5}, privacy={"delta": 1e-3})
    policy = NodePolicy(max_epsilon=2.0, allowed_models=["logistic"], max_rounds_per_job=3,
                        require_secure_aggregation=True)
    review = review_job(spec, policy, ledger, 150)
    assert review.decision is Decision.REFUSED
    assert "'mlp' is not in allowed_models" in review.reason
    assert "5 rounds exceed max_rounds_per_job 3" in review.reason
    assert "delta 0.001 is larger" in review.reason
    assert "requires secure aggregation" in review.reason
    secure = make_spec(min_nodes=3)
    assert review_job(secure, NodePolicy(max_epsilon=2.0, require_secure_aggregation=True), ledger, 150).decision \
        is Decision.ACCEPTED


def test_review_refuses_a_job_that_does_not_fit_the_budget(ledger):
    review = review_job(make_spec(privacy={"epsilon": 3.0}), NodePolicy(max_epsilon=2.0), ledger, 150)
    assert review.decision is Decision.REFUSED
    assert "privacy budget exceeded" in review.reason and "remaining 2.0000" in review.reason


def test_the_audit_log_is_a_hash_chain_and_verify_names_each_kind_of_tampering(tmp_path):
    from fedtrain.audit import AuditLog

    def fresh(name):
        log = AuditLog(tmp_path / name / "audit.jsonl")
        log.path.parent.mkdir()
        for i in range(5):
            log.record("SubmitResult", peer="127.0.0.1:1", job_id="j", round=i, payload_sha256=f"{i:064x}")
        return log

    log = fresh("intact")
    assert log.verify().ok and log.verify().entries == 5
    assert AuditLog(log.path).verify().ok  # reopened: the chain continues from the head
    reopened = AuditLog(log.path)
    reopened.record("Poll", peer="127.0.0.1:1")
    assert reopened.verify().ok and reopened.verify().entries == 6

    def tamper(name, change):
        log = fresh(name)
        lines = log.path.read_text().splitlines()
        log.path.write_text("\n".join(change(lines)) + "\n")
        return log.verify().problems

    edited = tamper("edited", lambda ls: [ls[0], ls[1].replace('"round": 1', '"round": 7'), *ls[2:]])
    assert any("line 3 (entry 3): the previous entry was changed" in p for p in edited)
    deleted = tamper("deleted", lambda ls: ls[:2] + ls[3:])
    assert any("line 3: entry 4 follows entry 2" in p for p in deleted)
    swapped = tamper("swapped", lambda ls: [ls[0], ls[2], ls[1], *ls[3:]])
    assert any("entry 3 follows entry 1" in p for p in swapped)
    last = tamper("last", lambda ls: ls[:4] + [ls[4].replace("SubmitResult", "Poll")])
    assert last and "the head says 5 entries" in last[0]
    assert "the head says 5 entries" in tamper("cut", lambda ls: ls[:3])[0]
