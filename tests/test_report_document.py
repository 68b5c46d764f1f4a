"""The report document: JSON schema, validation, round trip, exit codes, atomic writes."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raceguard.report.document import (
    FORMATS,
    Report,
    load_schema,
    tool_version,
    validate_report,
    write_atomic,
)
from raceguard.report.finding import (
    KINDS,
    MODES,
    ORIGIN_KINDS,
    RESOURCE_KINDS,
    SEVERITIES,
    Access,
    Finding,
    Frame,
    Origin,
)
from raceguard.report.render import render

DATA = Path(__file__).parent / "data"


def load_sample() -> dict:
    return json.loads((DATA / "report-all-kinds.json").read_text(encoding="utf-8"))


def finding(kind: str = "data-race", severity: str = "error", suppressed: str | None = None) -> Finding:
    return Finding(
        kind=kind,
        resource="model.fc1.weight",
        resource_kind="parameter",
        message=f"{kind} on model.fc1.weight",
        accesses=[Access("trainer", "thread:trainer", "write", "aten::add_.Tensor", [], [Frame("train.py", 42, "step")])],
        severity=severity,
        suppressed=suppressed,
    )


# --- schema ----------------------------------------------------------------------------------


def test_sample_report_covers_every_kind() -> None:
    kinds = {f["kind"] for f in load_sample()["findings"]}
    assert kinds == set(KINDS)


def test_schema_is_a_valid_draft_2020_12_schema() -> None:
    schema = load_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)


def test_schema_enums_match_the_finding_module() -> None:
    defs = load_schema()["$defs"]
    assert defs["finding"]["properties"]["kind"]["enum"] == list(KINDS)
    assert defs["finding"]["properties"]["severity"]["enum"] == list(SEVERITIES)
    assert defs["finding"]["properties"]["resource_kind"]["enum"] == list(RESOURCE_KINDS)
    assert defs["access"]["properties"]["mode"]["enum"] == list(MODES)


def test_rendered_json_of_every_kind_validates() -> None:
    report = Report.from_dict(load_sample())
    document = json.loads(render(report, "json"))
    validate_report(document)
    jsonschema.Draft202012Validator(load_schema()).validate(document)
    assert [f["kind"] for f in document["findings"]] == list(KINDS)


def test_round_trip_is_lossless() -> None:
    original = load_sample()
    assert Report.from_dict(original).to_dict() == original


def test_round_trip_with_optional_fields() -> None:
    report = Report(
        command="check",
        target=["train.py"],
        findings=[finding()],
        target_exit_code=None,
        error="internal error in engine/races.py:120",
        target_outcome={"kind": "timeout", "code": None, "signal": None, "detail": "10"},
        suppressed=[finding("shared-rng", "warning", suppressed="raceguard.benign at train.py:3")],
        fixed=["ffffffffffffffff", "0000000000000000"],
    )
    d = report.to_dict()
    validate_report(d)
    assert d["status"] == "error"
    assert d["fixed"] == ["0000000000000000", "ffffffffffffffff"]
    assert d["suppressed"][0]["suppressed"] == "raceguard.benign at train.py:3"
    assert Report.from_dict(d).to_dict() == d


def test_user_frame_flags_survive_the_round_trip() -> None:
    report = Report.from_dict(load_sample())
    stack = report.findings[0].accesses[0].stack
    assert [f.user for f in stack] == [True, True, False, False, False]


def test_partial_outcome_is_completed_with_nulls() -> None:
    d = Report("check", ["t.py"], [], 0, target_outcome={"kind": "exit", "code": 0}).to_dict()
    assert d["target_outcome"] == {"kind": "exit", "code": 0, "signal": None, "detail": None}
    validate_report(d)


@pytest.mark.parametrize("field", ["version", "tool", "command", "target", "status", "target_exit_code", "findings", "stats"])
def test_missing_top_level_field_fails_validation(field: str) -> None:
    d = load_sample()
    del d[field]
    with pytest.raises(ValueError, match=field):
        validate_report(d)


@pytest.mark.parametrize("field", ["kind", "severity", "fingerprint", "message", "resource", "resource_kind", "accesses", "reproduce"])
def test_missing_finding_field_fails_validation(field: str) -> None:
    d = load_sample()
    del d["findings"][2][field]
    with pytest.raises(ValueError, match=r"\$\.findings\[2\]"):
        validate_report(d)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.update(version=2),
        lambda d: d.update(status="dirty"),
        lambda d: d.update(command="run"),
        lambda d: d["findings"][0].update(kind="race"),
        lambda d: d["findings"][0].update(fingerprint="8B453967AA4BE495"),
        lambda d: d["findings"][0]["accesses"][0].update(mode="modify"),
        lambda d: d["findings"][0]["accesses"][0]["stack"][0].update(line="42"),
        lambda d: d["stats"].pop("wall_seconds"),
        lambda d: d["findings"][0]["reproduce"].pop("seed"),
        lambda d: d.update(target_outcome={"kind": "crashed", "code": None, "signal": None, "detail": None}),
    ],
)
def test_invalid_values_fail_validation(mutate) -> None:
    d = load_sample()
    mutate(d)
    with pytest.raises(ValueError):
        validate_report(d)


def test_fallback_validation_without_jsonschema(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "jsonschema", None)  # makes `import jsonschema` raise ImportError
    validate_report(load_sample())
    d = load_sample()
    del d["findings"][0]["accesses"][0]["locks_held"]
    d["findings"][1]["kind"] = "race"
    del d["stats"]["ops"]
    with pytest.raises(ValueError) as info:
        validate_report(d)
    message = str(info.value)
    assert "locks_held" in message and "'race'" in message and "ops" in message


def test_from_dict_rejects_other_versions() -> None:
    d = load_sample()
    d["version"] = 2
    with pytest.raises(ValueError, match="version"):
        Report.from_dict(d)


def test_tool_version_comes_from_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    import raceguard
    import raceguard.version

    assert tool_version() == raceguard.__version__ == raceguard.version.__version__
    monkeypatch.setattr(raceguard.version, "__version__", "9.8.7")
    assert tool_version() == "9.8.7"
    assert Report("check", [], []).to_dict()["tool"] == {"name": "raceguard", "version": "9.8.7"}


# --- status and exit codes -------------------------------------------------------------------


def test_status() -> None:
    assert Report("check", [], []).status() == "clean"
    assert Report("check", [], [finding()]).status() == "findings"
    assert Report("check", [], [finding()], error="boom").status() == "error"


def test_stats_defaults_are_filled_in() -> None:
    report = Report("check", [], [], stats={"threads": 2})
    assert report.stats == {"threads": 2, "ops": 0, "schedules_run": 1, "first_failure_at": None, "wall_seconds": 0.0}


EXIT = {"kind": "exit", "code": 0, "signal": None, "detail": None}
SEGV = {"kind": "signal", "code": -11, "signal": "SIGSEGV", "detail": None}


@pytest.mark.parametrize(
    "kwargs, fail_on, expected",
    [
        ({}, "error", 0),
        ({"target_outcome": EXIT}, "error", 0),
        ({"error": "boom", "findings": [finding()]}, "error", 4),
        ({"findings": [finding()]}, "error", 1),
        ({"findings": [finding(severity="warning")]}, "error", 0),
        ({"findings": [finding(severity="warning")]}, "warning", 1),
        ({"findings": [finding(suppressed="benign")]}, "warning", 0),
        ({"target_outcome": SEGV}, "error", 3),
        ({"target_exit_code": 2}, "error", 3),
        ({"target_outcome": {**EXIT, "code": 5}}, "error", 3),
        ({"target_outcome": {"kind": "timeout"}}, "error", 3),
        ({"target_outcome": SEGV, "findings": [finding()]}, "error", 1),
        ({"target_outcome": SEGV, "findings": [finding(severity="warning")]}, "error", 3),
    ],
)
def test_exit_code(kwargs: dict, fail_on: str, expected: int) -> None:
    kwargs.setdefault("findings", [])
    assert Report(command="check", target=["t.py"], **kwargs).exit_code(fail_on) == expected


def test_exit_code_rejects_unknown_fail_on() -> None:
    with pytest.raises(ValueError):
        Report("check", [], []).exit_code("info")


# --- rendering and writing -------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_render_every_format(fmt: str) -> None:
    text = render(Report.from_dict(load_sample()), fmt)
    assert text.endswith("\n") and len(text) > 100


def test_render_unknown_format() -> None:
    with pytest.raises(ValueError, match="unknown format"):
        render(Report("check", [], []), "html")


def test_write_atomic_writes_and_replaces(tmp_path: Path) -> None:
    target = tmp_path / "report.json"
    write_atomic(target, "first\n")
    write_atomic(target, "second — ünïcode\n")
    assert target.read_text(encoding="utf-8") == "second — ünïcode\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_write_atomic_failure_keeps_old_file_and_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "report.json"
    target.write_text("old\n", encoding="utf-8")
    with pytest.raises(UnicodeEncodeError):
        write_atomic(target, "new \udcff lone surrogate")  # cannot be encoded: fails mid-write
    assert target.read_text(encoding="utf-8") == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_write_atomic_gives_normal_permissions(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    os.umask(umask)
    target = tmp_path / "new.json"
    write_atomic(target, "{}\n")
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    target.chmod(0o640)
    write_atomic(target, "{}\n")
    assert stat.S_IMODE(target.stat().st_mode) == 0o640


def test_write_atomic_relative_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_atomic("out.json", "x")
    assert (tmp_path / "out.json").read_text() == "x"


# --- property: any well-formed finding serialises to a valid, round-tripping report -----------

_names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=20)
_frames = st.builds(Frame, file=_names, line=st.integers(0, 10**6), function=_names, user=st.booleans())
_accesses = st.builds(
    Access,
    thread=_names,
    timeline=_names,
    mode=st.sampled_from(MODES),
    op=st.none() | _names,
    locks_held=st.lists(_names, max_size=3),
    # The contract orders user frames first; from_dict relies on it.
    stack=st.lists(_frames, max_size=4).map(lambda fs: sorted(fs, key=lambda f: not f.user)),
)
_findings = st.builds(
    Finding,
    kind=st.sampled_from(KINDS),
    resource=_names,
    resource_kind=st.sampled_from(RESOURCE_KINDS),
    message=_names,
    accesses=st.lists(_accesses, max_size=3),
    severity=st.sampled_from(SEVERITIES),
    hint=st.none() | _names,
)


@settings(max_examples=60, deadline=None)
@given(findings=st.lists(_findings, max_size=3), exit_code=st.none() | st.integers(-255, 255))
def test_any_report_validates_and_round_trips(findings: list[Finding], exit_code: int | None) -> None:
    report = Report("check", ["t.py"], findings, exit_code)
    d = json.loads(render(report, "json"))
    validate_report(d)
    assert Report.from_dict(d).to_dict() == d


def test_reporting_layer_never_imports_torch() -> None:
    import subprocess

    code = (
        "import sys; sys.modules['torch'] = None\n"  # any `import torch` now raises ImportError
        "import raceguard.config, raceguard.report\n"
        "from raceguard.report import document, text, sarif, junit, filters\n"
        "from raceguard.report import Report, render\n"
        "print(render(Report('check', ['t.py'], []), 'text'), end='')\n"
    )
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("raceguard: clean")


def test_importing_findings_does_not_import_the_writers() -> None:
    import subprocess

    code = "import sys, raceguard.report.finding; print('rich' in sys.modules)"
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False", done.stderr


# --- origins (where an access's thread was started or its task submitted) ------------------------


def _save_race(origin: Origin | None) -> Finding:
    """pool.submit(torch.save, ...) racing the loop: the pool access has only torch's frames."""
    return Finding(
        kind="data-race",
        resource="model.fc1.weight",
        resource_kind="parameter",
        message="data race on parameter model.fc1.weight",
        accesses=[
            Access("MainThread", "thread:MainThread", "write", "aten::add_.Tensor", [], [Frame("train.py", 32, "<module>")]),
            Access(
                "ThreadPoolExecutor-0_0",
                "thread:ThreadPoolExecutor-0_0",
                "read",
                "torch.save",
                [],
                [Frame("torch/serialization.py", 1253, "_save", user=False)],
                origin=origin,
            ),
        ],
    )


SUBMIT = Origin(
    kind="task-submit",
    stack=[Frame("train.py", 29, "<module>"), Frame("concurrent/futures/thread.py", 173, "submit", user=False)],
    thread="MainThread",
)


def test_origin_round_trips_and_validates() -> None:
    report = Report(command="check", target=["train.py"], findings=[_save_race(SUBMIT)], target_exit_code=0)
    d = report.to_dict()
    validate_report(d)
    jsonschema.Draft202012Validator(load_schema()).validate(d)
    origin = d["findings"][0]["accesses"][1]["origin"]
    assert origin == {
        "kind": "task-submit",
        "stack": [
            {"file": "train.py", "line": 29, "function": "<module>"},
            {"file": "concurrent/futures/thread.py", "line": 173, "function": "submit"},
        ],
        "user_frames": 1,
        "thread": "MainThread",
    }
    assert "origin" not in d["findings"][0]["accesses"][0]  # the main thread has none
    back = Report.from_dict(d)
    assert back.to_dict() == d
    assert [f.user for f in back.findings[0].accesses[1].origin.stack] == [True, False]


def test_origin_never_changes_the_fingerprint() -> None:
    started = Origin(kind="thread-start", stack=[Frame("elsewhere.py", 3, "helper")])
    assert _save_race(None).fingerprint == _save_race(SUBMIT).fingerprint == _save_race(started).fingerprint


def test_schema_origin_kinds_match_the_finding_module() -> None:
    origin = load_schema()["$defs"]["origin"]
    assert origin["properties"]["kind"]["enum"] == list(ORIGIN_KINDS)
    assert load_schema()["$defs"]["access"]["properties"]["origin"] == {"$ref": "#/$defs/origin"}


def test_unknown_origin_kind_fails_validation() -> None:
    d = Report(command="check", target=["train.py"], findings=[_save_race(SUBMIT)], target_exit_code=0).to_dict()
    d["findings"][0]["accesses"][1]["origin"]["kind"] = "spawned"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(load_schema()).validate(d)
