"""What a step dispatches, without a GPU: Triton launches recorded instead of run, and the torch
operations it runs, with the ones that would make the host wait for the device. bench/sass.py
counts a decode step's; tests/test_graph.py checks that the step could be captured as a CUDA graph.
"""
import contextlib
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

# Operations whose result the host must wait for, whose output shape depends on values, or that
# make a tensor from host data (lift_fresh: torch.tensor(...), a copy to the GPU each time): none
# can be in a CUDA graph.
HOST_SYNCS = {"_local_scalar_dense", "item", "nonzero", "masked_select", "unique", "_unique", "_unique2",
              "unique_consecutive", "unique_dim", "is_nonzero", "equal", "repeat_interleave", "masked_scatter",
              "lift_fresh", "lift_fresh_copy"}


@dataclass
class Launch:
    """One recorded launch: the kernel, its arguments as passed, and who launched it."""
    kernel: JITFunction | InterpretedFunction
    args: tuple
    kwargs: dict
    grid: tuple
    sources: list = field(default_factory=list)


@contextlib.contextmanager
def recorded_launches():
    """Within: every Triton launch is appended to the yielded list instead of run (compiled or,
    under TRITON_INTERPRET=1, interpreted)."""
    launches = []
    real_runs = {kind: kind.run for kind in (JITFunction, InterpretedFunction)}

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, kwargs, grid))

    for kind in real_runs:
        kind.run = record
    try:
        yield launches
    finally:
        for kind, run in real_runs.items():
            kind.run = run


class TorchOps(TorchDispatchMode):
    """The torch operations run within it (each is a host dispatch, most a GPU launch): `ops`
    their names, `shapes` their outputs' shapes, `syncs` those of them in HOST_SYNCS, with a
    boolean index (whose result's shape depends on values), or copying to the CPU."""

    def __init__(self):
        super().__init__()
        self.ops, self.shapes, self.syncs = [], [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        out = func(*args, **(kwargs or {}))
        self.ops.append(name)
        self.shapes.append(tuple(tuple(t.shape) for t in _tensors(out)))
        boolean_index = name.startswith("index") and any(t.dtype == torch.bool for t in _tensors(args[1:]))
        to_host = name in ("_to_copy", "copy_") and any(t.device.type == "cpu" for t in _tensors(out)) and \
            any(t.device.type != "cpu" for t in _tensors(args))
        if name in HOST_SYNCS or boolean_index or to_host:
            self.syncs.append(name)
        return out


def _tensors(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _tensors(item)]
    return []
