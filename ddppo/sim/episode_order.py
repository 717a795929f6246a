"""Each environment's episode stream, as plain state a resume file can hold.

Three orders:

- ``shuffle``: every episode of the split, a fresh permutation per epoch (the embedded simulator's training order:
  all its scenes are resident, so starting an episode in another scene costs nothing);
- ``shuffle`` with ``group_by_scene`` (habitat-lab's env factory and ``EpisodeIterator`` with ``shuffle``,
  ``group_by_scene`` and ``max_scene_repeat_steps``): the scenes are split across the environments, and each
  environment runs the episodes of one scene in a row before loading the next (loading a habitat scene takes
  seconds);
- ``partition``: a fixed share of the list, each episode once (evaluation).

Every stream is a function of (seed, environment index) and a few counters, so a resumed run draws exactly the
episodes it would have drawn.
"""

from __future__ import annotations

import numpy as np

MAX_SCENE_REPEAT_STEPS = 10_000
"""habitat-lab's ``iterator_options.max_scene_repeat_steps``: after this many steps in one scene (drawn within
``STEP_REPETITION_RANGE`` of it at each switch, so environments do not all switch at once), an environment moves on
to its next scene at its next episode."""
STEP_REPETITION_RANGE = 0.2
"""habitat-lab's ``iterator_options.step_repetition_range``."""

# The first word of every seed names the stream, so no two streams share a seed (numpy's SeedSequence treats
# trailing zeros as absent: [a, b] and [a, b, 0] are the same seed).
_SCENE_ORDER, _IN_SCENE, _REPEAT, _SPLIT = 0x5CE0, 0x5CE1, 0x5CE2, 0x5CE3


class EpisodeIterator:
    """Shuffled epochs over all episodes (``shuffle``) or a fixed share of the list (``partition``).

    The whole state is (epoch, cursor).
    """

    def __init__(self, num_episodes: int, seed: int, env_index: int, order: str = "shuffle", num_shares: int = 1):
        if order not in ("shuffle", "partition"):
            raise ValueError(f"episode order {order!r}: use shuffle or partition")
        self.n, self.seed, self.env_index, self.order = num_episodes, seed, env_index, order
        self.share = list(range(env_index, num_episodes, num_shares)) if order == "partition" else None
        self.epoch, self.cursor = 0, 0
        self._perm = None

    def _order(self):
        if self.share is not None:
            return self.share
        if self._perm is None:
            self._perm = np.random.default_rng([self.seed, self.env_index, self.epoch]).permutation(self.n)
        return self._perm

    def next(self) -> int | None:
        order = self._order()
        if self.cursor >= len(order):
            if self.share is not None:
                return None
            self.epoch, self.cursor, self._perm = self.epoch + 1, 0, None
            order = self._order()
        k = int(order[self.cursor])
        self.cursor += 1
        return k

    def step_taken(self) -> None:
        """Nothing to count: this order does not depend on steps."""

    def state_dict(self):
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state):
        self.epoch, self.cursor, self._perm = int(state["epoch"]), int(state["cursor"]), None


class SceneGroupedIterator:
    """habitat-lab's ``EpisodeIterator(cycle=True, shuffle=True, group_by_scene=True)`` over one environment's
    scenes, with its ``max_scene_repeat_episodes`` / ``max_scene_repeat_steps`` rules.

    An epoch is habitat-lab's "shuffle, then group by scene": the scenes in the order of their first episode in a
    uniform shuffle (drawn directly: scene s comes first with the smallest of its n_s uniform draws, a Beta(1, n_s)
    variable), each scene's episodes in a uniform random order. The epoch is a queue of scene groups, each with a
    cursor. Before each episode, once the current scene has served ``max_repeat_episodes`` episodes or
    ``max_repeat_steps`` steps in a row, the group at the head of the queue goes to its end, as habitat-lab's
    ``_forced_scene_switch`` does (when the current scene has no episode left, that head group is the next scene's:
    habitat-lab's rule too). The state is the queue and five counters, whatever the number of episodes.
    """

    def __init__(self, scene_episodes: list[np.ndarray], seed: int, env_index: int,
                 max_repeat_episodes: int = -1, max_repeat_steps: int = MAX_SCENE_REPEAT_STEPS,
                 step_repetition_range: float = STEP_REPETITION_RANGE):
        if not scene_episodes or any(len(ks) == 0 for ks in scene_episodes):
            raise ValueError("scene-grouped episode order: every scene of an environment needs an episode")
        self.scene_episodes = [np.asarray(ks, np.int64) for ks in scene_episodes]
        self.seed, self.env_index = seed, env_index
        self.max_repeat_episodes, self.max_repeat_steps = max_repeat_episodes, max_repeat_steps
        self.step_repetition_range = step_repetition_range
        self.epoch, self.draws = 0, 0
        self.queue_scenes, self.queue_cursors = self._epoch_order(0), [0] * len(self.scene_episodes)
        self.scene, self.run_episodes, self.run_steps = -1, 0, 0
        self._perm_key, self._perm, self._limit = None, None, (-1, 0)

    def _rng(self, stream: int, *words: int) -> np.random.Generator:
        return np.random.default_rng([stream, self.seed, self.env_index, *words])

    def _epoch_order(self, epoch: int) -> list[int]:
        sizes = np.array([len(ks) for ks in self.scene_episodes], np.float64)
        first = self._rng(_SCENE_ORDER, epoch).beta(1.0, sizes)
        return [int(s) for s in np.argsort(first, kind="stable")]

    def _scene_perm(self, scene: int) -> np.ndarray:
        key = (self.epoch, scene)
        if self._perm_key != key:
            self._perm_key = key
            self._perm = self._rng(_IN_SCENE, self.epoch, scene).permutation(len(self.scene_episodes[scene]))
        return self._perm

    def _max_steps(self) -> int | None:
        """This run's step limit, habitat-lab's ``_randomize_value``: uniform in [v(1 - r), v(1 + r)]."""
        if self.max_repeat_steps <= 0:
            return None
        if self._limit[0] != self.draws:
            v, r = self.max_repeat_steps, self.step_repetition_range
            self._limit = (self.draws, int(self._rng(_REPEAT, self.draws).integers(int(v * (1 - r)),
                                                                                  int(v * (1 + r)) + 1)))
        return self._limit[1]

    def _switch_if_due(self) -> None:
        due = (0 < self.max_repeat_episodes <= self.run_episodes
               or (self._max_steps() or float("inf")) <= self.run_steps)
        if not due:
            return
        if len(self.queue_scenes) > 1:
            self.queue_scenes.append(self.queue_scenes.pop(0))
            self.queue_cursors.append(self.queue_cursors.pop(0))
        self.draws += 1  # habitat-lab draws the next limit at every switch

    def next(self) -> int:
        if self.scene >= 0:
            self._switch_if_due()
        if not self.queue_scenes:
            self.epoch += 1
            self.queue_scenes, self.queue_cursors = self._epoch_order(self.epoch), [0] * len(self.scene_episodes)
        scene, cursor = self.queue_scenes[0], self.queue_cursors[0]
        k = int(self.scene_episodes[scene][self._scene_perm(scene)[cursor]])
        if cursor + 1 == len(self.scene_episodes[scene]):
            self.queue_scenes.pop(0)
            self.queue_cursors.pop(0)
        else:
            self.queue_cursors[0] = cursor + 1
        if scene != self.scene:
            self.scene, self.run_episodes, self.run_steps = scene, 0, 0
        self.run_episodes += 1
        return k

    def step_taken(self) -> None:
        """One step of the environment (habitat-lab's ``EpisodeIterator.step_taken``)."""
        self.run_steps += 1

    _COUNTERS = ("epoch", "draws", "scene", "run_episodes", "run_steps")

    def state_dict(self) -> dict:
        return {**{k: getattr(self, k) for k in self._COUNTERS},
                "queue_scenes": list(self.queue_scenes), "queue_cursors": list(self.queue_cursors)}

    def load_state_dict(self, state: dict) -> None:
        for k in self._COUNTERS:
            setattr(self, k, int(state[k]))
        self.queue_scenes = [int(s) for s in state["queue_scenes"]]
        self.queue_cursors = [int(c) for c in state["queue_cursors"]]
        if len(self.queue_scenes) != len(self.queue_cursors) or any(
                not 0 <= s < len(self.scene_episodes) or not 0 <= c < len(self.scene_episodes[s])
                for s, c in zip(self.queue_scenes, self.queue_cursors)):
            raise ValueError("resume state: the episode iterator's scene queue does not fit this dataset")


def split_scenes(num_scenes: int, num_envs: int, seed: int, env_offset: int) -> list[list[int]]:
    """habitat-baselines' ``construct_envs``: the scenes shuffled (seeded per worker, as its seed differs per rank)
    and dealt round-robin to the environments; with fewer scenes than environments every environment gets all."""
    scenes = np.random.default_rng([_SPLIT, seed, env_offset]).permutation(num_scenes).tolist()
    if num_scenes < num_envs:
        return [sorted(scenes) for _ in range(num_envs)]
    return [sorted(scenes[e::num_envs]) for e in range(num_envs)]


def make_iterators(episode_scenes: np.ndarray, num_envs: int, seed: int, env_offset: int, order: str,
                   num_shares: int | None, group_by_scene: bool = False,
                   max_scene_repeat_steps: int = MAX_SCENE_REPEAT_STEPS):
    """The episode streams of ``num_envs`` environments; ``episode_scenes[k]`` is episode k's scene (an index).
    ``group_by_scene`` applies to ``shuffle``; ``partition`` always takes every ``num_shares``-th episode."""
    if order == "shuffle" and group_by_scene:
        episode_scenes = np.asarray(episode_scenes)
        by_scene = [np.flatnonzero(episode_scenes == s) for s in range(int(episode_scenes.max()) + 1)]
        present = [s for s, ks in enumerate(by_scene) if len(ks)]
        shares = split_scenes(len(present), num_envs, seed, env_offset)
        return [SceneGroupedIterator([by_scene[present[s]] for s in share], seed, env_offset + e,
                                     max_repeat_steps=max_scene_repeat_steps)
                for e, share in enumerate(shares)]
    shares = num_shares or num_envs
    return [EpisodeIterator(len(episode_scenes), seed, env_offset + e, order, shares) for e in range(num_envs)]


def load_iterators(iterators, states: list[dict]) -> None:
    """Resume every environment's episode stream; a resume state for another number of environments or another
    episode order is refused."""
    if len(states) != len(iterators):
        raise ValueError(f"resume state has {len(states)} episode iterators for {len(iterators)} environments")
    for it, s in zip(iterators, states):
        if set(s) != set(it.state_dict()):
            raise ValueError(f"resume state: episode iterator state {sorted(s)} is not that of a {type(it).__name__}")
        it.load_state_dict(s)
