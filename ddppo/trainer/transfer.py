"""Start a run from another run's weights: the ``transfer`` section of the config.

The policy's submodules have stable names (ddppo/policy/policy.py), and weights are copied by those names from
a training checkpoint (``ddppo.io.checkpoint.load``: tensors only, never unpickled code):

- the **visual pathway**, ENCODER_MODULES: the input normaliser (its running statistics are part of what the
  encoder learned to expect), the convolutional encoder and the FC projecting its features (habitat-baselines
  keeps that FC in its visual encoder too). ``transfer.encoder``: ``frozen`` (loaded, no gradient, kept in eval
  mode so the normaliser's statistics stay put: the pathway stays bit-identical), ``finetune`` (loaded and
  trained, at ``ppo.lr * transfer.encoder_lr_scale``) or ``scratch`` (not loaded);
- the **core**, CORE_MODULES: the recurrent network with the goal and previous-action embeddings feeding it,
  loaded with ``transfer.core=load``;
- the actor and critic heads are always new: they belong to the source task's reward.

A checkpoint of another encoder family (or compression layer), or with tensors of other shapes, is a one-line
ValueError naming the module. habitat-baselines' PointNavResNetPolicy checkpoints load too, their weights renamed by
ddppo/policy/habitat_baselines_weights.py. The run records what it loaded in ``<run_dir>/transfer.json``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from torch import nn

from ddppo.io import checkpoint
from ddppo.io.atomic import atomic_write_text
from ddppo.policy.habitat_baselines_weights import (
    ddppo_state_dict,
    is_habitat_baselines_checkpoint,
    policy_overrides,
)

ENCODER_MODULES = ("visual_input", "encoder", "visual_fc")
CORE_MODULES = ("goal_embed", "action_embed", "core")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def copy_modules(policy: nn.Module, weights: dict, names: tuple[str, ...], source: str) -> None:
    """Load ``weights`` (a policy state dict) into the submodules ``names`` of ``policy``, checking every key and
    shape first so that nothing is copied unless everything fits."""
    staged = {}
    for name in names:
        module = getattr(policy, name, None)
        if module is None:
            raise ValueError(f"{source}: this policy has no module '{name}' to load (blind agent or no goal sensor)")
        prefix = name + "."
        theirs = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        if not theirs:
            raise ValueError(f"{source}: module '{name}' is not in the checkpoint (blind agent or no goal sensor)")
        mine = module.state_dict()
        if theirs.keys() != mine.keys():
            diff = sorted(set(theirs) ^ set(mine))
            raise ValueError(f"{source}: module '{name}' has other tensors in the checkpoint ({prefix}{diff[0]} is "
                             "in only one of them)")
        for key, value in mine.items():
            if tuple(theirs[key].shape) != tuple(value.shape):
                raise ValueError(f"{source}: module '{name}': {prefix}{key} has shape {tuple(theirs[key].shape)} in "
                                 f"the checkpoint but {tuple(value.shape)} here")
        staged[name] = theirs
    for name, theirs in staged.items():
        getattr(policy, name).load_state_dict(theirs)


def freeze(policy: nn.Module, names: tuple[str, ...]) -> None:
    """No gradient and eval mode for the submodules ``names``, for the rest of the policy's life."""
    for name in names:
        module = getattr(policy, name)
        if module is not None:
            module.requires_grad_(False)
    policy.frozen_modules = tuple(names)
    policy.train(policy.training)


def _as_ddppo_checkpoint(ckpt: dict, policy: nn.Module, source: str) -> dict:
    """A ddppo training checkpoint as is; a habitat-baselines one as the fields transfer reads (its weights under
    ddppo's names, in ``policy``'s goal-feature form; the policy config they imply; its step count)."""
    if is_habitat_baselines_checkpoint(ckpt):
        implied = dict(item.split("=", 1) for item in policy_overrides(ckpt, source))
        config = {"name": "habitat-baselines", "task": {"type": "pointnav"},
                  "policy": {"encoder": implied.get("policy.encoder"),
                             "compression_groups": int(implied.get("policy.compression_groups", 0))}}
        return {"policy": ddppo_state_dict(ckpt, policy, source, complete=False), "config": config,
                "env_steps": (ckpt.get("extra_state") or {}).get("step")}
    if "policy" not in ckpt or "config" not in ckpt:
        raise ValueError(f"{source}: missing field 'policy' or 'config' (not a ddppo training checkpoint)")
    return ckpt


def apply_transfer(policy: nn.Module, cfg, run_dir: str | Path | None = None, log=print, write: bool = True):
    """Load and freeze what ``cfg.transfer`` asks for; returns (trainable parameters, optimizer param groups).

    The groups hold every trainable parameter once: the visual pathway at ``ppo.lr * encoder_lr_scale`` (its own
    group, so LambdaLR schedules it alongside), everything else at ``ppo.lr`` (the first group, the one the trainer
    logs). When weights are loaded, ``run_dir`` gets transfer.json (if ``write``: rank 0). A run that will resume
    (``run_dir`` has a resume state) loads nothing: its resume state holds the weights, and the source checkpoint may
    be gone by then (pruned, moved), which must not stop a requeued job."""
    t = cfg.transfer
    record = None
    resuming = run_dir is not None and (Path(run_dir) / "resume.pt").is_file()
    if t.checkpoint and resuming:
        log(f"transfer: resuming {run_dir}, whose resume state holds the weights (see its transfer.json)")
    elif t.checkpoint:
        path = Path(t.checkpoint)
        source = f"transfer.checkpoint {path}"
        ckpt = _as_ddppo_checkpoint(checkpoint.load(path), policy, source)
        theirs = ckpt["config"].get("policy", {})
        names = (ENCODER_MODULES if t.encoder != "scratch" else ()) + (CORE_MODULES if t.core == "load" else ())
        for key, default in (("encoder", None), ("compression_groups", 0)) if t.encoder != "scratch" else ():
            if theirs.get(key, default) != cfg.policy[key]:  # another family, or the same shapes for another function
                raise ValueError(f"{source}: module 'encoder' has policy.{key}={theirs.get(key, default)} in the "
                                 f"checkpoint but policy.{key}={cfg.policy[key]} here")
        copy_modules(policy, ckpt["policy"], names, source)
        src_task = ckpt["config"].get("task", {})
        record = {
            "checkpoint": str(path.resolve()), "sha256": _sha256(path),
            "source_run": ckpt["config"].get("name"), "source_task": src_task.get("type", "pointnav"),
            "source_env_steps": ckpt.get("env_steps"), "source_encoder": theirs.get("encoder"),
            "encoder": t.encoder, "core": t.core, "encoder_lr_scale": t.encoder_lr_scale,
            "loaded": list(names),
            "fresh": [n for n, _ in policy.named_children() if n not in names],
        }
    if t.encoder == "frozen":
        freeze(policy, ENCODER_MODULES)
    encoder_ids = {id(p) for n in ENCODER_MODULES if getattr(policy, n, None) is not None
                   for p in getattr(policy, n).parameters()}
    params = [p for p in policy.parameters() if p.requires_grad]
    rest = [p for p in params if id(p) not in encoder_ids]
    visual = [p for p in params if id(p) in encoder_ids]
    groups = [{"params": rest}] + ([{"params": visual, "lr": cfg.ppo.lr * t.encoder_lr_scale}] if visual else [])
    if record is not None:
        record["frozen"] = list(policy.frozen_modules)
        log(f"transfer: {', '.join(record['loaded']) or 'nothing'} from {record['checkpoint']} "
            f"({record['source_task']} run {record['source_run']!r}, {record['source_env_steps']} env steps); "
            f"encoder {t.encoder}, core {t.core}")
        if run_dir is not None and write:
            atomic_write_text(Path(run_dir) / "transfer.json", json.dumps(record, indent=1))
    return params, groups
