import json

import pytest

from fedtrain.data import DataCheck, load_table
from fedtrain.errors import SpecError, WireError
from fedtrain.policy import Decision, NodePolicy, load_policy
from fedtrain.protocol.refusal import Reason, Refusal, check_refusal, parse_refusal
from nodes.admission import admit, review
from fedtrain.node.ledger import PrivacyLedger
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


@pytest.mark.parametrize("training, error", [
    ({"optimizer": "adam", "momentum": 0.9}, "momentum is sgd's"),
    ({"optimizer": "adam", "weight_decay": 0.01}, "weight_decay is adamw's"),
    ({"optimizer": "adamw", "weight_decay": 3.0, "learning_rate": 0.5}, "learning_rate \\* weight_decay"),
    ({"optimizer": "adam", "betas": [0.99, 0.9]}, "beta1² must be below beta2"),
    ({"optimizer": "rmsprop"}, "optimizer"),
])
def test_the_spec_refuses_optimizer_settings_that_do_not_fit(training, error):
    with pytest.raises(SpecError, match=error):
        make_spec(training=training)
    assert make_spec(training={"optimizer": "adamw", "weight_decay": 0.01, "betas": [0.8, 0.99]}).training.betas == (
        0.8, 0.99)


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
    assert "  - require_aproval: unknown key (did you mean require_approval?); the keys here are max_epsilon, delta," \
        in str(err.value)
    with pytest.raises(SpecError, match="does not exist"):
        load_policy(tmp_path / "missing.yaml")


def test_an_unknown_key_is_named_with_the_keys_allowed_where_it_stands_and_the_closest():
    spec = make_spec().model_dump(mode="json")
    spec["trainig"] = spec.pop("training")
    spec["model"]["hiden"] = [8]  # in a union told apart by kind: the path is the file's, model.hiden
    spec["data"]["lable"] = spec["data"].pop("label")
    spec["strategy"] = {"fedprox": {"proximal_mu": 0.1}}  # the README's old shorthand
    spec["secure_aggregation"] = {"enabld": False}
    with pytest.raises(SpecError) as err:
        parse_job_spec(spec, "job.yaml")
    lines = str(err.value).splitlines()
    assert lines[0] == "job.yaml is not a valid job spec:"
    assert "  - model.hiden: unknown key (did you mean hidden?); the keys here are kind, hidden, num_classes" in lines
    assert "  - data.lable: unknown key (did you mean label?); the keys here are features, label, scaling" in lines
    assert "  - strategy.fedprox: unknown key (fedprox is a value: write name: fedprox); the keys here are name," \
           " params" in lines
    assert any(line.startswith("  - secure_aggregation.enabld: unknown key (did you mean enabled?); the keys here"
                               " are enabled, clip_range,") for line in lines)
    assert any(line.startswith("  - trainig: unknown key (did you mean training?); the keys here are name, task,")
               for line in lines)
    assert "  - training: Field required" in lines and "  - data.label: Field required" in lines
    # Nothing close: the keys alone.
    with pytest.raises(SpecError, match=r"privacy.zzz: unknown key; the keys here are epsilon, delta, max_grad_norm"):
        make_spec(privacy={"epsilon": 1.0, "zzz": 1})


def test_data_errors_name_the_column_and_what_it_should_hold(tmp_path):
    spec = make_spec(data={"features": ["size", "weight"], "label": "kind"})
    rows = {"text feature": ("big", "1.0", "0"), "infinite": ("1.0", "inf", "1"), "class name": ("1.0", "2.0", "cat"),
            "fraction": ("1.0", "2.0", "0.5"), "out of range": ("1.0", "2.0", "2"), "good": ("1.0", "2.0", "1")}
    path = tmp_path / "table.csv"
    path.write_text("size,weight,kind\n" + "".join(",".join(r) + "\n" for r in rows.values()))
    expected = "the integers 0..1 (model.num_classes is 2); map class names to them"
    # Read strictly (the coordinator's and the tools' own files): the first bad row raises.
    with pytest.raises(SpecError, match=r"table.csv, row 1: feature column 'size' holds 'big', not a number"):
        load_table(path, spec.data, 2)
    # Read by a node: every bad row is skipped and noted for its owner.
    check = DataCheck()
    assert load_table(path, spec.data, 2, check).labels.tolist() == [1]
    assert [p.split(": ", 1)[1] for p in check.problems] == [
        "feature column 'size' holds 'big', not a number",
        "feature column 'weight' holds 'inf'; features must be finite numbers",
        *(f"label column 'kind' holds {v!r}, not a class index: tabular labels are {expected}"
          for v in ("cat", "0.5", "2")),
    ]


@pytest.fixture
def ledger(tmp_path):
    led = PrivacyLedger(tmp_path / "ledger.db", max_epsilon=2.0, delta=1e-5)
    yield led
    led.close()


def policy(**over):
    return NodePolicy(max_epsilon=2.0, dataset_size=150, **over)


def test_review_accepts_within_policy_or_waits_for_approval(ledger):
    spec = make_spec()
    assert admit("j", spec.canonical_json(), policy(), ledger, None).decision is Decision.ACCEPTED
    pending = admit("j", spec.canonical_json(), policy(require_approval=True), ledger, None)
    assert pending.decision is Decision.PENDING_APPROVAL and pending.refusal.text() == "pending-approval"


def test_review_names_every_violation_locally_and_sends_typed_reasons(ledger):
    spec = make_spec(model={"kind": "mlp", "hidden": [8]}, training={"rounds": 5}, privacy={"delta": 1e-3})
    strict = policy(allowed_models=["logistic"], max_rounds_per_job=3, require_secure_aggregation=True)
    problems = review(spec, strict, ledger)
    detail = "; ".join(p.detail for p in problems)
    assert "'mlp' is not in allowed_models" in detail
    assert "training.rounds (5) exceeds the policy's max_rounds_per_job 3" in detail
    assert "delta 0.001 is larger" in detail
    assert "requires secure aggregation" in detail
    texts = {p.refusal.text() for p in problems}
    assert texts == {'model-not-allowed: model.kind="mlp"', "delta-too-large: policy.delta=1e-05, privacy.delta=0.001",
                     "secure-aggregation-required: policy.require_secure_aggregation=true",
                     "limit-exceeded: policy.max_rounds_per_job=3, training.rounds=5"}
    for p in problems:  # each is what the egress check lets through
        check_refusal(parse_refusal(p.refusal.text()), json.loads(spec.canonical_json()), strict.document())
    assert not review(make_spec(min_nodes=3), policy(require_secure_aggregation=True), ledger)


def test_compute_limits_are_checked_on_the_spec(ledger):
    wide = make_spec(model={"kind": "mlp", "hidden": [512, 512]})
    assert [p.refusal.text() for p in review(wide, policy(max_trainable_parameters=1000), ledger)] == [
        "limit-exceeded: policy.max_trainable_parameters=1000"]
    # 100 local epochs over 150 declared rows in batches of 32: 500 steps a round.
    long = make_spec(training={"local_epochs": 100})
    assert [p.refusal.text() for p in review(long, policy(max_steps_per_round=499), ledger)] == [
        "limit-exceeded: policy.max_steps_per_round=499"]
    assert not review(long, policy(max_steps_per_round=500), ledger)


def test_review_refuses_a_job_that_does_not_fit_the_budget(ledger):
    problems = review(make_spec(privacy={"epsilon": 3.0}), policy(), ledger)
    assert [p.refusal.text() for p in problems] == ["budget-exceeded: policy.max_epsilon=2.0"]
    # The numbers of the ledger (spends of other jobs) stay in the node's log.
    assert "privacy budget exceeded" in problems[0].detail and "remaining 2.0000" in problems[0].detail


def test_refusals_parse_back_and_the_egress_rule_rejects_other_values():
    spec = json.loads(make_spec().canonical_json())
    owner = policy().document()
    text = Refusal(Reason.LIMIT_EXCEEDED, {"training.rounds": 2, "policy.max_rounds_per_job": 100}).text()
    assert parse_refusal(text).values == {"training.rounds": 2, "policy.max_rounds_per_job": 100}
    check_refusal(parse_refusal(text), spec, owner)
    for bad in ("label '81391.88' is not a class index", "budget-exceeded: remaining=0.2",
                'spec-invalid: data.label="patient 7 tested negative"', "limit-exceeded: training.rounds=3",
                'task-not-allowed: task="x", task="y"', "budget-exceeded: policy.max_epsilon=2.0 "):
        with pytest.raises(WireError):
            check_refusal(parse_refusal(bad), spec, owner)


def test_the_audit_log_is_a_hash_chain_and_verify_names_each_kind_of_tampering(tmp_path):
    from fedtrain.node.audit_log import AuditLog

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


def test_the_node_egress_check_stops_free_text_and_data_derived_metrics():
    from fedtrain.protocol import fedtrain_pb2 as pb
    from fedtrain.protocol.codec import encode_values
    from fedtrain.privacy.accounting import plan_round
    from nodes import egress

    spec, owner = make_spec(), policy()
    ok = Refusal(Reason.LIMIT_EXCEEDED, {"training.rounds": 2, "policy.max_rounds_per_job": 100}).text()
    egress.check(pb.OfferAnswer(job_id="j", reason=ok), spec, owner)
    with pytest.raises(egress.EgressViolation):
        egress.check(pb.OfferAnswer(job_id="j", reason="label '81391.88' is not a class index"), spec, owner)

    def result(**metrics):
        header = pb.ResultHeader(task_id="t", metrics=encode_values(metrics))
        return list(egress.check(iter([pb.ResultPart(header=header), pb.ResultPart(tensor=pb.TensorChunk())]),
                                 spec, owner))

    plan = plan_round(spec, owner.dataset_size)
    honest = {"num-examples": owner.dataset_size, "noise-multiplier": plan.noise_multiplier,
              "sample-rate": plan.sample_rate, "steps": plan.steps}
    assert len(result(**honest)) == 2
    for bad in ({**honest, "num-examples": 137},          # the real row count
                {**honest, "training-loss": 0.31},        # an un-noised statistic
                {**honest, "steps": plan.steps + 1}):     # a plan from the real row count
        with pytest.raises(egress.EgressViolation):
            result(**bad)
