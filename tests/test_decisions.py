"""The decisions file: round trip, layout, one-line errors naming file and field, merge."""

from __future__ import annotations

import json

import pytest

from safer_audit.data import pair_digest
from safer_audit.errors import DecisionsError, SaferAuditError
from safer_audit.workflows import decisions as dec

A, B = pair_digest("ctx", "yes", "no"), pair_digest("ctx", "no", "yes")


def test_round_trip_sorted_one_decision_per_line(tmp_path):
    decisions = {}
    dec.decide(decisions, B, "ok", reviewer="Bo <bo@x.org>", at="2026-11-24T14:00:00Z", where="d.jsonl:2")
    dec.decide(decisions, A, dec.Verdict.FLIPPED, reviewer="Ann", note="swapped", pair_id="p1",
               at="2026-11-24T14:01:00Z")
    path = dec.write_decisions(tmp_path / "decisions.json", decisions)
    text = path.read_text()
    assert dec.read_decisions(path) == decisions
    data = json.loads(text)
    assert data["format"] == "safer-audit-decisions" and data["version"] == 1
    lines = text.splitlines()
    entry_lines = [line for line in lines if line.strip().startswith('"' + A) or line.strip().startswith('"' + B)]
    assert len(entry_lines) == 2 and sorted([A, B]) == [line.split('"')[1] for line in entry_lines]
    for line in entry_lines:  # each line is one whole decision
        assert json.loads(line.split(": ", 1)[1].rstrip(","))["verdict"] in ("ok", "flipped")
    # the same decisions give the same bytes
    assert dec.decisions_text(dict(reversed(list(decisions.items())))) == text


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d["decisions"][A].pop("verdict"), f"decisions.{A}.verdict"),
    (lambda d: d["decisions"][A].update(verdict="maybe"), f"decisions.{A}.verdict"),
    (lambda d: d["decisions"][A].update(at="yesterday"), f"decisions.{A}.at"),
    (lambda d: d["decisions"][A].update(note=3), f"decisions.{A}.note"),
    (lambda d: d["decisions"][A].update(colour="red"), f"decisions.{A}.colour"),
    (lambda d: d["decisions"].update({"xyz": d["decisions"][A]}), "decisions.xyz"),
    (lambda d: d.update(version=2), "version"),
    (lambda d: d.update(format="other"), "format"),
    (lambda d: d.update(decisions=[]), "decisions"),
])
def test_bad_files_are_one_line_errors_naming_file_and_field(tmp_path, mutate, field):
    data = {"format": "safer-audit-decisions", "version": 1,
            "decisions": {A: {"verdict": "ok", "at": "2026-11-24T14:00:00Z", "reviewer": "Ann"}}}
    mutate(data)
    path = tmp_path / "d.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DecisionsError) as info:
        dec.read_decisions(path)
    message = str(info.value)
    assert isinstance(info.value, SaferAuditError) and "\n" not in message
    assert message.startswith(f"{path}: ") and f'field "{field}"' in message


def test_unreadable_and_missing(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('{"format": "safer-audit-decisions", "version": 1, "decisions": {')
    with pytest.raises(DecisionsError, match=r"d.json:1: not valid JSON"):
        dec.read_decisions(path)
    path.write_text('{"format": "safer-audit-decisions", "version": 1, "decisions": {}, "version": 1}')
    with pytest.raises(DecisionsError, match="appears twice"):
        dec.read_decisions(path)
    assert dec.read_decisions(tmp_path / "none.json", missing_ok=True) == {}
    with pytest.raises(DecisionsError, match="no decisions file"):
        dec.read_decisions(tmp_path / "none.json")


def test_merge_later_decision_wins():
    early = {A: dec.Decision("flipped", "2026-11-24T14:00:00Z", "Ann")}
    late = {A: dec.Decision("ok", "2026-11-24T15:00:00Z", "Bo"), B: dec.Decision("noisy", "2026-11-24T13:00:00Z", "Bo")}
    assert dec.merge(early, late) == late
    assert dec.merge(late, early) == late  # by time, not by order
    same = {A: dec.Decision("noisy", "2026-11-24T15:00:00Z", "Cy")}
    assert dec.merge(late, same)[A].reviewer == "Cy"
    assert dec.ok_digests(dec.merge(early, late)) == {A}


def test_default_reviewer_without_git(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert dec.default_reviewer() == "unknown"
