"""TritonAttention as the backend of every KV group (on the CPU under TRITON_INTERPRET=1): a tiny
Gemma 3's logits equal transformers' while its local groups give back (and poison) the pages
behind their window, through chunked prefill and decodes."""

import pytest
import torch

pytest.importorskip("triton")

from kvserve.attention.triton import TritonAttention  # noqa: E402
from kvserve.attention.triton.config import Tiles  # noqa: E402
from model.grouped_forward import PAGE, grouped_logits, make_grouped_gemma3  # noqa: E402
from model.test_families import IDS, load, reference_logits  # noqa: E402
from tiny_models import save_hf_dir  # noqa: E402


def test_triton_groups_match_transformers(tmp_path):
    hf = make_grouped_gemma3()
    model = load(save_hf_dir(hf, tmp_path))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ids = IDS[:24]  # 3 windows; chunks of 13 and 6, then 5 decodes
    tiles = dict(tiles=Tiles(decode_block_n=16, prefill_block_m=16, prefill_block_n=16))
    ours = grouped_logits(model.to(device), ids, PAGE, [13, 6], TritonAttention, tiles)
    assert (ours.cpu() - reference_logits(hf, ids)).abs().max().item() < 1e-4
