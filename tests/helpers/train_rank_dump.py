"""Run the real trainer (``ddppo.trainer.loop.main``) in this process and dump what it did on this rank.

Launched by tests through torchrun (one process per rank)::

    DDPPO_TEST_DUMP=DIR torchrun --nproc-per-node 2 tests/helpers/train_rank_dump.py key=value ...

Nothing of the trainer is replaced: two pass-through wrappers only *observe* it.

- ``RolloutStorage.after_update`` records ``storage.step``, the number of steps this rank collected in each
  rollout (fewer than ``ppo.num_steps`` when straggler preemption cut it);
- ``ddppo.trainer.loop.Policy`` keeps a reference to the policy the trainer builds, so its final parameters
  and buffers can be written out after ``train()`` returned (only rank 0 writes weights to the run directory).

Writes ``DIR/rank{RANK}.json`` (rollout lengths, return value, the names of the threads still alive after
``train()`` returned) and ``DIR/rank{RANK}_policy.pt`` (state dict).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

import ddppo.train as train_script
import ddppo.trainer.loop as trainer
from ddppo.rl.storage import RolloutStorage


def main() -> int:
    out = Path(os.environ["DDPPO_TEST_DUMP"])
    out.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))

    lengths: list[int] = []
    original_after_update = RolloutStorage.after_update

    def after_update(self):
        lengths.append(int(self.step))
        original_after_update(self)

    RolloutStorage.after_update = after_update

    policies = []
    original_policy = trainer.Policy

    def recorded_policy(*args, **kwargs):
        policy = original_policy(*args, **kwargs)
        policies.append(policy)
        return policy

    trainer.Policy = recorded_policy

    rc = train_script.main(sys.argv[1:])
    state = {k: v.detach().cpu().clone() for k, v in policies[0].state_dict().items()}
    torch.save(state, out / f"rank{rank}_policy.pt")
    threads = sorted(p.read_text().strip() for p in Path("/proc/self/task").glob("*/comm"))  # Linux's names
    (out / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "rc": rc, "rollout_lengths": lengths,
                                                      "threads_after_train": threads}))
    return rc


if __name__ == "__main__":
    sys.exit(main())
