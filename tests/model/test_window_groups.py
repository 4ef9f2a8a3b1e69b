"""KV groups (kvserve/kv/groups.py): Gemma 3's local layers keep only their window's pages, its
global layers every page, in one pool. Logits equal transformers' at every position of a sequence
several windows long, in one pass and in chunks then decodes, while the pages behind each window
are given back (and poisoned); the pages held stay within what the windows need."""
import pytest
import torch

from kvserve.kv.groups import KVGroups, behind_window
from model.grouped_forward import PAGE, grouped_logits, make_grouped_gemma3, window_bound
from model.test_families import IDS, load, reference_logits
from tiny_models import save_hf_dir


def test_groups_of_gemma3_and_uniform_models():
    gemma3_270m = ([512] * 5 + [None]) * 3
    g = KVGroups.from_windows(gemma3_270m)
    assert g.slots == 3 and g.windows == [512] * 5 + [None] and len(g) == 6
    assert g.layers[-1] == [5, 11, 17]
    # every layer has one (group, slot), and no two layers share one
    assert sorted(zip(g.group_of, g.slot_of)) == sorted({(a, b) for a, b in zip(g.group_of, g.slot_of)})
    assert all(g.layers[gr][s] == layer for layer, (gr, s) in enumerate(zip(g.group_of, g.slot_of)))
    gemma3_1b = ([512] * 5 + [None]) * 4 + [512] * 2  # 22 local, 4 global
    g = KVGroups.from_windows(gemma3_1b)
    assert g.slots == 4 and g.windows == [512] * 6 + [None] and [len(x) for x in g.layers] == [4] * 5 + [2, 4]
    for windows in ([4096] * 4, [None] * 4):  # Mistral, Llama: one group, slots = layers
        g = KVGroups.from_windows(windows)
        assert len(g) == 1 and g.slots == 4 and g.slot_of == [0, 1, 2, 3]
    assert behind_window(9, 8, 4) == range(0) and behind_window(13, 8, 4) == range(1)
    assert behind_window(100, None, 4) == range(0)


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    hf = make_grouped_gemma3()
    model = load(save_hf_dir(hf, tmp_path_factory.mktemp("gemma3-groups")))
    assert KVGroups.from_windows(model.config.layer_windows()).layers == [[0, 1], [3, 4], [5], [2, 6]]
    return hf, model, reference_logits(hf, IDS)


@pytest.mark.parametrize("chunk", [None, [13, 6]], ids=["one-pass", "chunks-then-decodes"])
def test_logits_match_transformers_while_windows_give_pages_back(gemma3, chunk):
    hf, model, ref = gemma3
    held = []
    ours = grouped_logits(model, IDS, PAGE, chunk, held=held)
    assert (ours - ref).abs().max().item() < 1e-4
    groups = KVGroups.from_windows(model.config.layer_windows())
    for kv_len, pages in held:
        assert pages <= window_bound(groups, kv_len, PAGE), (kv_len, pages)
    # 40 tokens: 10 pages for the global group, 2 for each windowed one (the next token, 40, reads
    # keys 33..40: pages 8 and 9, and its own page is not allocated yet)
    assert held[-1] == (len(IDS), 10 + 3 * 2)
