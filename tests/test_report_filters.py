"""Suppressions and baselines."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from raceguard.config import ConfigError
from raceguard.report.filters import (
    Suppressions,
    apply_baseline,
    apply_filters,
    load_baseline,
    write_baseline,
)
from raceguard.report.finding import Access, Finding, Frame


def race(resource: str = "model.fc1.weight", file: str = "/repo/src/hogwild.py", function: str = "train_step",
         locks: list[str] | None = None) -> Finding:
    return Finding(
        kind="data-race",
        resource=resource,
        resource_kind="parameter",
        message=f"data race on {resource}",
        accesses=[
            Access("w1", "thread:w1", "write", "aten::add_", locks or [], [Frame(file, 10, function), Frame("/venv/torch/optim/sgd.py", 5, "sgd", user=False)]),
            Access("w2", "thread:w2", "read", "aten::mm", [], [Frame("/repo/src/eval.py", 7, "evaluate")]),
        ],
    )


def cycle() -> Finding:
    return Finding(
        kind="lock-order-cycle",
        resource="model_lock",
        resource_kind="lock",
        message="cycle",
        accesses=[Access("a", "thread:a", "acquire", None, ["model_lock (train.py:3)"], [Frame("/repo/train.py", 40, "step")], {"lock": "io_lock"})],
        details={"cycle": ["model_lock", "io_lock"]},
    )


def suppressed_by(rules: str, finding: Finding) -> bool:
    kept, suppressed = Suppressions.parse(rules, source="test.supp").apply([finding])
    return bool(suppressed)


@pytest.mark.parametrize(
    "rule, finding, expected",
    [
        ("data-race:*model.fc1.*", race(), True),
        ("data-race:*model.fc2.*", race(), False),
        ("data-race:model.fc1.weight", race(), True),
        ("data-race:model.fc?.weight", race(), True),
        # resource names contain brackets: they match literally as well as as a glob class
        ("data-race:optimizer[Adam].state[*", race("optimizer[Adam].state[model.w].exp_avg"), True),
        ("data-race:*ckpt_lock*", race(locks=["ckpt_lock (train.py:12)"]), True),
        ("data-race:ckpt_lock", race(locks=["ckpt_lock (train.py:12)"]), True),  # bare lock name
        ("lock-order-cycle:*io_lock*", cycle(), True),  # lock only in the cycle
        ("lock-order-cycle:model_lock", cycle(), True),
        ("data-race:/repo/src/hogwild.py", race(), True),  # full path
        ("data-race:src/hogwild.py", race(), True),  # path suffix
        ("data-race:hogwild.py", race(), True),
        ("data-race:rc/hogwild.py", race(), False),  # suffixes end on a '/' boundary
        ("data-race:src/*.py", race(), True),
        ("data-race:*/torch/*", race(), True),  # library frames count too
        ("data-race:train_step", race(), True),  # function
        ("data-race:evaluate", race(), True),  # the other access's function
        ("data-race:train_*", race(), True),
        ("data-race:sgd", race(), True),
        ("data-race:nothing_here", race(), False),
        ("*:*", race(), True),
        ("*:*model.fc1*", race(), True),
        ("*:*io_lock*", cycle(), True),
        ("deadlock:*", race(), False),  # kind must match
        ("lock-order-cycle:*model.fc1*", race(), False),
    ],
)
def test_pattern_types(rule: str, finding: Finding, expected: bool) -> None:
    assert suppressed_by(rule, finding) is expected


def test_fingerprint_pattern() -> None:
    finding = race()
    assert suppressed_by(f"data-race:{finding.fingerprint}", finding)


def test_windows_paths_match_with_forward_slashes() -> None:
    assert suppressed_by("data-race:src/hogwild.py", race(file="C:\\repo\\src\\hogwild.py"))


def test_comments_blank_lines_and_reasons(tmp_path: Path) -> None:
    path = tmp_path / "raceguard.supp"
    path.write_text(
        "# known benign races\n"
        "\n"
        "   # indented comment\n"
        "deadlock:*   # trailing comment\n"
        "data-race:*model.fc1.*\n",
        encoding="utf-8",
    )
    suppressions = Suppressions.load(path)
    assert [r.text for r in suppressions.rules] == ["deadlock:*", "data-race:*model.fc1.*"]
    original = race()
    kept, suppressed = suppressions.apply([original, race("model.fc2.weight")])
    assert [f.resource for f in kept] == ["model.fc2.weight"]
    assert suppressed[0].suppressed == f"suppression 'data-race:*model.fc1.*' ({path}:5)"
    assert original.suppressed is None  # inputs are not mutated
    assert suppressed[0].fingerprint == original.fingerprint


def test_findings_marked_benign_are_moved_to_suppressed() -> None:
    benign = race()
    benign.suppressed = "raceguard.benign() at train.py:5"
    kept, suppressed = Suppressions().apply([benign, race("other")])
    assert [f.resource for f in kept] == ["other"]
    assert suppressed == [benign] and suppressed[0].suppressed == "raceguard.benign() at train.py:5"


@pytest.mark.parametrize(
    "text, line, fragment",
    [
        ("data-race:*\nrace:*fc1*\n", 2, "unknown finding kind 'race'"),
        ("# c\n\n\ndata-race *fc1*\n", 4, "expected KIND:PATTERN"),
        ("data-race:\n", 1, "expected KIND:PATTERN"),
        (":pattern\n", 1, "expected KIND:PATTERN"),
        ("Data-Race:x\n", 1, "unknown finding kind"),
    ],
)
def test_bad_lines_raise_config_error_with_line(text: str, line: int, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        Suppressions.parse(text, source="proj.supp")
    assert f"proj.supp:{line}:" in str(info.value) and fragment in str(info.value)


def test_unreadable_suppressions_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="missing.supp: cannot read suppressions file"):
        Suppressions.load(tmp_path / "missing.supp")
    with pytest.raises(ConfigError, match="cannot read suppressions file"):
        Suppressions.load(tmp_path)  # a directory
    binary = tmp_path / "binary.supp"
    binary.write_bytes(b"\xff\xfe\x00data-race")
    with pytest.raises(ConfigError, match="binary.supp"):
        Suppressions.load(binary)


# --- baselines -------------------------------------------------------------------------------


def test_baseline_round_trip_filters_known_and_lists_fixed(tmp_path: Path) -> None:
    known, gone, new = race("model.a"), race("model.b"), race("model.c")
    path = tmp_path / "baseline.json"
    write_baseline(path, [known, gone, known])  # duplicates collapse
    document = json.loads(path.read_text(encoding="utf-8"))
    assert document["version"] == 1
    fingerprints = [e["fingerprint"] for e in document["fingerprints"]]
    assert fingerprints == sorted({known.fingerprint, gone.fingerprint})
    assert {e["resource"] for e in document["fingerprints"]} == {"model.a", "model.b"}
    assert all(e["kind"] == "data-race" for e in document["fingerprints"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["baseline.json"]  # no temp files left

    baseline = load_baseline(path)
    kept, known_findings, fixed = apply_baseline([known, new], baseline)
    assert [f.resource for f in kept] == ["model.c"]
    assert [f.resource for f in known_findings] == ["model.a"]
    assert known_findings[0].suppressed == f"in baseline {path}"
    assert known.suppressed is None
    assert fixed == [gone.fingerprint]


def test_hand_written_baseline_with_plain_fingerprints(tmp_path: Path) -> None:
    path = tmp_path / "b.json"
    path.write_text(json.dumps({"version": 1, "fingerprints": [race().fingerprint]}), encoding="utf-8")
    assert race().fingerprint in load_baseline(path)


@pytest.mark.parametrize(
    "content, fragment",
    [
        ("{not json", "not valid JSON"),
        ('{"version": 2, "fingerprints": []}', "not a raceguard baseline"),
        ('[1, 2]', "not a raceguard baseline"),
        ('{"version": 1, "fingerprints": {}}', "must be a list"),
        ('{"version": 1, "fingerprints": [{"kind": "data-race"}]}', "entry 0"),
        ('{"version": 1, "fingerprints": ["XYZ"]}', "entry 0"),
    ],
)
def test_invalid_baseline(tmp_path: Path, content: str, fragment: str) -> None:
    path = tmp_path / "b.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError, match=fragment) as info:
        load_baseline(path)
    assert str(path) in str(info.value)


def test_unreadable_baseline(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read baseline"):
        load_baseline(tmp_path / "nope.json")


def test_apply_filters_baseline_then_suppressions(tmp_path: Path) -> None:
    in_baseline, suppressed_and_in_baseline, fresh, silenced = race("a"), race("b"), race("c"), race("d")
    path = tmp_path / "baseline.json"
    write_baseline(path, [in_baseline, suppressed_and_in_baseline, race("fixed")])
    result = apply_filters(
        [in_baseline, suppressed_and_in_baseline, fresh, silenced],
        Suppressions.parse("data-race:d\ndata-race:b\n"),
        load_baseline(path),
    )
    assert [f.resource for f in result.kept] == ["c"]
    assert sorted(f.resource for f in result.suppressed) == ["a", "b", "d"]
    # "b" is both baselined and suppressed but still present: not fixed.
    assert result.fixed == [race("fixed").fingerprint]


def test_apply_filters_without_filters() -> None:
    result = apply_filters([race()])
    assert [f.resource for f in result.kept] == ["model.fc1.weight"] and result.suppressed == [] and result.fixed == []


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can write anywhere")
def test_write_baseline_into_read_only_directory_fails_cleanly(tmp_path: Path) -> None:
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(OSError):
            write_baseline(tmp_path / "b.json", [race()])
    finally:
        tmp_path.chmod(0o700)
    assert list(tmp_path.iterdir()) == []
