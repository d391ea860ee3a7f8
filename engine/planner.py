"""Memory planning: how long a context fits beside the weights, decided before anything is allocated.

A cache is priced by building it on the meta device (engine/cache.py make_cache): the same code
that allocates it, so there is no second formula to drift from it. The working memory of a
forward is priced from the shapes engine/runner.py, engine/cache.py and the kernels use (a
prefill chunk's activations and its attention).

Under tensor or context parallelism (engine/parallel.py) everything here is one rank's: the
request's config is the rank's (its heads and MLP columns), its cache the rank's share, the free
memory the least of any rank's; the group holds what each rank holds.
"""
import ctypes
import resource
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cli import launch
from engine.cache import make_cache
from engine.parallel import Parallel
from engine.runner import PREFILL_CHUNK
from kernels import streaming
from model import LlamaConfig
from quant.kvspec import KvSpec

GiB = 2 ** 30
HEADROOM = GiB  # of the free memory, kept back: the allocator's rounding, kernels' compilation, small tensors


@dataclass
class Request:
    """What sizes a cache besides its context: the spec (quant/kvspec.py), the model, the batch,
    the dtype of its full-precision parts, the calibration (it fixes SVDq's basis buffers) and
    the rank's place in a parallel group (cfg is then the rank's, Parallel.shard_config)."""
    spec: KvSpec
    cfg: LlamaConfig
    batch: int
    dtype: torch.dtype
    calibration: object = None
    parallel: Parallel = field(default_factory=Parallel)

    def cache_bytes(self, context: int) -> int:
        """Bytes one rank's cache allocates for `context` tokens per sequence, priced on meta."""
        cache = make_cache(self.spec, self.cfg, self.batch, context, "meta", self.dtype, self.calibration,
                           parallel=self.parallel)
        return cache.nbytes()


def usable_bytes(device) -> int:
    """What a plan may use: the free memory less HEADROOM. On the CPU, the processes torchrun
    started on this machine (LOCAL_WORLD_SIZE) share the host's memory: each may use its part."""
    ranks_here = launch().local_world if torch.device(device).type == "cpu" else 1
    return (free_bytes(device) - HEADROOM) // ranks_here


def free_bytes(device) -> int:
    """Memory that can still be allocated: free GPU memory, or the host's MemAvailable within what
    `ulimit -v` (RLIMIT_AS) leaves this process of its address space."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    left = float("inf") if limit == resource.RLIM_INFINITY else limit - status_bytes("VmSize:")
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(min(int(line.split()[1]) * 1024, left))
    raise RuntimeError("cannot read MemAvailable from /proc/meminfo")


def working_bytes(cfg, batch: int, prompt_tokens: int, dtype, kernels: bool, cp: int = 1) -> int:
    """Peak transient memory of the largest forward: one prefill chunk's MLP and logits, and its
    attention: with the kernels, fp32 partial outputs per segment [B, chunk, H, 4, D]; in plain
    torch, kernels/streaming.py's blocks for the chunk's queries; under context parallelism, the
    outputs and log-sum-exps gathered from the cp ranks [cp, B, chunk, H, D + 1] fp32. None grows
    with the prompt."""
    chunk = min(prompt_tokens, PREFILL_CHUNK)
    size = torch.finfo(dtype).bits // 8
    H, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    mlp = batch * chunk * (2 * cfg.hidden_size + 3 * cfg.intermediate_size) * size
    if kernels:
        attention = mlp + 4 * batch * chunk * H * 4 * (D + 1)
    else:  # the residual, its norm, q, k, v and the rotated q, k live while kernels/streaming.py attends
        projections = batch * chunk * (2 * cfg.hidden_size + (2 * H + 3 * Hkv) * D) * size
        attention = max(mlp, projections + streaming.working_bytes(batch, Hkv, chunk * H // Hkv, D))
    gathered = 4 * cp * batch * chunk * H * (D + 1) if cp > 1 else 0
    return attention + gathered + 4 * batch * cfg.vocab_size


def return_freed_memory():
    """On the CPU, with glibc: fix the mmap threshold at 1 MiB. glibc otherwise raises it to the
    largest block freed (up to 32 MiB) and serves later blocks below it from a heap it keeps, so
    the peak resident memory of a prefill reaches up to twice what it holds live; fixed, every
    block over 1 MiB goes back to the system when freed, and the peak is what working_bytes prices."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except OSError:  # not glibc
        pass


def resident_bytes(peak: bool = False) -> int:
    """This process's resident memory now, or its peak so far."""
    return status_bytes("VmHWM:" if peak else "VmRSS:")


def status_bytes(field: str) -> int:
    """A size from /proc/self/status (VmRSS: resident, VmHWM: its peak, VmSize: address space), 0 if absent."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    return 0


@dataclass
class Plan:
    context: int          # tokens per sequence the cache is allocated for
    cache: int            # its bytes
    working: int          # transient bytes of the largest forward
    free: int             # bytes a plan may use: what is free less HEADROOM, weights already loaded

    @property
    def fits(self) -> bool:
        return self.cache + self.working <= self.free

    def explain(self) -> str:
        return (f"a {self.context}-token context needs {self.cache / GiB:.2f} GiB of KV cache "
                f"({self.cache / self.context:.0f} bytes/token) + {self.working / GiB:.2f} GiB of working memory, "
                f"and {self.free / GiB:.2f} GiB are free (after {HEADROOM / GiB:.0f} GiB of headroom)")


def largest_context(request: Request, budget: int, limit: int = 1 << 26) -> int:
    """The longest context (<= limit) whose cache fits in `budget` bytes; 0 if none does."""
    return longest(lambda context: request.cache_bytes(context) <= budget, limit)


def longest(fits, limit: int) -> int:
    """The largest n <= limit with fits(n), 0 if none: a binary search, as what fits shrinks
    with n (a cache grows with its context)."""
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def plan(request: Request, prompt_tokens: int, context: int | str, device, free: int | None = None) -> Plan:
    """The cache for `context` tokens (or "auto": the longest that fits) and whether it fits in
    `free` bytes (default: usable_bytes(device); a parallel group passes its least)."""
    kernels = torch.device(device).type == "cuda"  # as the caches decide (engine/cache.py)
    free = usable_bytes(device) if free is None else free
    working = working_bytes(request.cfg, request.batch, prompt_tokens, request.dtype, kernels, request.parallel.cp)
    if context == "auto":
        context = largest_context(request, free - working)
    return Plan(context, request.cache_bytes(context), working, free)
