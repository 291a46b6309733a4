"""Offline preference data: reading JSONL and datasets folders, refusing bad rows by file, line
and field, counting what is missing, and the length policy."""

import json

import numpy as np
import pytest

from moalign.data import DataError
from moalign.preferences import encode_rows, load_preferences, modpo_pairs, mopo_labels, normalized_rewards

NAMES = ["Helpful", "Harmless"]


def write_rows(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def row(i, **extra):
    base = {
        "id": f"r{i}",
        "prompt": f"question {i}?",
        "responses": [f"answer a{i}", f"answer b{i}"],
        "labels": {"Helpful": 0, "Harmless": 1},
    }
    base.update(extra)
    return base


def test_reads_rows_and_counts_missing_labels_and_ties(tmp_path):
    path = write_rows(
        tmp_path / "p.jsonl",
        [
            row(0),
            row(1, labels={"Helpful": 0.5}),
            "",
            row(2, prompt=None, messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi?"}]),
            row(3, rewards={"Harmless": [0.25, -1.0]}),
        ],
    )
    rows, report = load_preferences(path, NAMES)
    assert [r.id for r in rows] == ["r0", "r1", "r2", "r3"]
    assert rows[1].labels == (0.5, None) and rows[0].labels == (0.0, 1.0)
    assert report.rows == 4 and report.missing_labels == {"Helpful": 0, "Harmless": 1} and report.ties == {"Helpful": 1, "Harmless": 0}
    assert rows[2].prompt_text == "hi?" and rows[2].messages[0]["role"] == "system"
    assert rows[3].rewards == (None, (0.25, -1.0)) and rows[0].rewards == (None, None)
    assert mopo_labels(rows[0]) == [1.0, 0.0] and mopo_labels(rows[1]) == [0.5, 0.5]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("{not json", r"p\.jsonl:2: not valid JSON"),
        ('["a list"]', r"p\.jsonl:2: expected an object"),
        (row(1, responses=["only one"]), r"p\.jsonl:2: field 'responses' must be a list of two responses"),
        (row(1, responses=["a", "  "]), r"p\.jsonl:2: field 'responses\[1\]' must be a non-empty string"),
        (row(1, prompt=""), r"p\.jsonl:2: field 'prompt' must be a non-empty string"),
        (row(1, labels={"Helpful": 2}), r"p\.jsonl:2: label of 'Helpful' must be 0 or 1"),
        (row(1, labels={"Honest": 1}), r"p\.jsonl:2: field 'labels' names \['Honest'\]"),
        (row(1, labels={}), r"p\.jsonl:2: no objective is labelled"),
        (row(0), r"p\.jsonl:2: duplicate id 'r0'"),
        (row(1, rewards={"Helpful": [1.0]}), r"p\.jsonl:2: field 'rewards'\['Helpful'\] must be two finite numbers"),
        (row(1, finished=[True]), r"p\.jsonl:2: field 'finished' must be two booleans"),
        (row(1, prompt=None, messages=[{"role": "assistant", "content": "x"}]), r"p\.jsonl:2: field 'messages' must end with a user turn"),
    ],
)
def test_a_bad_row_names_file_line_and_field(tmp_path, bad, message):
    path = write_rows(tmp_path / "p.jsonl", [row(0), bad])
    with pytest.raises(DataError, match=message):
        load_preferences(path, NAMES)


def test_datasets_folder_with_mapped_fields(tmp_path):
    """A PKU-SafeRLHF-shaped set: two response columns and one label column per objective."""
    from datasets import Dataset

    Dataset.from_list(
        [
            {"prompt": "p0", "response_0": "a", "response_1": "b", "better_response_id": 1, "safer_response_id": 0},
            {"prompt": "p1", "response_0": "c", "response_1": "d", "better_response_id": 0, "safer_response_id": None},
        ]
    ).save_to_disk(str(tmp_path / "pku"))
    fields = {
        "response_fields": ["response_0", "response_1"],
        "label_fields": {"Helpful": "better_response_id", "Harmless": "safer_response_id"},
    }
    rows, report = load_preferences(tmp_path / "pku", NAMES, **fields)
    assert [r.labels for r in rows] == [(1.0, 0.0), (0.0, None)] and report.missing_labels["Harmless"] == 1
    Dataset.from_list(
        [{"prompt": "p0", "response_0": "a", "response_1": "", "better_response_id": 1, "safer_response_id": 0}]
    ).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DataError, match=r"bad\[row 0\]: field 'response_1' must be a non-empty string"):
        load_preferences(tmp_path / "bad", NAMES, **fields)


def test_length_policy_skips_or_truncates_and_counts(tmp_path, tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    long = " ".join(["word"] * 60)
    path = write_rows(tmp_path / "p.jsonl", [row(0, finished=[True, False]), row(1, responses=["short", long])])
    rows, report = load_preferences(path, NAMES)
    kept = encode_rows(rows, tok, 256, 16, "skip", report)
    assert [e.row.id for e in kept] == ["r0"] and report.skipped_too_long == 1
    # Only an answer that ended by itself is taught to end.
    assert kept[0].response_ids[0][-1] == tok.eos_token_id and kept[0].response_ids[1][-1] != tok.eos_token_id
    rows, report = load_preferences(path, NAMES)
    cut = encode_rows(rows, tok, 256, 16, "truncate", report)
    assert len(cut) == 2 and report.truncated == 1 and len(cut[1].response_ids[1]) == 16
    with pytest.raises(DataError, match="no data left"):
        encode_rows(rows, tok, 4, 16, "skip", report)


def test_modpo_pairs_leave_out_ties_and_missing_labels(tmp_path, tiny_model):
    from transformers import AutoTokenizer

    path = write_rows(
        tmp_path / "p.jsonl", [row(0), row(1, labels={"Helpful": 1}), row(2, labels={"Harmless": 0}), row(3, labels={"Helpful": 0.5})]
    )
    rows, report = load_preferences(path, NAMES)
    encoded = encode_rows(rows, AutoTokenizer.from_pretrained(tiny_model), 256, 64, "skip", report)
    assert modpo_pairs(encoded, 0) == ([(0, 0), (1, 1)], 2)
    assert modpo_pairs(encoded, 1) == ([(0, 1), (2, 0)], 2)


def test_normalized_rewards_are_z_scores_per_objective():
    values = np.array([[[1.0, 10.0], [3.0, 10.0]], [[5.0, 10.0], [7.0, 10.0]]])
    z = normalized_rewards(values)
    assert z[..., 0].mean() == pytest.approx(0) and z[..., 0].std() == pytest.approx(1)
    assert np.all(z[..., 1] == 0)
