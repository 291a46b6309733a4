"""Reward callables referenced as `module:function` by tests."""


def length_reward(prompts, completions):
    return [float(len(c)) for c in completions]


def nan_reward(prompts, completions):
    return [float("nan")] * len(completions)


def short_reward(prompts, completions):
    return [1.0]


def raising_reward(prompts, completions):
    raise RuntimeError("reward server exploded")


def exit_process(prompts, completions):
    import os

    # A hard crash of the reward actor's process, as an OOM kill or segfault would cause.
    os._exit(1)


KILL_MARKER = "moalign-test-kill-generators-and-scorer"


def length_or_kill_once(prompts, completions):
    """`length_reward`; but while a marker file exists (`kill_marker()`), the first call removes
    it and SIGKILLs the run's generator actors and then its own process: a generator and a reward
    actor dead mid-step, at a step the test chooses."""
    import os
    import signal

    import ray

    try:
        kill_marker().unlink()
    except FileNotFoundError:
        return length_reward(prompts, completions)
    for name in ray.util.list_named_actors():
        if name.startswith("moalign-generator-"):
            pid = ray.get(ray.get_actor(name).ping.remote(), timeout=120)["pid"]
            os.kill(pid, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def kill_marker():
    import tempfile
    from pathlib import Path

    return Path(tempfile.gettempdir()) / KILL_MARKER
