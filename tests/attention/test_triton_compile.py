"""The Triton kernels (attention, MoE, fused pointwise) compiled for a Hopper GPU on the CPU (triton ships
ptxas): bfloat16 and the compiled code paths, which the interpreter in test_triton.py cannot check."""
import importlib.util
import os
import subprocess
import sys

import pytest

if importlib.util.find_spec("triton") is None or importlib.util.find_spec("triton.backends.nvidia") is None:
    pytest.skip("triton with its CUDA backend is not installed", allow_module_level=True)


def test_kernels_compile_for_sm90_in_bf16():
    env = os.environ | {"TRITON_INTERPRET": "0", "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-m", "kvserve.attention.triton.compile_check", "--arch", "90",
                          "--dtypes", "bf16", "--head-dims", "128"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("ok ") == 20, out.stdout
