"""
bench/serve.py — what one user of serve.py waits for: the first token, then the tokens per second, of one stream.

    python bench/serve.py --ckpt out/tiny --device cpu
    python bench/serve.py --preset config/gpt2_124m.py --device cuda     # random weights of that shape: no training

It starts `python serve.py <checkpoint>` as a user would (a subprocess on 127.0.0.1, a free port), sends one
warm-up and then --requests streaming /v1/completions requests one after another through the official `openai`
client, each made to generate exactly --max_tokens tokens (min_tokens: an early end token would shorten it), and
reports the medians over the requests of
  first token  from sending the request to the first piece of text: HTTP, the queue, the prefill, one decode
               step and the server-sent event, all that a user waits before the answer starts;
  tokens/s     (tokens - 1) / (last piece's time - first piece's time): the rate the answer then streams at.
One stream at a time: serve.py queues requests (see its top), so this is also its throughput.
Writes bench/results/serve_<device>.{md,json} with the device, date and commit.
"""
import argparse
import datetime
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.common import commit, write_results  # noqa: E402
from configurator import read_config_file  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

PROMPT = ("The history of science is the study of how people came to understand the natural world, from the first "
          "records of the stars and seasons to the experiments, instruments and theories of today. ")  # ~40 gpt2 tokens


def random_checkpoint(preset, folder):
    """A checkpoint of the preset's architecture with freshly initialised weights: what it costs to serve does not
    depend on what the weights say, and no training is needed."""
    cfg = read_config_file(preset)
    cfg.setdefault("tokenizer", "gpt2")
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_dict(cfg))
    config = {**cfg, "vocab_pad_multiple": model.config.vocab_pad_multiple}
    torch.save({"model": model.state_dict(), "config": config, "step": 0}, os.path.join(folder, "ckpt.pt"))
    return folder, model.num_params(), model.config.block_size


def start_server(ckpt, device, dtype, log):
    """serve.py in a subprocess on a free port; returns (process, base URL) once it answers /v1/models."""
    import httpx
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), ckpt, "--format", "none", "--port",
                             str(port), "--device", device, "--dtype", dtype], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT)
    url, deadline = f"http://127.0.0.1:{port}", time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"serve.py exited with {proc.returncode}; see {log.name}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"serve.py did not answer within 300 s; see {log.name}")


def one_stream(client, max_tokens):
    """(seconds to the first piece of text, decode tokens/s after it, tokens) of one streamed completion."""
    t0, times, tokens = time.perf_counter(), [], None
    for chunk in client.completions.create(model="bench", prompt=PROMPT, max_tokens=max_tokens, temperature=0,
                                           stream=True, stream_options={"include_usage": True},
                                           extra_body={"min_tokens": max_tokens}):
        if chunk.choices and chunk.choices[0].text:
            times.append(time.perf_counter())
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return times[0] - t0, (tokens - 1) / (times[-1] - times[0]), tokens


def device_name(device):
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({os.cpu_count()} cores)"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="a run folder, .pt file or hf:<folder> to serve")
    p.add_argument("--preset", help="instead: random weights of this preset's shape (config/gpt2_124m.py)")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--dtype", default="auto", help="serve.py's --dtype (auto: bfloat16 on a GPU that has it)")
    p.add_argument("--requests", type=int, default=5, help="timed requests (after one warm-up)")
    p.add_argument("--max_tokens", type=int, default=256, help="tokens per answer (cut to what the context holds)")
    args = p.parse_args(argv)
    if bool(args.ckpt) == bool(args.preset):
        p.error("give one of --ckpt or --preset")
    from openai import OpenAI
    with tempfile.TemporaryDirectory() as work, open(os.path.join(work, "serve.log"), "w+") as log:
        if args.preset:
            ckpt, params, block = random_checkpoint(args.preset, work)
            name = f"{os.path.splitext(os.path.basename(args.preset))[0]} (random init)"
        else:
            ckpt, name, params, block = args.ckpt, os.path.basename(os.path.normpath(args.ckpt)), None, None
        proc, url = start_server(ckpt, args.device, args.dtype, log)
        try:
            client = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
            info = client.models.list().data[0]
            block = info.context_length
            max_tokens = min(args.max_tokens, block - 64)   # the prompt is ~40 tokens with any tokenizer here
            one_stream(client, max_tokens)                  # warm-up: first CUDA kernels, allocator, threads
            runs = [one_stream(client, max_tokens) for _ in range(args.requests)]
        except Exception:
            log.seek(0)
            print(log.read()[-3000:], file=sys.stderr)
            raise
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    first = statistics.median(r[0] for r in runs) * 1e3
    rate = statistics.median(r[1] for r in runs)
    stamp = {"device": device_name(args.device), "date": datetime.date.today().isoformat(), "commit": commit(),
             "torch": torch.__version__}
    header = ["checkpoint", "parameters", "device", "dtype", "context", "new tokens", "first token ms (median)",
              "tokens/s (median)", "requests"]
    rows = [[name, f"{params / 1e6:.1f}M" if params else "-", args.device, args.dtype, block, runs[0][2],
             round(first, 1), round(rate, 1), args.requests]]
    notes = (f"One stream at a time through serve.py (`python bench/serve.py {' '.join(argv or sys.argv[1:])}`): "
             f"first token = request sent -> first text piece received; tokens/s = (tokens - 1) / (last piece - "
             f"first piece). Each run: {[f'{r[0] * 1e3:.1f} ms, {r[1]:.1f} tok/s' for r in runs]}.")
    tag = "cpu" if args.device == "cpu" else device_name(args.device).replace("NVIDIA ", "").split()[0].lower()
    write_results(f"serve_{tag}", header, rows, notes, stamp=stamp)


if __name__ == "__main__":
    main()
