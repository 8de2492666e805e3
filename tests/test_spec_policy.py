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
