"""Writing rows of tensors on the CPU through numpy.

On a small CPU each torch call costs several microseconds of dispatch before any work (index, then ``copy_``:
~13 us per row written on the 2-core VM), and the per-step bookkeeping of a rollout writes dozens of small rows; a
numpy assignment into a view of the same memory costs ~1-3 us. Other devices use torch."""

from __future__ import annotations

import torch


def put_rows(dst: torch.Tensor, ids, values) -> None:
    """``dst[ids] = values``: ``ids`` an int (one row) or a list, array or tensor of rows, ``values`` a tensor,
    array, list or number broadcast as numpy / torch indexing would. Values are cast to ``dst``'s dtype."""
    if dst.device.type == "cpu":
        if isinstance(ids, torch.Tensor):
            ids = ids.numpy()
        dst.numpy()[ids] = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else values
    elif isinstance(ids, int):
        dst[ids] = torch.as_tensor(values, device=dst.device, dtype=dst.dtype)
    else:
        dst[torch.as_tensor(ids, device=dst.device)] = torch.as_tensor(values, device=dst.device, dtype=dst.dtype)


class HostViews:
    """numpy views of long-lived CPU tensors (an environment's or a simulator's state), made once: ``Tensor.numpy()``
    itself costs ~3.5 us a call on a small CPU, and starting episodes writes a dozen rows.

    A tensor not given at construction (another device, or an attribute since replaced by a new tensor) still works:
    it takes :func:`put_rows`'s path. Each view is keyed by its tensor's identity and holds the tensor, so a view can
    never outlive or be mistaken for another tensor."""

    def __init__(self, *tensors: torch.Tensor):
        self._views = {id(t): (t, t.numpy()) for t in tensors if t.device.type == "cpu"}

    def view(self, t: torch.Tensor):
        """The numpy view of CPU tensor ``t`` (the one made at construction when there is one)."""
        entry = self._views.get(id(t))
        return entry[1] if entry is not None and entry[0] is t else t.numpy()

    def put(self, dst: torch.Tensor, ids, values) -> None:
        """``put_rows(dst, ids, values)``, through the stored view of ``dst`` when there is one."""
        entry = self._views.get(id(dst))
        if entry is None or entry[0] is not dst:
            put_rows(dst, ids, values)
            return
        if isinstance(ids, torch.Tensor):
            ids = ids.numpy()
        entry[1][ids] = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else values
