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
