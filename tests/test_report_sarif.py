"""SARIF 2.1.0 output, validated against the official OASIS schema (tests/data)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from raceguard.report.document import Report
from raceguard.report.render import render
from raceguard.report.finding import KINDS, Access, Finding, Frame, Origin
from raceguard.report.sarif import FINGERPRINT_KEY, SRCROOT, to_sarif

DATA = Path(__file__).parent / "data"
BASE = "/repo"


@pytest.fixture(scope="module")
def sarif_validator() -> jsonschema.Draft7Validator:
    schema = json.loads((DATA / "sarif-schema-2.1.0.json").read_text(encoding="utf-8"))
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def sample() -> Report:
    return Report.from_dict(json.loads((DATA / "report-all-kinds.json").read_text(encoding="utf-8")))


def assert_valid(validator: jsonschema.Draft7Validator, log: dict) -> None:
    errors = sorted(validator.iter_errors(log), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors[:10])


def results_by_rule(log: dict) -> dict[str, dict]:
    return {r["ruleId"]: r for r in log["runs"][0]["results"]}


def test_every_kind_validates_against_the_official_schema(sarif_validator) -> None:
    log = to_sarif(sample(), base_dir=BASE)
    assert_valid(sarif_validator, log)
    assert log["version"] == "2.1.0" and log["$schema"].endswith("sarif-2.1.0.json")


def test_render_sarif_is_the_same_log(sarif_validator) -> None:
    log = json.loads(render(sample(), "sarif", base_dir=BASE))
    assert log == json.loads(json.dumps(to_sarif(sample(), base_dir=BASE)))


def test_suppressed_and_error_reports_validate(sarif_validator) -> None:
    report = sample()
    benign = report.findings.pop(0)
    benign.suppressed = "suppression 'data-race:*fc1*' (raceguard.supp:3)"
    report.suppressed = [benign]
    report.error = "internal error in engine/hb.py:120"
    log = to_sarif(report, base_dir=BASE)
    assert_valid(sarif_validator, log)
    suppressed = results_by_rule(log)["data-race"]
    assert suppressed["suppressions"] == [{"kind": "external", "justification": "suppression 'data-race:*fc1*' (raceguard.supp:3)"}]
    assert all("suppressions" not in r for r in log["runs"][0]["results"] if r["ruleId"] != "data-race")
    invocation = log["runs"][0]["invocations"][0]
    assert invocation["executionSuccessful"] is False
    assert invocation["toolExecutionNotifications"][0]["message"]["text"] == report.error


def test_driver_and_rules() -> None:
    driver = to_sarif(sample(), base_dir=BASE)["runs"][0]["tool"]["driver"]
    assert driver["name"] == "raceguard"
    assert driver["informationUri"] == "https://github.com/raceguard/raceguard"
    assert [rule["id"] for rule in driver["rules"]] == list(KINDS)
    for rule in driver["rules"]:
        assert rule["name"] and rule["shortDescription"]["text"] and rule["fullDescription"]["text"]
        assert rule["help"]["text"] and rule["help"]["markdown"]
    levels = {rule["id"]: rule["defaultConfiguration"]["level"] for rule in driver["rules"]}
    assert levels["shared-rng"] == levels["thread-local-mode"] == "warning"
    assert levels["data-race"] == levels["lock-order-cycle"] == "error"


def test_results_rule_ids_levels_and_fingerprints() -> None:
    report = sample()
    results = to_sarif(report, base_dir=BASE)["runs"][0]["results"]
    assert [r["ruleId"] for r in results] == list(KINDS)
    for result, finding in zip(results, report.findings):
        assert result["ruleIndex"] == KINDS.index(finding.kind)
        assert result["level"] == finding.severity
        assert result["message"]["text"].startswith(finding.message)
        assert result["partialFingerprints"] == {FINGERPRINT_KEY: finding.fingerprint}


def test_data_race_locations_are_repository_relative() -> None:
    log = to_sarif(sample(), base_dir=BASE)
    run = log["runs"][0]
    assert run["originalUriBaseIds"] == {SRCROOT: {"uri": "file:///repo/"}}
    race = results_by_rule(log)["data-race"]
    primary = race["locations"][0]["physicalLocation"]
    assert primary == {"artifactLocation": {"uri": "src/train.py", "uriBaseId": SRCROOT}, "region": {"startLine": 42}}
    assert race["message"]["text"].endswith("Hint: Take ckpt_lock around optimizer.step() too, or copy the weights under the lock.")
    related = race["relatedLocations"]
    assert len(related) == 1
    assert related[0]["physicalLocation"]["artifactLocation"] == {"uri": "src/ckpt.py", "uriBaseId": SRCROOT}
    assert related[0]["physicalLocation"]["region"] == {"startLine": 30}
    assert related[0]["message"]["text"].startswith("read by thread 'checkpointer'")


def test_code_flows_hold_one_thread_flow_per_access() -> None:
    race = results_by_rule(to_sarif(sample(), base_dir=BASE))["data-race"]
    flows = race["codeFlows"][0]["threadFlows"]
    assert [f["id"] for f in flows] == ["thread:trainer", "thread:checkpointer"]
    steps = flows[0]["locations"]
    # Execution order: user frames outermost first, then the library frames below the access.
    uris = [(s["location"]["physicalLocation"]["artifactLocation"]["uri"], s["location"]["physicalLocation"]["region"]["startLine"]) for s in steps]
    assert uris == [
        ("src/train.py", 57),
        ("src/train.py", 42),
        ("file:///usr/lib/python3.11/site-packages/torch/optim/optimizer.py", 487),
        ("file:///usr/lib/python3.11/site-packages/torch/optim/adam.py", 166),
        ("file:///usr/lib/python3.11/site-packages/torch/optim/adam.py", 410),
    ]
    assert [s["importance"] for s in steps] == ["important", "essential", "unimportant", "unimportant", "unimportant"]
    assert "uriBaseId" not in steps[2]["location"]["physicalLocation"]["artifactLocation"]


def test_lock_order_cycle_relates_both_edges() -> None:
    cycle = results_by_rule(to_sarif(sample(), base_dir=BASE))["lock-order-cycle"]
    assert cycle["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] == "src/train.py"
    assert [r["physicalLocation"]["artifactLocation"]["uri"] for r in cycle["relatedLocations"]] == ["src/ckpt.py"]
    assert len(cycle["codeFlows"][0]["threadFlows"]) == 2


def test_finding_without_stack_points_at_the_script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sarif_validator) -> None:
    monkeypatch.chdir(tmp_path)
    failure = Finding("target-failure", "train.py", "thread", "target timed out", [])
    log = to_sarif(Report("stress", ["train.py", "--epochs", "1"], [failure]))
    assert_valid(sarif_validator, log)
    result = log["runs"][0]["results"][0]
    assert result["locations"][0]["physicalLocation"] == {"artifactLocation": {"uri": "train.py", "uriBaseId": SRCROOT}, "region": {"startLine": 1}}
    assert "codeFlows" not in result and "relatedLocations" not in result
    assert log["runs"][0]["originalUriBaseIds"][SRCROOT]["uri"] == tmp_path.resolve().as_uri() + "/"


def test_odd_file_names(tmp_path: Path, sarif_validator) -> None:
    access = Access(
        "t",
        "thread:t",
        "write",
        None,
        [],
        [Frame("<string>", 3, "exec_body"), Frame(str(tmp_path / "my dir" / "a#b.py"), 9, "main")],
    )
    other = Access("u", "thread:u", "read", None, [], [Frame("<stdin>", 1, "<module>")])
    finding = Finding("data-race", "x", "tensor", "m", [access, other])
    log = to_sarif(Report("check", ["-c"], [finding]), base_dir=tmp_path)
    assert_valid(sarif_validator, log)
    result = log["runs"][0]["results"][0]
    # "<string>" is no file: the primary location falls back to the first real file.
    assert result["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] == "my%20dir/a%23b.py"
    first_step = result["codeFlows"][0]["threadFlows"][0]["locations"][1]["location"]
    assert "physicalLocation" not in first_step
    assert first_step["logicalLocations"] == [{"name": "exec_body", "kind": "function"}]


def _save_race() -> Report:
    """pool.submit(torch.save, ...) racing the loop: the pool thread's read has only torch's
    frames, listed first; the main thread's write is the loop's line."""
    submit = Origin(
        kind="task-submit",
        stack=[Frame(f"{BASE}/train.py", 29, "<module>"), Frame("/usr/lib/python3.11/concurrent/futures/thread.py", 173, "submit", user=False)],
        thread="MainThread",
    )
    started = Origin(kind="thread-start", stack=[Frame(f"{BASE}/train.py", 12, "start_all")], thread="MainThread")
    finding = Finding(
        kind="data-race",
        resource="model.fc1.weight",
        resource_kind="parameter",
        message="data race on parameter model.fc1.weight",
        accesses=[
            Access(
                "ThreadPoolExecutor-0_0",
                "thread:ThreadPoolExecutor-0_0",
                "read",
                "torch.save",
                [],
                [Frame("/usr/lib/python3.11/site-packages/torch/serialization.py", 1253, "_save", user=False)],
                origin=submit,
            ),
            Access("trainer", "thread:trainer", "write", "aten::add_.Tensor", [], [Frame(f"{BASE}/train.py", 32, "step")], origin=started),
        ],
    )
    return Report(command="check", target=["train.py"], findings=[finding], target_exit_code=0)


def _where(location: dict) -> tuple[str, int]:
    physical = location["physicalLocation"]
    return physical["artifactLocation"]["uri"], physical["region"]["startLine"]


def test_library_only_access_is_located_at_its_submission(sarif_validator) -> None:
    log = to_sarif(_save_race(), base_dir=BASE)
    assert_valid(sarif_validator, log)
    result = log["runs"][0]["results"][0]
    primary = result["locations"][0]
    assert _where(primary) == ("train.py", 29)  # not torch/serialization.py
    assert primary["message"]["text"] == (
        "read by thread 'ThreadPoolExecutor-0_0' (torch.save) with locks held: none, in library code; "
        f"task submitted at {BASE}/train.py:29 in <module> by thread 'MainThread'"
    )
    related = result["relatedLocations"]
    # The write at its own line, then the writer's thread start; the read's origin is already its location.
    assert [(r["id"], _where(r)) for r in related] == [(1, ("train.py", 32)), (3, ("train.py", 12))]
    assert related[1]["message"]["text"] == (
        f"thread started at {BASE}/train.py:12 in start_all by thread 'MainThread' (for the write by thread 'trainer')"
    )


def test_access_with_user_frames_keeps_its_own_location() -> None:
    report = _save_race()
    report.findings[0].accesses.reverse()
    result = to_sarif(report, base_dir=BASE)["runs"][0]["results"][0]
    assert _where(result["locations"][0]) == ("train.py", 32)
    ids = [(r["id"], _where(r)) for r in result["relatedLocations"]]
    assert ids == [(1, ("train.py", 29)), (2, ("train.py", 12))]
