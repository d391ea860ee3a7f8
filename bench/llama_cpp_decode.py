"""llama.cpp's decode speed on a GGUF, for bench/decode.py's CPU table (--llama-cpp).

Runs under a Python that imports `llama_cpp` (llama-cpp-python, in an environment of its own:
llama.cpp is never a dependency of the engine), so it imports nothing of ours, not even torch:

    PYTHON bench/llama_cpp_decode.py MODEL.gguf --threads 1 --kv f16,q8_0 --contexts 0,4096

Flash attention on, K and V caches of the named type (f16, q8_0, q4_0), batch 1. As in our
table the history is synthetic: llama-bench's `-d N` prefills N real tokens first, hours at 128K
on two cores, so instead the sequence's state (llama_state_seq_get_data's layout, read from a
one-token state of the same context) is rebuilt with N cells at positions 0 .. N-1, each holding
that token's K/V rows, and loaded with llama_state_seq_set_data. Speed does not depend on the
values. Then it times `--steps` single-token llama_decode calls after one warm-up (median, ms)
and prints one JSON object per line.
"""
import argparse
import ctypes
import json
import struct
import sys
import time

import llama_cpp as llama
import numpy as np

KV_TYPES = {"f16": llama.GGML_TYPE_F16, "q8_0": llama.GGML_TYPE_Q8_0, "q4_0": llama.GGML_TYPE_Q4_0}
TOKEN = 1  # any id: speed does not depend on it
QUIET = llama.llama_log_callback(lambda level, text, data: None)  # llama.cpp's log off: stdout is JSON


def new_context(model, n_ctx: int, kv: str, threads: int):
    params = llama.llama_context_default_params()
    params.n_ctx = n_ctx
    params.n_batch = params.n_ubatch = 512
    params.n_threads = params.n_threads_batch = threads
    params.flash_attn_type = llama.LLAMA_FLASH_ATTN_TYPE_ENABLED
    params.type_k = params.type_v = KV_TYPES[kv]
    ctx = llama.llama_init_from_model(model, params)
    if not ctx:
        sys.exit(f"error: llama.cpp could not make a context of {n_ctx} tokens with a {kv} cache")
    return ctx


def decode(ctx, n: int = 1):
    tokens = (llama.llama_token * n)(*[TOKEN] * n)
    if llama.llama_decode(ctx, llama.llama_batch_get_one(tokens, n)) != 0:
        sys.exit("error: llama_decode failed")


def state(ctx) -> bytes:
    size = llama.llama_state_seq_get_size(ctx, 0)
    buffer = (ctypes.c_uint8 * size)()
    assert llama.llama_state_seq_get_data(ctx, buffer, size, 0) == size
    return bytes(buffer)


def synthetic_state(one: bytes, n: int) -> np.ndarray:
    """A one-cell sequence state (llama_kv_cache::state_write: magic, seq id, streams, cells;
    per cell its position and sequence ids; v_trans, layers; per layer the K type, row size and
    rows; the same for V) rebuilt with n cells: positions 0 .. n-1, each with the one cell's rows."""
    magic, seq_id, streams, cells, pos, n_seq, seq, v_trans, layers = struct.unpack_from("<IiIIiIiII", one)
    if (streams, cells, n_seq, v_trans) != (1, 1, 1, 0):
        sys.exit("error: this llama.cpp's sequence state is not the layout bench/llama_cpp_decode.py reads")
    at, rows = struct.calcsize("<IiIIiIiII"), []
    for _ in range(2 * layers):  # the K rows of every layer, then the V rows
        _, size = struct.unpack_from("<iQ", one, at)  # the type, the row size
        rows.append((one[at:at + 12], np.frombuffer(one, np.uint8, size, at + 12)))
        at += 12 + size
    assert at == len(one), "unread bytes in the sequence state"
    cell = np.zeros(n, dtype=[("pos", "<i4"), ("n_seq", "<u4"), ("seq", "<i4")])
    cell["pos"], cell["n_seq"], cell["seq"] = np.arange(n), 1, seq
    out = np.empty(16 + cell.nbytes + 8 + sum(len(header) + row.nbytes * n for header, row in rows), np.uint8)
    at = 0
    for data in [struct.pack("<IiII", magic, seq_id, 1, n), cell.tobytes(), struct.pack("<II", v_trans, layers)]:
        out[at:at + len(data)] = np.frombuffer(data, np.uint8)
        at += len(data)
    for header, row in rows:  # written in place: 3 GB at 128K tokens in f16
        out[at:at + len(header)] = np.frombuffer(header, np.uint8)
        out[at + len(header):at + len(header) + row.nbytes * n].reshape(n, row.nbytes)[:] = row
        at += len(header) + row.nbytes * n
    return out


def time_decode(model, kv: str, context: int, threads: int, steps: int, real: bool = False) -> float:
    """Median seconds of a one-token decode after `context` tokens of synthetic history (real:
    of `context` tokens decoded, 512 at a time, as llama-bench -d does)."""
    ctx = new_context(model, context + steps + 2, kv, threads)
    try:
        for start in range(0, context if real else 0, 512):
            decode(ctx, min(512, context - start))
        if context and not real:
            decode(ctx)
            history = synthetic_state(state(ctx), context)
            llama.llama_memory_clear(llama.llama_get_memory(ctx), True)
            loaded = llama.llama_state_seq_set_data(
                ctx, history.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)), history.nbytes, 0)
            if loaded != history.nbytes:
                sys.exit(f"error: llama.cpp did not take the synthetic state of {context} tokens")
            del history
        times = []
        for _ in range(steps + 1):
            begin = time.perf_counter()
            decode(ctx)
            times.append(time.perf_counter() - begin)
        return sorted(times[1:])[steps // 2]
    finally:
        llama.llama_free(ctx)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("gguf")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--kv", default="f16,q8_0,q4_0", help=f"K/V cache types: {', '.join(KV_TYPES)}")
    p.add_argument("--contexts", default="0,4096")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--real-history", action="store_true",
                   help="decode the history's tokens for real (slow past a few thousand): checks the synthetic one")
    args = p.parse_args()
    kinds = args.kv.split(",")
    if unknown := [k for k in kinds if k not in KV_TYPES]:
        p.error(f"--kv: unknown {', '.join(unknown)} (known: {', '.join(KV_TYPES)})")
    llama.llama_log_set(QUIET, None)
    llama.llama_backend_init()
    model = llama.llama_model_load_from_file(args.gguf.encode(), llama.llama_model_default_params())
    if not model:
        sys.exit(f"error: llama.cpp could not load {args.gguf}")
    description = ctypes.create_string_buffer(256)
    llama.llama_model_desc(model, description, 256)
    for context in [int(c) for c in args.contexts.split(",")]:
        for kv in kinds:
            seconds = time_decode(model, kv, context, args.threads, args.steps, args.real_history)
            print(json.dumps(dict(engine="llama.cpp", model=description.value.decode(), gguf=args.gguf, kv=kv,
                                  context=context, threads=args.threads, step_ms=seconds * 1e3,
                                  history="real" if args.real_history else "synthetic")), flush=True)
    llama.llama_model_free(model)


if __name__ == "__main__":
    main()
