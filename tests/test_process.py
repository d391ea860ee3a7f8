"""What surrounds a run: Ctrl-C, a reader that goes away, a full disk or closed stdout, torchrun's
environment (checked, or stray), a rendezvous that cannot complete, and the cache of the CPU's C
kernel (never a foreign or damaged file loaded). Each ends in one line or in correct output, within
a bounded time. generate.py runs as a subprocess here (signals and file descriptors are the process's)."""
import ctypes
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from cli import UserError
from conftest import ROOT
from engine import parallel


@pytest.fixture(scope="module")
def model(tmp_path_factory, tokenizer_path):
    """A small random checkpoint without EOS and of a long context, so that a long run is not ended
    early by chance, nor noted."""
    from conftest import make_hf_model

    path = tmp_path_factory.mktemp("process") / "ckpt"
    make_hf_model(eos_token_id=None, max_position_embeddings=200000).save_pretrained(path)
    (path / "generation_config.json").unlink(missing_ok=True)
    shutil.copy(tokenizer_path, path / "tokenizer.model")
    return path


def generate(model, *flags, tokens=5):
    return [sys.executable, str(ROOT / "generate.py"), "--model", str(model), "--prompt-tokens", "8", "--device", "cpu",
            "--kv", "fp16", "--max-new-tokens", str(tokens), *map(str, flags)]


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    return {**env, **extra}


def one_error_line(stderr: str, message: str):
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], stderr


def long_run(model, **popen):
    """generate.py producing tokens for a minute or more: text arrives on stdout as it goes."""
    return subprocess.Popen(generate(model, "--max-context", 100000, tokens=99000), env=clean_env(), **popen)


def test_ctrl_c_ends_with_one_line_and_status_130(model):
    p = long_run(model, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert p.stdout.read(1)  # generation has started
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 130
    one_error_line(err.decode(), "error: interrupted")


def test_a_closed_pipe_ends_quietly(model):
    """As `generate.py | head -c 10`: the reader goes away; no traceback, no message."""
    p = long_run(model, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert len(p.stdout.read(10)) == 10
        p.stdout.close()
        err = p.stderr.read()
        p.wait(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 141 and err == b""


def test_a_full_disk_is_one_line(model):
    with open("/dev/full", "wb") as full:
        r = subprocess.run(generate(model), stdout=full, stderr=subprocess.PIPE, text=True, env=clean_env(), timeout=120)
    assert r.returncode == 1
    one_error_line(r.stderr, "cannot write to stdout (No space left on device)")


def test_closed_stdout_is_one_line(model):
    r = subprocess.run(generate(model), stderr=subprocess.PIPE, text=True, env=clean_env(), timeout=120,
                       preexec_fn=lambda: os.close(1))
    assert r.returncode == 1
    one_error_line(r.stderr, "stdout is closed")


@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' in the environment is not an integer"),
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 without RANK, MASTER_ADDR, MASTER_PORT: start the processes with torchrun"),
    ({"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"},
     "RANK=2 in the environment is outside 0 ... 1"),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "99999"},
     "MASTER_PORT=99999 in the environment is outside 1 ... 65535"),
])
def test_torchrun_variables_are_checked(model, env, message):
    """Before anything loads: exit 2 with one line, at once (WORLD_SIZE=2 alone once waited forever)."""
    r = subprocess.run(generate(model, "--tp", 2), capture_output=True, text=True, env=clean_env(**env), timeout=60)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and message in r.stderr, r.stderr


def test_a_stray_rank_still_prints_its_errors(model):
    """RANK=1 left in the environment of one process (no WORLD_SIZE): it is alone, and speaks."""
    r = subprocess.run(generate(model.parent / "missing"), capture_output=True, text=True, env=clean_env(RANK="1"),
                       timeout=60)
    assert r.returncode == 1
    one_error_line(r.stderr, "model directory not found")


@pytest.mark.parametrize("rank", [0, 1])
def test_a_rendezvous_that_cannot_complete_ends_in_bounded_time(monkeypatch, rank):
    """WORLD_SIZE=2 with one process: rank 0 waits for a rank that never comes, rank 1 for a rank 0
    that is not there; each ends with one UserError after RENDEZVOUS seconds."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, value in {"WORLD_SIZE": "2", "RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(parallel, "RENDEZVOUS", 3)
    start = time.monotonic()
    with pytest.raises(UserError, match="1 of WORLD_SIZE=2 processes came" if rank == 0 else "no rendezvous at"):
        parallel.start(2, 1, parallel.torch.device("cpu"))
    assert time.monotonic() - start < 20


# -- the C kernel's cache ----------------------------------------------------------------------------

SOURCE = "int answer(void) { return 42; }\n"
PLANTED = ('#include <stdio.h>\n__attribute__((constructor)) static void planted(void) {\n'
           '    fclose(fopen("%s", "w"));\n}\nint answer(void) { return 7; }\n')


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty XDG_CACHE_HOME, and a compile command for a one-function library."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    source = tmp_path / "answer.c"
    source.write_text(SOURCE)
    return tmp_path, ["cc", "-shared", "-fPIC", str(source), "-o"]


def compile_to(path, source, tmp_path):
    (tmp_path / "other.c").write_text(source)
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cc", "-shared", "-fPIC", str(tmp_path / "other.c"), "-o", str(path)], check=True)


def test_the_kernel_is_built_and_its_hash_recorded(cache):
    from kernels import native

    tmp_path, command = cache
    library = native.load("answer", command, "k1", ["answer"])
    assert library.answer() == 42
    built = tmp_path / "xdg" / "kvq" / "answer-k1.so"
    assert (built.parent / "answer-k1.so.sha256").read_text().strip() == hashlib.sha256(built.read_bytes()).hexdigest()
    assert sorted(p.name for p in built.parent.iterdir()) == ["answer-k1.so", "answer-k1.so.sha256"]  # no temporaries


@pytest.mark.parametrize("damage", ["planted", "planted with a forged record of another file", "truncated"])
def test_a_foreign_or_damaged_library_is_rebuilt_not_loaded(cache, damage):
    """A planted library would run its constructor at load (it makes a marker file); a truncated
    one crashed the process with SIGBUS. Either is replaced by a fresh build."""
    from kernels import native

    tmp_path, command = cache
    library = tmp_path / "xdg" / "kvq" / "answer-k2.so"
    marker = tmp_path / "planted-ran"
    if damage == "truncated":  # after its build, recorded: never loaded here (a loaded one is mapped)
        compile_to(library, SOURCE, tmp_path)
        data = library.read_bytes()
        library.with_name(library.name + ".sha256").write_text(hashlib.sha256(data).hexdigest())
        library.write_bytes(data[:1000])
    else:
        compile_to(library, PLANTED % marker, tmp_path)
    if damage.endswith("another file"):
        library.with_name(library.name + ".sha256").write_text(hashlib.sha256(b"something else").hexdigest())
    loaded = native.load("answer", command, "k2", ["answer"])
    assert not marker.exists() and loaded.answer() == 42


@pytest.mark.parametrize("problem", ["folder writable by others", "kvq is a file", "unwritable cache home",
                                     "missing symbol", "compiler error"])
def test_an_unusable_cache_falls_back_to_torch_with_a_note(cache, monkeypatch, capsys, problem):
    from kernels import native

    tmp_path, command = cache
    folder = tmp_path / "xdg" / "kvq"
    symbols = ["answer"]
    if problem == "folder writable by others":
        folder.mkdir(parents=True)
        folder.chmod(0o777)
    elif problem == "kvq is a file":
        folder.parent.mkdir()
        folder.write_text("")
    elif problem == "unwritable cache home":
        monkeypatch.setenv("XDG_CACHE_HOME", "/proc/kvq-cache")  # not even root can make a folder there
    elif problem == "missing symbol":
        symbols = ["answer", "question"]
    else:
        command = ["cc", "-shared", "-fPIC", str(tmp_path / "missing.c"), "-o"]
    assert native.load("answer", command, "k3", symbols) is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("note: the C kernels (answer) are not used, torch runs in their place")


def test_generate_runs_in_torch_when_the_cache_folder_is_a_file(model, tmp_path):
    (tmp_path / "kvq").write_text("")
    r = subprocess.run(generate(model, "--temperature", 0), capture_output=True, text=True, timeout=120,
                       env=clean_env(XDG_CACHE_HOME=str(tmp_path)))
    assert r.returncode == 0 and len(r.stdout.split()) > 0, r.stderr
    notes = [line for line in r.stderr.splitlines() if "C kernel" in line]
    assert len(notes) == 1 and notes[0].startswith("note: ")


@pytest.fixture(scope="module")
def built_kernel(tmp_path_factory):
    """An XDG_CACHE_HOME in which the real kernels (kernels/native.py SOURCES) have been built."""
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    folder = tmp_path_factory.mktemp("kernel")
    assert kernel_loads(folder).returncode == 0
    return folder


def kernel_loads(xdg):
    code = "from kernels import streaming; assert streaming.compiled_kernel() is not None"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=clean_env(XDG_CACHE_HOME=str(xdg)),
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # a build of the real kernel: half a minute on a busy 2-core machine
@pytest.mark.parametrize("damage", ["planted", "truncated"])
def test_a_planted_or_truncated_kernel_is_never_loaded(built_kernel, tmp_path, damage):
    """The real kernel's cache: a library put in place of the built one (its constructor would run
    at load and make a marker file), or the built one truncated (it crashed the process with
    SIGBUS), is rebuilt, and the process gets a working kernel."""
    xdg = tmp_path / "xdg"
    shutil.copytree(built_kernel, xdg)
    (library,) = (xdg / "kvq").glob("cpu-kernels-*.so")
    marker = tmp_path / "planted-ran"
    if damage == "planted":
        compile_to(library, (PLANTED % marker) + "void attend_packed(void) {}\nvoid attend_full(void) {}\n", tmp_path)
    else:
        library.write_bytes(library.read_bytes()[:4096])
    r = kernel_loads(xdg)
    assert r.returncode == 0 and not marker.exists(), r.stderr
