"""What weight sync does for a generator Ray restarted, on stand-in actor groups (no Ray): the
object-store backend finds a restart by the version a load replaced and puts the last synced
weights back; the broadcast backend keeps a copy of adapter payloads only, and without one
refuses with a clear error."""

import pytest

from actors.ray_actors import ActorFailure
from actors.weight_sync import BroadcastSync, ObjectStoreSync


class _Remote:
    def __init__(self, fn):
        self.remote = fn


class _Actor:
    def __init__(self, log, previous_version):
        self.log, self.previous_version = log, previous_version
        self.export_weight_refs = _Remote(lambda bucket_mb, payload: ["bucket-ref"])
        self.full_weight_bytes = _Remote(lambda: 1000)
        self.load_weight_refs = _Remote(self._load)

    def _load(self, refs, version, timeout_s, payload):
        self.log.append(("load", refs, version, payload))
        return {"bytes": 36, "previous_version": self.previous_version}


class _Group:
    """The slice of ActorGroup weight sync uses: remote results are returned as they are."""

    def __init__(self, actors):
        self.actors, self.policy_version, self.restarted_at, self.after_restart = actors, 0, [], None

    def wait(self, refs, method, step, indices=None):
        return list(refs)

    def call(self, method, *args, step=None):
        return [getattr(a, method).remote(*args) for a in self.actors]

    def restarted(self, index, step, how):
        self.restarted_at.append((index, step, how))
        self.after_restart(index, step)


def test_a_generator_restarted_while_idle_is_counted_and_given_the_synced_weights():
    log = []
    generators = _Group([_Actor(log, previous_version=1), _Actor(log, previous_version=0)])
    sync = ObjectStoreSync(_Group([_Actor([], 0)]), generators, 64.0, "adapter", 30.0)
    generators.policy_version = 1  # as after a first sync
    metrics = sync(version=2, step=5)
    assert generators.policy_version == 2 and metrics["sync/bytes_fraction"] == pytest.approx(0.036)
    # Generator 1 answered that it held version 0, not 1: a restart while idle, restored with version 2.
    assert [(i, step) for i, step, _ in generators.restarted_at] == [(1, 5)]
    assert "it held policy version 0, not 1" in generators.restarted_at[0][2]
    # One load per generator, then the restored one loads the synced buckets again.
    assert log == [("load", ["bucket-ref"], 2, "adapter")] * 3


class _DiesDuringLoad(_Group):
    """Generator `index` dies during the load; like ActorGroup.collect, the group waits for the
    restart, runs after_restart and sends the load again (the new process held version 0)."""

    def __init__(self, actors, index):
        super().__init__(actors)
        self.index = index

    def call(self, method, *args, step=None):
        results = []
        for i, actor in enumerate(self.actors):
            if method == "load_weight_refs" and i == self.index:
                self.restarted(i, step, "in 20.0s; load_weight_refs() sent again")
                actor.previous_version = 0
            results.append(getattr(actor, method).remote(*args))
        return results


def test_a_generator_that_dies_during_the_first_sync_after_a_learner_restart_is_restored_by_the_load():
    """A new sync object (after a learner restart) holds no copy of any earlier weights, and the
    generators hold a later policy than the checkpoint's: one that dies during this sync's load is
    given the weights by that load, sent again; nothing is refused and the restart counts once."""
    log = []
    generators = _DiesDuringLoad([_Actor(log, previous_version=4), _Actor(log, previous_version=4)], index=0)
    generators.policy_version = 4
    sync = ObjectStoreSync(_Group([_Actor([], 0)]), generators, 64.0, "adapter", 30.0)
    sync(version=2, step=2)
    assert generators.policy_version == 2 and len(generators.restarted_at) == 1
    assert log == [("load", ["bucket-ref"], 2, "adapter")] * 2


def test_broadcast_cannot_restore_a_restarted_generator_without_a_copy_and_says_what_to_do():
    generators = _Group([_Actor([], 0)])
    sync = BroadcastSync(_Group([]), generators, 64.0, "full", 30.0)
    sync.restore(0, step=3)  # nothing synced yet: the base weights are right
    generators.policy_version = 4
    with pytest.raises(
        ActorFailure,
        match=r"generator actor #0 at step 3, in restore\(\).*broadcast with sync.payload=full keeps no copy of policy version 4",
    ):
        sync.restore(0, step=3)


def test_broadcast_restores_a_restarted_generator_from_its_adapter_copy_and_reopens_the_group():
    log = []
    generators = _Group([_Actor(log, 0)])
    sync = BroadcastSync(_Group([_Actor([], 0)]), generators, 64.0, "adapter", 30.0)
    sync._open, sync._last = True, (["bucket-ref"], 4)  # as after a broadcast of version 4
    generators.policy_version = 4
    sync.restore(0, step=3)
    assert log == [("load", ["bucket-ref"], 4, "adapter")] and not sync._open
