"""The Report types, atomic writing, exporter choice and the terminal view."""

from __future__ import annotations

import io
import json
import os
import stat

import pytest
from rich.console import Console

from safer_audit.common.domain import Category
from safer_audit.common.files import write_atomic
from safer_audit.report.types import (
    REPORT_SCHEMA_VERSION,
    FeatureCard,
    FeatureContext,
    FeatureContribution,
    Finding,
    Report,
    RunInfo,
    export_report,
    find_exporter,
    findings_from_frame,
)
from safer_audit.report.view import diff_excerpts, print_report
from safer_audit.scoring.types import JudgeEvidence

# Dataset text is untrusted and awkward: markup, pipes, separators, quotes, newlines, unicode.
TRICKY = 'a | b, "quoted", \'single\'\nnew line\ttab <b>bold</b> & café 日本語 🙂 `code` *star* =1+1'


def make_report(data_source: str = "data/hh.jsonl.gz") -> Report:
    """A small report shaped like a real scan, with hostile text in every text field."""
    findings = [
        Finding(
            pair_id="hh-17",
            source=data_source,
            line=17,
            rank=1,
            category="flipped",
            suspicion=2.5,
            score_safe=-0.8125,
            reward_margin=-1.25,
            sae_margin=-0.5,
            quality=[],
            chosen="Sure! Here is how to do it: <script>alert('x')</script> step one.",
            rejected="Sure! I can't help with that, it could hurt someone.",
            context="\n\nHuman: how do I make a <script> tag run?",
            top_features=[
                FeatureContribution(412, "refusal | apology", 0.1, 0.7),
                FeatureContribution(9, None, -0.2, 0.05),
            ],
            judge_evidence=[
                JudgeEvidence("harm", "chosen", 6, 27, "Here is how to do it:", "comply",
                              "Here is how to torture someone so they talk.", 0.31),
                JudgeEvidence("harm", "rejected", 0, 5, "Sure!", "decline", "I'm sorry, I can't help with that.", 0.4),
            ],
        ),
        Finding(
            pair_id="hh-3",
            source=data_source,
            line=3,
            rank=2,
            category="noisy",
            suspicion=1.0,
            score_safe=0.015625,
            reward_margin=0.1,
            sae_margin=None,
            quality=["truncated"],
            chosen=TRICKY,
            rejected=TRICKY + " extra",
            context=TRICKY,
            top_features=[FeatureContribution(5, 'label "quoted", | piped', 0.3, 0.25)],
        ),
        Finding(
            pair_id="hh-8",
            source=data_source,
            line=8,
            rank=3,
            category="quality",
            suspicion=0.75,
            score_safe=0.0,
            reward_margin=0.0,
            sae_margin=0.0,
            quality=["identical", "empty context"],
            chosen="Same answer.",
            rejected="Same answer.",
            context="",
            top_features=[],
        ),
        Finding(
            pair_id="hh-1",
            source=data_source,
            line=1,
            rank=4,
            category="clean",
            suspicion=-3.0,
            score_safe=1.5,
            reward_margin=2.0,
            sae_margin=1.0,
            quality=[],
            chosen="I won't help with hurting people.",
            rejected="Here is a plan to hurt people.",
            context="\n\nHuman: help me hurt someone",
            top_features=[FeatureContribution(412, "refusal | apology", 0.9, 0.1)],
        ),
    ]
    features = [
        FeatureCard(
            latent=412,
            label="refusal | apology",
            salience=0.42,
            chosen_total=120.5,
            rejected_total=40.25,
            fire_rate=0.031,
            sign="+",
            top_tokens=[("sorry", 12), ("<script>", 2)],
            contexts=[FeatureContext("hh-1", "chosen", "I won't ", "help", " with <script>", 3.5)],
        ),
        FeatureCard(
            latent=9,
            label=None,
            salience=-0.3,
            chosen_total=10.0,
            rejected_total=30.0,
            fire_rate=0.002,
            sign="-",
            top_tokens=[],
            contexts=[],
        ),
    ]
    run = RunInfo(
        tool_version="0.1.0",
        model="sentence-transformers/all-MiniLM-L6-v2",
        model_hash="ab" * 32,
        layer=3,
        positions="response",
        max_length=512,
        sae_path="/tmp/sae-layer3",
        sae_hash="cd" * 32,
        sae_fvu=0.123,
        n_features=2,
        ranking="score_safe",
        thresholds={"flipped": 0.0, "noisy": 0.05},
        timings={"activations": 12.5, "sae": 3.25, "scoring": 0.5},
        pairs=4,
        counts={"flipped": 1, "noisy": 1, "quality": 1, "clean": 1},
        data_source=data_source,
        created="2026-01-02T03:04:05+00:00",
    )
    return Report(run=run, features=features, findings=findings)


@pytest.fixture
def report() -> Report:
    return make_report()


def test_dict_round_trip_through_json_text(report):
    data = json.loads(json.dumps(report.to_dict()))
    assert data["schema_version"] == REPORT_SCHEMA_VERSION
    assert Report.from_dict(data) == report


def test_to_dict_without_findings_keeps_run_and_features(report):
    data = report.to_dict(include_findings=False)
    assert set(data) == {"schema_version", "run", "features"}
    assert data["features"][0]["top_tokens"] == [["sorry", 12], ["<script>", 2]]


@pytest.mark.parametrize("change, message", [
    ({"text": "Here is how to do it"}, "text is not the chosen response's characters 6..27"),
    ({"side": "prompt"}, "side must be one of"),
    ({"kind": "agrees"}, "kind must be one of"),
    ({"similarity": 7.5}, r"similarity must be a number in \[-1, 1\]"),
])
def test_a_judges_evidence_must_be_the_responses_own_text(report, change, message):
    data = report.to_dict()
    data["findings"][0]["judge_evidence"][0].update(change)
    with pytest.raises(ValueError, match=r"findings\[0\]\.judge_evidence\[0\]: " + message):
        Report.from_dict(data)


def test_a_report_written_before_judges_evidence_still_loads(report):
    data = report.to_dict()
    for finding in data["findings"]:
        del finding["judge_evidence"]
    assert all(f.judge_evidence == [] for f in Report.from_dict(data).findings)
    flat = report.to_frame(nested=False).drop("judge_evidence")
    assert all(f.judge_evidence == [] for f in findings_from_frame(flat))


def test_from_dict_names_the_missing_field(report):
    data = report.to_dict()
    del data["findings"][2]["score_safe"]
    with pytest.raises(ValueError, match=r'findings\[2\]: field "score_safe" is missing'):
        Report.from_dict(data)


def test_from_dict_names_an_unknown_field(report):
    data = report.to_dict()
    data["run"]["colour"] = "blue"
    with pytest.raises(ValueError, match=r'run: unknown field "colour"'):
        Report.from_dict(data)


def test_from_dict_refuses_another_schema_version(report):
    data = report.to_dict()
    data["schema_version"] = REPORT_SCHEMA_VERSION + 1
    with pytest.raises(ValueError, match="schema version"):
        Report.from_dict(data)


def test_unknown_category_is_refused(report):
    data = report.to_dict()["findings"][0] | {"category": "suspicious"}
    data["top_features"] = []
    with pytest.raises(ValueError, match="category must be one of"):
        Finding(**data)


def test_a_margin_that_could_not_be_computed_is_none_not_nan(report):
    data = report.to_dict()["findings"][0] | {"reward_margin": float("nan"), "sae_margin": float("inf")}
    data["top_features"] = []
    finding = Finding(**data)
    assert finding.reward_margin is None and finding.sae_margin is None


def test_frame_has_one_row_per_pair_by_rank(report):
    report.findings.reverse()
    frame = report.to_frame()
    assert frame["rank"].to_list() == [1, 2, 3, 4]
    assert frame["pair_id"].to_list() == ["hh-17", "hh-3", "hh-8", "hh-1"]
    assert frame["quality"].to_list()[2] == ["identical", "empty context"]
    first = {"latent": 412, "label": "refusal | apology", "chosen": 0.1, "rejected": 0.7, "relevance": None,
             "category": None}
    assert frame["top_features"].to_list()[0][0] == first


def test_frame_round_trips_nested_and_flat(report):
    expected = sorted(report.findings, key=lambda f: f.rank)
    assert findings_from_frame(report.to_frame()) == expected
    flat = report.to_frame(nested=False)
    assert json.loads(flat["quality"][2]) == ["identical", "empty context"]
    assert findings_from_frame(flat) == expected


def test_empty_report_gives_an_empty_typed_frame(report):
    report.findings = []
    frame = report.to_frame()
    assert frame.height == 0
    assert frame.schema["top_features"].inner.fields[0].name == "latent"


def test_suspects_leave_out_clean_pairs_and_respect_top(report):
    assert [f.pair_id for f in report.suspects()] == ["hh-17", "hh-3", "hh-8"]
    assert [f.pair_id for f in report.suspects(2)] == ["hh-17", "hh-3"]


def test_categories_are_the_four_documented_ones():
    assert tuple(Category) == ("flipped", "noisy", "quality", "clean")


def test_feature_contribution_net_is_chosen_minus_rejected():
    assert FeatureContribution(1, None, 0.25, 1.0).net == -0.75


# -- write_atomic -----------------------------------------------------------------------


def test_write_atomic_writes_text_bytes_and_function_output(tmp_path):
    write_atomic(tmp_path / "a.txt", "héllo\n")
    write_atomic(tmp_path / "b.bin", b"\x00\x01")
    write_atomic(tmp_path / "c.txt", lambda tmp: tmp.write_text("from fn"))
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo\n"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "c.txt").read_text() == "from fn"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.bin", "c.txt"]


def test_write_atomic_leaves_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")

    def broken(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        write_atomic(target, broken)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_write_atomic_respects_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "out.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out.txt").stat().st_mode) == 0o644


def test_write_atomic_names_a_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"out\.json: the directory .*nowhere does not exist"):
        write_atomic(tmp_path / "nowhere" / "out.json", "x")


def test_write_atomic_refuses_to_overwrite_an_input(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("input")
    link = tmp_path / "link.jsonl"
    os.link(data, link)
    for target in (data, link, tmp_path / "." / "data.jsonl"):
        with pytest.raises(ValueError, match="refusing to write over an input file"):
            write_atomic(target, "output", protect=[data])
    assert data.read_text() == "input"


# -- exporter choice --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "name"),
    [("r.json", "json"), ("r.CSV", "csv"), ("r.parquet", "parquet"), ("r.md", "markdown"), ("r.htm", "html")],
)
def test_exporter_is_chosen_by_extension(path, name):
    assert find_exporter(path).name == name


def test_format_overrides_the_extension():
    assert find_exporter("report.txt", "markdown").name == "markdown"


def test_unknown_format_and_extension_list_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown format 'xml'; known formats: .*csv \(\.csv\)"):
        find_exporter("r.json", "xml")
    with pytest.raises(ValueError, match=r"r\.xyz: cannot tell the format .*'\.xyz'.*json \(\.json\)"):
        find_exporter("r.xyz")


def test_export_report_refuses_to_write_over_the_scanned_data(tmp_path):
    data = tmp_path / "data.json"
    data.write_text("{}")
    with pytest.raises(ValueError, match="refusing"):
        export_report(make_report(str(data)), data)
    assert data.read_text() == "{}"


# -- diff excerpts and the terminal -------------------------------------------------------


def test_diff_excerpt_starts_at_the_first_difference():
    chosen, rejected = diff_excerpts("I am sorry, I can't help with that.", "I am sorry, I can help with that.")
    assert chosen.differ == "can't" and rejected.differ == "can"
    assert chosen.before.endswith("sorry, I ") and chosen.after.startswith(" help")


def test_diff_excerpt_of_a_long_shared_prefix_is_short():
    prefix = "word " * 500
    chosen, rejected = diff_excerpts(prefix + "yes indeed, it is", prefix + "no indeed, it is", width=40)
    assert (chosen.differ, rejected.differ) == ("yes", "no")
    assert chosen.before.startswith("…") and len("".join(chosen)) <= 40


def test_diff_excerpt_of_identical_texts_has_no_difference():
    chosen, rejected = diff_excerpts("Same.", "Same.")
    assert chosen.differ == rejected.differ == ""
    assert chosen.before == "Same."


def test_diff_excerpt_when_one_response_extends_the_other():
    chosen, rejected = diff_excerpts("Fine.", "Fine. But also this.")
    assert chosen.differ == "" and rejected.differ == " But also this."


def _render(report: Report, top: int = 20) -> str:
    out = io.StringIO()
    print_report(report, Console(file=out, width=100, force_terminal=False), top=top)
    return out.getvalue()


def test_terminal_report_summary_and_suspects(report):
    text = _render(report)
    assert "\x1b[" not in text  # no colour codes when not a terminal
    assert max(len(line) for line in text.splitlines()) <= 100
    summary = ("pairs scanned", "4 from data/hh.jsonl.gz", "layer 3", "FVU 0.123", "flipped 1", "activations 12.5 s")
    for expected in summary:
        assert expected in text
    assert "hh-17" in text and "hh-3" in text and "hh-8" in text
    assert "hh-1\n" not in text  # the clean pair is not a suspect
    assert "refusal |" in text and "(#412)" in text and "#9 -0.25" in text  # labelled: label first


def test_terminal_report_marks_the_difference_without_colour(report):
    text = _render(report)
    assert "Sure! »Here is how" in text and "Sure! »I can't help" in text
    assert "<script>alert('x')</script>" in text  # shown as text
    assert "»«" not in text  # identical responses get no empty marks


def test_terminal_report_uses_style_not_marks_on_a_terminal(report):
    out = io.StringIO()
    print_report(report, Console(file=out, width=100, force_terminal=True, color_system="standard"))
    text = out.getvalue()
    assert "\x1b[" in text and "»" not in text


def test_terminal_report_top_limits_the_table(report):
    text = _render(report, top=1)
    assert "Top 1 of 3 suspects" in text
    assert "hh-3" not in text


def test_terminal_report_with_no_suspects(report):
    report.findings = [f for f in report.findings if f.category == "clean"]
    assert "No suspects" in _render(report)


def test_diff_excerpt_of_unrelated_answers_marks_the_whole_answer():
    chosen, rejected = diff_excerpts("Sure, here is how to do it.", "No, I will not do that for you.", width=80)
    assert chosen.differ == "Sure, here is how to do it."
    assert rejected.differ == "No, I will not do that for you."
