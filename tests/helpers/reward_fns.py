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


KILL_MARKER = "moalign-test-kill-actors"


def length_or_kill(prompts, completions):
    """`length_reward`; but while the marker file (`kill_marker()`) lists faults, one per line,
    each call takes the first and injects it (SIGKILL, mid-step, at a step the test chooses):
    `generators+self` kills the run's generator actors and then this reward actor's own process,
    `learner` kills the learner actor, `-` injects nothing."""
    import os
    import signal

    import ray

    path = kill_marker()
    try:
        fault, *rest = path.read_text().split()
    except (FileNotFoundError, ValueError):
        return length_reward(prompts, completions)
    if rest:
        path.write_text("\n".join(rest))
    else:
        path.unlink()
    victims = {"generators+self": "moalign-generator-", "learner": "moalign-learner-"}.get(fault)
    for name in ray.util.list_named_actors() if victims else []:
        if name.startswith(victims):
            pid = ray.get(ray.get_actor(name).ping.remote(), timeout=120)["pid"]
            os.kill(pid, signal.SIGKILL)
    if fault == "generators+self":
        os.kill(os.getpid(), signal.SIGKILL)
    return length_reward(prompts, completions)


HANG_MARKER = "moalign-test-hang-once"


def hang_once(prompts, completions):
    """`length_reward`, but the first call after the marker file `hang_marker()` appears removes
    it and never returns: a reward source that hangs once."""
    import time

    try:
        hang_marker().unlink()
    except FileNotFoundError:
        return length_reward(prompts, completions)
    time.sleep(3600)


def hang(prompts, completions):
    import time

    time.sleep(3600)


def hang_marker():
    import tempfile
    from pathlib import Path

    return Path(tempfile.gettempdir()) / HANG_MARKER


def kill_marker():
    import tempfile
    from pathlib import Path

    return Path(tempfile.gettempdir()) / KILL_MARKER


def _letter_share(completions, low: bool):
    shares = []
    for text in completions:
        letters = [c for c in text.lower() if "a" <= c <= "z"]
        early = sum(c <= "m" for c in letters)
        shares.append(0.0 if not letters else (early if low else len(letters) - early) / len(letters))
    return shares


def early_letters(prompts, completions):
    """The pathway test's first toy objective: the share of the answer's letters in a-m. It and
    `late_letters` sum to 1 for any answer with a letter, so they conflict directly."""
    return _letter_share(completions, low=True)


def late_letters(prompts, completions):
    """The share of the answer's letters in n-z."""
    return _letter_share(completions, low=False)
