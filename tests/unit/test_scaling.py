"""Scale requests: written whole, read in order, held back until their step, bad ones named."""

import json
import threading

import pytest

from moalign.scaling import ScaleRequest, ScaleRequestError, due_requests, main, mark_done, read_done, write_request


def test_requests_come_in_the_order_written_and_wait_for_their_step(tmp_path):
    first = write_request(tmp_path, {"generators": 2, "from_step": 2})
    second = write_request(tmp_path, {"generators": 1, "reward_workers": 3, "from_step": 3})
    assert due_requests(tmp_path, 1) == []
    assert due_requests(tmp_path, 2) == [ScaleRequest(first, {"generator": 2}, 2)]
    # Once the first is handled the second waits for step 3, and then comes whole.
    mark_done(first, 2, "generators 1 -> 2", applied=True)
    assert due_requests(tmp_path, 2) == []
    assert due_requests(tmp_path, 3) == [ScaleRequest(second, {"generator": 1, "reward": 3}, 3)]
    done = read_done(tmp_path)
    assert len(done) == 1 and done[0]["handled_at_step"] == 2 and done[0]["applied"] and done[0]["generators"] == 2


def test_a_later_request_never_overtakes_one_that_waits(tmp_path):
    write_request(tmp_path, {"generators": 2, "from_step": 5})
    write_request(tmp_path, {"generators": 3})
    assert due_requests(tmp_path, 4) == []


@pytest.mark.parametrize(
    "fields, match",
    [
        ({}, "names no role"),
        ({"learners": 2}, r"unknown key\(s\) \['learners'\]"),
        ({"generators": 0}, "generators=0 must be an integer from 1"),
        ({"generators": 2.5}, "generators=2.5 must be"),
        ({"generators": True}, "generators=True must be"),
        ({"reward_workers": 1, "from_step": -1}, "from_step=-1 must be a step number"),
    ],
)
def test_bad_requests_are_refused_before_they_are_written(tmp_path, fields, match):
    with pytest.raises(ScaleRequestError, match=match):
        write_request(tmp_path, fields)
    assert not list(tmp_path.rglob("*.json"))


def test_a_damaged_request_file_comes_back_named_with_why(tmp_path):
    requests = tmp_path / "scale" / "requests"
    requests.mkdir(parents=True)
    (requests / "0001.json").write_text("{generators: 2")
    (requests / "0002.json").write_text(json.dumps({"generators": -1}))
    (requests / ".0003.json.tmp").write_text("{")  # half written: not yet a request
    (bad_json, why_json), (bad_count, why_count) = due_requests(tmp_path, 1)
    assert bad_json.name == "0001.json" and "Expecting property name" in why_json
    assert bad_count.name == "0002.json" and "generators=-1" in why_count


def test_command_line(tmp_path, capsys):
    assert main([str(tmp_path), "generators=2"]) == 2
    assert "not a run directory" in capsys.readouterr().err
    (tmp_path / "config.yaml").write_text("{}")
    assert main([str(tmp_path), "generators=two"]) == 2
    assert "expected key=integer" in capsys.readouterr().err
    assert main([str(tmp_path), "generators=2", "from_step=4"]) == 0
    assert due_requests(tmp_path, 4)[0].counts == {"generator": 2}


def test_a_request_sent_before_the_run_wrote_its_directory_waits_for_it(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["--wait-for-run-s", "0.2", str(run_dir), "generators=2"]) == 2
    assert "no config.yaml after waiting 0.2s" in capsys.readouterr().err
    # The run starts (writes its config) while the request waits.
    timer = threading.Timer(0.5, lambda: (run_dir.mkdir(), (run_dir / "config.yaml").write_text("{}")))
    timer.start()
    try:
        assert main(["--wait-for-run-s", "30", str(run_dir), "generators=2"]) == 0
    finally:
        timer.join()
    assert due_requests(run_dir, 1)[0].counts == {"generator": 2}


def test_cli_lists_what_became_of_handled_requests(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("{}")
    assert main([str(tmp_path), "generators=2"]) == 0 and "queued" in capsys.readouterr().out
    assert main([str(tmp_path), "--done"]) == 0 and capsys.readouterr().out == ""
    (request,) = due_requests(tmp_path, 1)
    mark_done(request.path, 7, "generators 1 -> 2", applied=True)
    assert main([str(tmp_path), "--done"]) == 0
    assert capsys.readouterr().out.strip() == "step 7: generators=2 -> generators 1 -> 2"
