"""Run the real trainer (``ddppo.trainer.loop.main``) with a NaN loss on ONE rank only, at the updates listed in
``DDPPO_TEST_NAN_UPDATES`` (1-based, comma-separated), for tests/test_faults.py::

    DDPPO_TEST_DUMP=DIR DDPPO_TEST_NAN_RANK=1 DDPPO_TEST_NAN_UPDATES=2 \\
        torchrun --nproc-per-node 2 tests/helpers/nan_on_one_rank.py key=value ...

Nothing of the trainer is replaced: ``ppo_update`` is wrapped to count updates and record what it returned, and on
the chosen rank and updates the policy's value head returns NaN (as a numerical blow-up on that rank would).
Writes ``DIR/rank{RANK}.json`` (return code, per-update skip flags) and ``DIR/rank{RANK}_policy.pt``.
``nan_values(policy)`` is the injection alone, for in-process tests (tests/test_train.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

import ddppo.train as train_script  # noqa: E402
import ddppo.trainer.loop as trainer  # noqa: E402


@contextlib.contextmanager
def nan_values(policy):
    """While inside, ``policy.evaluate_actions`` returns NaN values (as a numerical blow-up would): the update's
    loss is NaN."""
    real = policy.evaluate_actions

    def evaluate_with_nan_values(*a, **k):
        log_probs, values, entropy = real(*a, **k)
        return log_probs, values * float("nan"), entropy

    policy.evaluate_actions = evaluate_with_nan_values
    try:
        yield
    finally:
        policy.__dict__.pop("evaluate_actions", None)


def main() -> int:
    out = Path(os.environ["DDPPO_TEST_DUMP"])
    out.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))
    bad_rank = int(os.environ["DDPPO_TEST_NAN_RANK"])
    bad_updates = {int(u) for u in os.environ["DDPPO_TEST_NAN_UPDATES"].split(",") if u}
    policies, skipped = [], []

    original_policy = trainer.Policy

    def recorded_policy(*args, **kwargs):
        policy = original_policy(*args, **kwargs)
        policies.append(policy)
        return policy

    original_update = trainer.ppo_update

    def ppo_update(policy, *args, **kwargs):
        update = len(skipped) + 1
        with nan_values(policy) if rank == bad_rank and update in bad_updates else contextlib.nullcontext():
            result = original_update(policy, *args, **kwargs)
        skipped.append(float(result.skipped))
        return result

    trainer.Policy = recorded_policy
    trainer.ppo_update = ppo_update
    rc = train_script.main(sys.argv[1:])
    state = {k: v.detach().cpu().clone() for k, v in policies[0].state_dict().items()}
    torch.save(state, out / f"rank{rank}_policy.pt")
    (out / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "rc": rc, "skipped": skipped}))
    return rc


if __name__ == "__main__":
    sys.exit(main())
