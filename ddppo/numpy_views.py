"""CPU tensors through numpy: row writes, and the numba kernels' arguments.

On a small CPU each torch call costs more in dispatch than in work when it writes one row (index, then ``copy_``;
even ``Tensor.numpy()`` is not free), and a step of the environment and of the rollout's bookkeeping makes dozens
of such small calls; a numpy assignment into a view made once costs a fraction of that. Other devices use torch.
(bench/LOG.md has the measurements.)"""

from __future__ import annotations

import numpy as np
import torch


def as_numpy(a) -> np.ndarray:
    """``a`` itself when it already is a numpy array (a view made once, see :class:`HostViews`), else
    ``a.numpy()``: what the numba kernels' wrappers take."""
    return a if isinstance(a, np.ndarray) else a.numpy()


def put_rows(dst: torch.Tensor, ids, values) -> None:
    """``dst[ids] = values`` for a few rows: ``ids`` a list, array or tensor, ``values`` a tensor, array, list or
    number broadcast as numpy / torch indexing would. Values are cast to ``dst``'s dtype."""
    if dst.device.type == "cpu":
        _put_numpy(dst.numpy(), ids, values)
    else:
        dst[torch.as_tensor(ids, device=dst.device)] = torch.as_tensor(values, device=dst.device, dtype=dst.dtype)


class HostViews:
    """numpy views of long-lived CPU tensors (an environment's or a simulator's state), made once: ``Tensor.numpy()``
    itself costs a noticeable share of a one-row write, and starting episodes writes a dozen rows.

    A tensor not given at construction (another device, or an attribute since replaced by a new tensor) still works:
    it takes :func:`put_rows`'s path. Each view is keyed by its tensor's identity and holds the tensor, so a view can
    never outlive or be mistaken for another tensor."""

    def __init__(self, *tensors: torch.Tensor):
        self._views = {id(t): (t, t.numpy()) for t in tensors if t.device.type == "cpu"}

    def view(self, t: torch.Tensor) -> np.ndarray:
        """The numpy view of CPU tensor ``t`` (the one made at construction when there is one)."""
        entry = self._views.get(id(t))
        return entry[1] if entry is not None and entry[0] is t else t.numpy()

    def kernel_arg(self, kernels: str):
        """How to hand a tensor to a kernel twin: its view (:meth:`view`) to the ``"numba"`` twins, which take numpy
        arrays, and the tensor itself to the ``"torch"`` twins."""
        return self.view if kernels == "numba" else _same

    def put(self, dst: torch.Tensor, ids, values) -> None:
        """``put_rows(dst, ids, values)``, through the stored view of ``dst`` when there is one."""
        entry = self._views.get(id(dst))
        if entry is None or entry[0] is not dst:
            put_rows(dst, ids, values)
        else:
            _put_numpy(entry[1], ids, values)


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _put_numpy(view: np.ndarray, ids, values) -> None:
    if isinstance(ids, torch.Tensor):
        ids = ids.numpy()
    view[ids] = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else values
