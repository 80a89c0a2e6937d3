"""
gguf_tools.py — llama.cpp, built once per machine, for tests/test_gguf.py (and for you: the commands below).

    python tests/gguf_tools.py          # build it, or find it built; prints where the converter and tools are

What a user does to run nanoforge's weights in llama.cpp is: export a Hugging Face folder (export.py), convert it
with llama.cpp's own convert_hf_to_gguf.py, load the .gguf. The test does exactly that, so it needs llama.cpp's
converter and a llama.cpp binary of the same version. Both come from one package the registries serve: the
llama-cpp-python source distribution on PyPI vendors llama.cpp whole (vendor/llama.cpp, with
convert_hf_to_gguf.py and its gguf-py), and its Python files are the ctypes bindings for that very libllama.

    pip download --no-deps --no-binary :all: llama-cpp-python==VERSION   -> the sdist, unpacked into HOME/src
    cmake vendor/llama.cpp  -> HOME/build/bin: libllama.so (+ libggml*.so), read through the bindings
                                              llama-server, whose /apply-template renders a chat template
                                              with llama.cpp's own Jinja engine (what llama-cli --jinja,
                                              Ollama-style front ends and LM Studio's llama.cpp runtime use)

HOME is ~/.cache/nanoforge/llama.cpp-VERSION (or $NANOFORGE_LLAMA_CPP): outside the repository, one build per
machine, reused by every test run; a finished build leaves HOME/built.json, so a second call costs nothing. CPU
only and GGML_NATIVE off (one x86-64 build works on any machine of the kind); no web UI, no network at build time.
The converter's own Python needs (numpy, torch, transformers, sentencepiece; gguf-py comes with the sources) are
in requirements.txt. This is a test helper, not a chapter of the tutorial: a user with llama.cpp installed runs
its converter and tools directly (README, "GGUF").
"""
import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request

VERSION = "0.3.36"  # llama-cpp-python; its vendor/llama.cpp is the llama.cpp we convert and run with
SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"   # of its sdist, as PyPI serves it
HOME = os.environ.get("NANOFORGE_LLAMA_CPP") or os.path.expanduser(f"~/.cache/nanoforge/llama.cpp-{VERSION}")
SRC = os.path.join(HOME, "src")                       # the unpacked sdist (the Python bindings live here)
LLAMA = os.path.join(SRC, "vendor", "llama.cpp")      # llama.cpp's own tree
BUILD = os.path.join(HOME, "build")
BIN = os.path.join(BUILD, "bin")
CONVERTER = os.path.join(LLAMA, "convert_hf_to_gguf.py")
SERVER = os.path.join(BIN, "llama-server")
MARK = os.path.join(HOME, "built.json")
TARGETS = ["llama", "llama-server"]
CMAKE_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DGGML_NATIVE=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=ON",
               "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_UI=OFF",
               "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_OPENSSL=OFF"]   # the last three: nothing fetched, no TLS
JOBS = "2"


def built():
    return os.path.exists(MARK)


def run(cmd, **kw):
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)


def unpack_sdist():
    """pip fetches the pinned sdist, its hash is checked, and it is unpacked into SRC (tarfile's 'data' filter: no
    links out of the folder, no devices)."""
    download = os.path.join(HOME, "download")
    run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "-d", download,
         f"llama-cpp-python=={VERSION}"])
    archive = os.path.join(download, f"llama_cpp_python-{VERSION}.tar.gz")
    with open(archive, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != SHA256:
        sys.exit(f"error: {archive} has sha256 {digest}, expected {SHA256}: not the pinned release")
    shutil.rmtree(SRC, ignore_errors=True)
    with tarfile.open(archive) as tar:
        tar.extractall(HOME, filter="data")
    os.replace(os.path.join(HOME, f"llama_cpp_python-{VERSION}"), SRC)


def build():
    """Build llama.cpp into HOME unless it is there; returns HOME. Each step is resumable: a build cut short
    (Ctrl-C, a full disk) is finished by the next call, and only a complete one writes built.json."""
    if built():
        return HOME
    if not shutil.which("cmake") or not (shutil.which("c++") or shutil.which("g++")):
        sys.exit("error: building llama.cpp needs cmake and a C++ compiler (apt-get install cmake g++)")
    os.makedirs(HOME, exist_ok=True)
    t0 = time.time()
    if not os.path.exists(CONVERTER):
        unpack_sdist()
    run(["cmake", "-S", LLAMA, "-B", BUILD, *CMAKE_FLAGS], stdout=subprocess.DEVNULL)
    run(["cmake", "--build", BUILD, "--target", *TARGETS, "-j", JOBS], stdout=subprocess.DEVNULL)
    with open(MARK, "w") as f:
        json.dump({"llama-cpp-python": VERSION, "flags": CMAKE_FLAGS, "targets": TARGETS,
                   "seconds": round(time.time() - t0)}, f)
    print(f"built llama.cpp (llama-cpp-python {VERSION}) in {time.time() - t0:.0f} s")
    return HOME


# ---- using it ---------------------------------------------------------------------------------------------------
def bindings():
    """The llama_cpp module of the same sdist, loading the libllama.so built above (not a wheel's own copy)."""
    os.environ["LLAMA_CPP_LIB_PATH"] = BIN
    if SRC not in sys.path:
        sys.path.insert(0, SRC)
    import llama_cpp
    return llama_cpp


@contextlib.contextmanager
def llama(path, n_ctx=0):
    """A .gguf loaded by llama.cpp through the bindings: CPU, one thread, logits at every position; n_ctx 0 is
    the model's own context. Closed on exit (the bindings' own finaliser complains at interpreter shutdown)."""
    llm = bindings().Llama(model_path=path, n_ctx=n_ctx, n_threads=1, logits_all=True, verbose=False)
    try:
        yield llm
    finally:
        llm.close()


def compare(model, llm, id_lists):
    """Next-token distributions of a nanoforge model and a llama.cpp model on the same token ids, at every
    position: {"kl": mean KL(ours || llama.cpp) in nats, "kl_max", "top1": positions where the argmax agrees,
    "positions", "logit_diff": the largest |logit difference|, "entropy": our mean entropy in nats}."""
    import numpy as np
    import torch
    kls, ents, top1, diff = [], [], 0, 0.0
    for ids in id_lists:
        with torch.no_grad():
            ours = model(torch.tensor([ids]))[0][0].double()
        llm.reset()
        llm.eval(ids)
        theirs = torch.from_numpy(np.asarray(llm.scores[:len(ids)], dtype=np.float64))
        diff = max(diff, (ours - theirs).abs().max().item())
        lp, lq = torch.log_softmax(ours, -1), torch.log_softmax(theirs, -1)
        kls.append((lp.exp() * (lp - lq)).sum(-1))
        ents.append(-(lp.exp() * lp).sum(-1))
        top1 += (lp.argmax(-1) == lq.argmax(-1)).sum().item()
    kl, ent = torch.cat(kls), torch.cat(ents)
    return {"kl": kl.mean().item(), "kl_max": kl.max().item(), "top1": top1, "positions": len(kl),
            "logit_diff": diff, "entropy": ent.mean().item()}


def gguf_py():
    """gguf-py, the converter's own library (GGUF reader and writer), from the same sources."""
    path = os.path.join(LLAMA, "gguf-py")
    if path not in sys.path:
        sys.path.insert(0, path)
    import gguf
    return gguf


def convert(hf_dir, outfile, outtype):
    """llama.cpp's converter, as a user runs it: a Hugging Face folder -> one .gguf (f32, f16, bf16, q8_0)."""
    proc = subprocess.run([sys.executable, CONVERTER, hf_dir, "--outfile", outfile, "--outtype", outtype],
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"convert_hf_to_gguf.py failed on {hf_dir}:\n{proc.stderr[-3000:]}")
    return proc.stderr   # the converter logs to stderr: what it recognised (pre-tokenizer, template, ...)


class Server:
    """llama-server on a free loopback port, for what only llama.cpp's C++ side does (its Jinja chat templates)."""

    def __init__(self, gguf):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen([SERVER, "-m", gguf, "--host", "127.0.0.1", "--port", str(self.port),
                                      "--jinja", "-t", "1", "-c", "256", "--no-webui"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited: {self.proc.stderr.read()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        self.close()
        raise RuntimeError("llama-server did not come up within 60 s")

    def post(self, path, body):
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.load(r)

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


if __name__ == "__main__":
    build()
    print(f"llama.cpp (llama-cpp-python {VERSION}) in {HOME}\n  converter  {CONVERTER}\n  libllama   {BIN}\n"
          f"  server     {SERVER}")
