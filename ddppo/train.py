"""The trainer as a script, for launchers that start one per worker:

    torchrun --nproc-per-node N ddppo/train.py [--config FILE] [--fresh] [key=value ...]
    srun python ddppo/train.py ...                 (slurm/*.sbatch)

Same arguments as ``ddppo train``; the loop itself is ddppo/trainer/loop.py.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the installed package, not the files beside this one
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from ddppo.launch.cli import train_script as main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
