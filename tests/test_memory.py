"""``keep_freed_memory``: after it, memory freed by one round of large allocations is reused by the next instead
of being handed back to the OS and page-faulted in again; ``train`` applies it unless the config says not to."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from tiny import tiny

# Ten 4 MiB blocks allocated and freed together, like a minibatch's activations: glibc maps the first round, then
# serves them from the heap, and (by default) trims the 40 MiB free top of the heap back to the OS every round.
ROUNDS = textwrap.dedent("""
    import resource
    import numpy as np

    def faults_per_round(rounds=6, blocks=10, size=4 * 2**20):
        counts = []
        for _ in range(rounds):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            arrays = [np.ones(size, np.uint8) for _ in range(blocks)]
            del arrays
            counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        return min(counts[2:])  # after the allocator has settled
""")


def run(code: str, cwd) -> int:
    r = subprocess.run([sys.executable, "-c", ROUNDS + textwrap.dedent(code)], capture_output=True, text=True,
                       cwd=cwd, timeout=300)
    assert r.returncode == 0, r.stderr
    return int(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc and minor-fault counts: Linux only")
def test_keep_freed_memory_stops_refaulting(tmp_path):
    pages_per_round = 10 * 4 * 2**20 // 4096
    default = run("print(faults_per_round())", tmp_path)
    kept = run("""
        from ddppo.trainer.malloc_settings import keep_freed_memory
        assert keep_freed_memory()
        print(faults_per_round())
    """, tmp_path)
    assert default > 0.25 * pages_per_round  # the premise: by default every round faults its pages in again
    assert kept < 0.05 * pages_per_round


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc and minor-fault counts: Linux only")
@pytest.mark.parametrize("keep", [True, False])
def test_train_applies_the_setting_from_the_config(small_dataset, tmp_path, keep):
    overrides = [*tiny(2, 8), "total_steps=16", f"task.data_dir={small_dataset}", f"run_dir={tmp_path}",
                 f"keep_freed_memory={keep}"]
    faults = run(f"""
        from ddppo.config import load_config
        from ddppo.trainer.loop import train
        train(load_config(None, {overrides!r}), fresh=True, log=lambda *a: None, show_progress=False)
        print(faults_per_round())
    """, tmp_path)
    pages_per_round = 10 * 4 * 2**20 // 4096
    assert (faults < 0.05 * pages_per_round) if keep else (faults > 0.25 * pages_per_round)
