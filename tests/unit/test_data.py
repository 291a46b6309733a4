import json
from pathlib import Path

import pytest

from moalign.data import DataError, PromptCursor, load_prompts

REPO = Path(__file__).resolve().parents[2]


def test_shipped_prompt_sets():
    train = load_prompts(REPO / "data/prompts/train.jsonl")
    heldout = load_prompts(REPO / "data/prompts/heldout.jsonl")
    assert len(train) >= 300 and len(heldout) >= 50
    assert not {r.prompt.lower() for r in train} & {r.prompt.lower() for r in heldout}, "held-out split leaks into train"
    assert len({r.category for r in train}) >= 10


def test_load_errors_name_file_and_line(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "ok"}\n{"prompt": ""}\n')
    with pytest.raises(DataError, match=r"p.jsonl:2: field 'prompt'"):
        load_prompts(f)
    f.write_text('{"prompt": "ok"}\nnot json\n')
    with pytest.raises(DataError, match=r"p.jsonl:2: not valid JSON"):
        load_prompts(f)
    f.write_text('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n')
    with pytest.raises(DataError, match="duplicate id 'a'"):
        load_prompts(f)
    f.write_text("\n")
    with pytest.raises(DataError, match="no prompts"):
        load_prompts(f)
    with pytest.raises(DataError, match="cannot read"):
        load_prompts(tmp_path / "missing.jsonl")


def test_cursor_covers_each_epoch_once_and_resumes():
    c = PromptCursor(10, seed=3)
    first = c.next(4) + c.next(4) + c.next(2)
    assert sorted(first) == list(range(10))
    c.next(3)
    state = json.loads(json.dumps(c.state_dict()))
    expected = c.next(25)
    resumed = PromptCursor(10, seed=99)
    resumed.load_state_dict(state)
    assert resumed.next(25) == expected
    assert c.epoch == 3


def test_cursor_epochs_differ_and_unshuffled_is_ordered():
    c = PromptCursor(20, seed=0)
    assert c.next(20) != c.next(20)
    assert PromptCursor(5, 0, shuffle=False).next(7) == [0, 1, 2, 3, 4, 0, 1]


def test_cursor_rejects_changed_file():
    with pytest.raises(DataError, match="now has 11"):
        PromptCursor(11, 0).load_state_dict(PromptCursor(10, 0).state_dict())
