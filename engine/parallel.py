"""More than one device: tensor parallel (--tp) and context parallel (--cp) on torch.distributed.

Launched by torchrun (`torchrun --nproc-per-node N generate.py --tp N`), one process per device:
NCCL between GPUs, gloo between CPU processes. The ranks form a grid of cp rows of tp ranks
(rank = cp_rank * tp + tp_rank, so a TP group is consecutive ranks: one node's fastest links),
one process group per row and per column.

Tensor parallel, as gpt-fast's tp.py: q, k, v, gate and up are split by output rows (each rank
computes its own heads and MLP columns), o and down by input columns, and each of those two is
followed by one all-reduce. KV heads are split too, so each rank's cache, quantizers and
calibration tables hold its heads only: N ranks hold N times the context. A model whose query
heads, KV heads or MLP columns do not divide by tp is refused. The embedding and lm_head are
replicated: a split lm_head would need an all-gather of the logits every step for memory that is
small beside the cache (Llama-2-7B: 0.5 of 12.6 GiB of weights), and with the whole logits on
every rank every rank samples the same token from the same generator, with no broadcast.

Context parallel: every rank holds the weights and computes the same queries, keys and values;
the cache's history is split by token ranges (rank r holds history rows [r R, (r + 1) R)), so
memory is spread evenly and N ranks hold N times the context. The full-precision sinks and window
(and a prefill chunk's own K/V) are kept on every rank but attended by cp rank 0 only. Each rank
attends over its segments and returns its output and log-sum-exp; `merge_attention` all-gathers
them and merges exactly, the math of kernels/decode_attention.py's stage 2.

Ranks come from torchrun's variables, checked (cli.launch). The processes meet within RENDEZVOUS
or stop with one line; a rank that fails later makes the others fail: its exit ends torchrun's
other processes, and a collective waiting on a lost rank raises (gloo at once, a hung rank after
TIMEOUT).
"""
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import timedelta

import torch
import torch.distributed as dist

from cli import FlagError, Launch, UserError, launch, world_mismatch
from model import Llama

TIMEOUT = timedelta(minutes=5)  # the longest wait on another rank: loading a large checkpoint included
RENDEZVOUS = 60                 # seconds for every process to come: torchrun starts them together
COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # output rows split: weight dim 0
ROW_PARALLEL = ("o_proj", "down_proj")                                    # input columns split: dim 1


@dataclass(frozen=True)
class Parallel:
    """Where this process sits in the tp x cp grid, and its process groups (None in one process,
    and where a cache is only priced, on the meta device)."""
    tp: int = 1
    cp: int = 1
    rank: int = 0
    tp_group: object = None
    cp_group: object = None

    @property
    def world(self) -> int:
        return self.tp * self.cp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def cp_rank(self) -> int:
        return self.rank // self.tp

    # -- tensor parallel: the rank's model ------------------------------------------------------

    def shard_config(self, cfg):
        """The config of this rank's part of the model: its query heads, KV heads and MLP columns."""
        sizes = {"query heads": cfg.num_attention_heads, "KV heads": cfg.num_key_value_heads,
                 "MLP columns (intermediate_size)": cfg.intermediate_size}
        for what, n in sizes.items():
            if n % self.tp:
                raise FlagError(f"--tp {self.tp}: the model's {n} {what} do not split over {self.tp} ranks")
        return replace(cfg, num_attention_heads=cfg.num_attention_heads // self.tp,
                       num_key_value_heads=cfg.num_key_value_heads // self.tp,
                       intermediate_size=cfg.intermediate_size // self.tp)

    def full_shape(self, name: str, shape) -> tuple:
        """The checkpoint's shape of tensor `name`, of which this rank holds `shape`."""
        shape, dim = list(shape), _split_dim(name)
        if dim is not None:
            shape[dim] *= self.tp
        return tuple(shape)

    def index(self, name: str, full_shape) -> tuple:
        """What this rank reads of tensor `name` (safetensors get_slice takes it): its rows of a
        column-parallel weight, its columns of a row-parallel one, all of anything else."""
        dim = _split_dim(name)
        if dim is None:
            return (slice(None),)
        n = full_shape[dim] // self.tp
        return (slice(None),) * dim + (slice(self.tp_rank * n, (self.tp_rank + 1) * n),)

    def attach(self, model):
        """Sums each row-parallel projection's partial outputs over the TP group, in place."""
        if self.tp == 1:
            return model
        for layer in model.model.layers:
            for module in (layer.self_attn.o_proj, layer.mlp.down_proj):
                module.register_forward_hook(self._all_reduce)
        return model

    def _all_reduce(self, module, inputs, output):
        dist.all_reduce(output, group=self.tp_group)
        return output

    # -- context parallel: the rank's share of the history --------------------------------------

    def token_range(self, rows: int, block: int = 1) -> tuple[int, int]:
        """(first row, rows) of a history of `rows` rows that this rank holds: whole blocks of
        `block` rows (SVDq's token groups are quantized together), the same count on every rank."""
        share = -(-rows // (self.cp * block)) * block
        return self.cp_rank * share, share

    @property
    def attends_recent(self) -> bool:
        """Whether this rank attends to the sinks, the window and a prefill chunk's own K/V (all
        ranks hold them alike; one must count them)."""
        return self.cp_rank == 0

    def merge_attention(self, out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
        """out [B, Q, H, D] and lse [B, Q, H] of this rank's segments -> the attention over every
        rank's, [B, Q, H, D]: each rank's output weighted by its share of the softmax mass."""
        rows = torch.cat([out.float(), lse[..., None]], -1)                          # (B, Q, H, D + 1)
        gathered = [torch.empty_like(rows) for _ in range(self.cp)]
        dist.all_gather(gathered, rows.contiguous(), group=self.cp_group)
        gathered = torch.stack(gathered)                                              # (cp, B, Q, H, D + 1)
        return merge(gathered[..., :-1], gathered[..., -1]).to(out.dtype)

    # -- the group as a whole -------------------------------------------------------------------

    def agree(self, step):
        """Runs step() on every rank; if it raised a UserError on any, every rank raises the first
        (lowest rank's), so all stop alike and rank 0 reports it. Returns step()'s value."""
        error, value = None, None
        try:
            value = step()
        except UserError as e:
            error = e
        if self.world == 1:
            if error:
                raise error
            return value
        errors = [None] * self.world
        dist.all_gather_object(errors, None if error is None else (type(error), str(error), self.rank))
        failed = next((e for e in errors if e is not None), None)
        if failed:
            kind, message, rank = failed
            raise kind(message if rank == 0 else f"rank {rank}: {message}")
        return value

    def smallest(self, n: int) -> int:
        """The least of every rank's n (free memory: the group holds what its fullest rank holds)."""
        if self.world == 1:
            return n
        t = torch.tensor([n], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t)

    @property
    def device(self) -> torch.device:
        """This rank's device for collectives: its GPU under NCCL, else the CPU."""
        if dist.is_initialized() and dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


def _split_dim(name: str):
    """The weight dimension tensor parallelism splits `name` along, or None (replicated)."""
    module = name.split(".")[-2] if "." in name else ""
    return 0 if module in COLUMN_PARALLEL else 1 if module in ROW_PARALLEL else None


def merge(out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """out [N, ..., D] fp32, lse [N, ...]: N attentions over disjoint sets of tokens -> the
    attention over their union [..., D]. Parts with lse -inf (no token) weigh nothing."""
    top = lse.amax(0)
    top = top.masked_fill(top == -torch.inf, 0.0)
    weight = (lse - top).exp()                                                      # (N, ...)
    total = weight.sum(0).clamp_min(torch.finfo(torch.float32).tiny)
    return (weight[..., None] * out).sum(0) / total[..., None]


def start(tp: int, cp: int, device: torch.device) -> Parallel:
    """Joins the process group torchrun's environment describes (NCCL on CUDA, gloo on the CPU)
    and makes the TP and CP groups; one process alone needs none. On CUDA, the caller has picked
    the rank's GPU (`local_device`)."""
    if mismatch := world_mismatch(tp, cp):
        raise FlagError(mismatch)
    if tp * cp == 1:
        return Parallel()
    backend = "nccl" if device.type == "cuda" else "gloo"
    here = launch()
    dist.init_process_group(backend, store=meet(here), rank=here.rank, world_size=here.world, timeout=TIMEOUT,
                            device_id=device if device.type == "cuda" else None)
    rank = dist.get_rank()
    # Every rank makes every group, in the same order (torch.distributed's rule), and keeps its own.
    tp_groups = [dist.new_group([c * tp + t for t in range(tp)]) for c in range(cp)]     # rows of the grid
    cp_groups = [dist.new_group([c * tp + t for c in range(cp)]) for t in range(tp)]     # its columns
    return Parallel(tp, cp, rank, tp_groups[rank // tp], cp_groups[rank % tp])


def meet(here: Launch) -> dist.Store:
    """The store every process meets at (MASTER_ADDR:MASTER_PORT: torchrun's agent hosts it, else
    rank 0 does), once all WORLD_SIZE have come. In waits of a second, so that Ctrl-C is heard;
    a UserError after RENDEZVOUS seconds."""
    hosts = here.rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    where = f"{here.master_addr}:{here.master_port}"
    deadline = time.monotonic() + RENDEZVOUS
    key = f"kvq/joined/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '')}"
    store = None
    with stderr_silenced():  # c10d logs every failed attempt to connect, with a C++ stack
        while store is None:
            try:
                store = dist.TCPStore(here.master_addr, here.master_port, here.world, hosts, timedelta(seconds=1),
                                      wait_for_workers=False)
            except RuntimeError as e:  # DistNetworkError, DistStoreError
                if hosts:
                    raise UserError(f"rank 0 cannot host the rendezvous at {where} ({str(e).splitlines()[0]})")
                if time.monotonic() > deadline:
                    raise UserError(f"rank {here.rank}: no rendezvous at {where} within {RENDEZVOUS} s "
                                    "(is rank 0 running? torchrun starts every rank)")
        store.add(key, 1)
        while (joined := store.add(key, 0)) < here.world:
            if time.monotonic() > deadline:
                raise UserError(f"rank {here.rank}: {joined} of WORLD_SIZE={here.world} processes came to the "
                                f"rendezvous at {where} within {RENDEZVOUS} s (torchrun --nproc-per-node "
                                f"{here.world} starts them all)")
            time.sleep(0.1)
    store.set_timeout(TIMEOUT)
    return store


@contextmanager
def stderr_silenced():
    """File descriptor 2 pointed at /dev/null (what C++ libraries write there too) for the block."""
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def local_device(device_type: str) -> torch.device:
    """The device of this process: under torchrun on CUDA, GPU LOCAL_RANK (one per process)."""
    if device_type != "cuda":
        return torch.device(device_type)
    index = launch().local_rank
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def load_model(path, device, dtype, parallel: Parallel):
    """The checkpoint's model, or under tensor parallelism this rank's part of it: each rank reads
    only its slices of the safetensors files, and the row-parallel projections all-reduce."""
    model = Llama.from_pretrained(path, device, dtype, shard=parallel if parallel.tp > 1 else None)
    return parallel.attach(model)


def stop(parallel: Parallel):
    if parallel.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
