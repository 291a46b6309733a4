"""The learner builds DeepSpeed's ops with its own interpreter's ninja, whatever PATH says."""

import os
import sys
from pathlib import Path

from actors.learner import _own_ninja_first


def test_the_interpreters_scripts_folder_goes_first_once(monkeypatch):
    scripts = str(Path(sys.executable).parent)
    monkeypatch.setenv("PATH", os.pathsep.join(["/usr/bin", "/bin"]))
    _own_ninja_first()
    assert os.environ["PATH"].split(os.pathsep) == [scripts, "/usr/bin", "/bin"]
    _own_ninja_first()
    assert os.environ["PATH"].split(os.pathsep) == [scripts, "/usr/bin", "/bin"]
    monkeypatch.setenv("PATH", "")
    _own_ninja_first()
    assert os.environ["PATH"] == scripts
