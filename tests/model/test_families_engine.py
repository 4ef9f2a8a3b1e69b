"""Every family of tests/model/test_families.py through the whole engine on each device there is: the
model loaded from its directory, so the engine picks the device's executor and attention (on CUDA:
Triton kernels and CUDA-graph decode steps over KV groups; on the CPU: PyTorch ops). Prompt
logprobs, chunked over scattered pages and longer than the window, against transformers' logits;
each greedy token against transformers' logits on the sequence made."""
import pytest
import torch

from kvserve.config import CacheConfig, EngineConfig, SchedulerConfig
from kvserve.engine.engine import Engine
from kvserve.engine.request import SamplingParams
from kvserve.model.random_weights import token_tokenizer
from model.test_families import IDS, VARIANTS, tiny
from tiny_models import save_hf_dir

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# float32 everywhere; Triton's dots take TF32 on a GPU
TOLERANCE = {"cpu": 1e-4, "cuda": 2e-2}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    cache = {}

    def get(variant):
        if variant not in cache:
            hf = tiny(variant)
            cache[variant] = hf, save_hf_dir(hf, tmp_path_factory.mktemp(variant))
        return cache[variant]
    return get


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_engine_matches_transformers(saved, variant, device):
    hf, path = saved(variant)
    engine = Engine(EngineConfig(model=str(path), dtype="float32", device=device,
                                 cache=CacheConfig(page_size=4, num_pages=64),
                                 scheduler=SchedulerConfig(max_num_batched_tokens=16)),
                    tokenizer=token_tokenizer(hf.config.vocab_size))
    engine.add_request(IDS, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, prompt_logprobs=0))
    out = None
    while engine.has_unfinished():
        out = next((o for o in engine.step() if o.finished), out)
    made = out.outputs[0].token_ids
    with torch.no_grad():
        expected = hf(torch.tensor([IDS + made])).logits[0].float().log_softmax(-1)
    tol = TOLERANCE[device]
    got = torch.tensor([lp.logprob for lp in out.prompt_logprobs[1:]])
    torch.testing.assert_close(got, expected[torch.arange(len(IDS) - 1), IDS[1:]], atol=tol, rtol=0)
    rows = expected[torch.arange(len(IDS) - 1, len(IDS) + len(made) - 1)]
    chosen = rows[torch.arange(len(made)), made]
    assert (chosen >= rows.max(-1).values - tol).all(), "a greedy token that is not transformers' best"
