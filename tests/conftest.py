import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(2)
# Without a GPU the Triton kernels run under triton's interpreter, which it reads when first
# imported: set here, before any test module (or find_spec of a triton submodule) imports it
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    from kvserve.model.loader import default_model_path
    return default_model_path()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_path):
    from kvserve.model.tokenizer import Tokenizer
    return Tokenizer.from_gguf(smollm2_path)


@pytest.fixture(scope="session")
def tiny_model():
    """A random 2-layer Llama with SmolLM2's vocabulary, so the real tokenizer drives it."""
    from kvserve.model.llama import LlamaForCausalLM
    from kvserve.model.loader import hf_config
    from tiny_models import make_hf_model
    hf = make_hf_model("llama", vocab_size=49152, max_position_embeddings=2048)
    config = hf.config.to_dict() | {"architectures": ["LlamaForCausalLM"]}
    return LlamaForCausalLM.from_weights(hf_config(config), hf.state_dict())


@pytest.fixture
def make_engine(tiny_model, smollm2_tokenizer):
    from kvserve.config import CacheConfig, EngineConfig, SchedulerConfig
    from kvserve.engine.engine import Engine

    def make(num_pages=256, page_size=16, prefix=True, max_tokens_per_step=512, max_seqs=64, **engine):
        cfg = EngineConfig(cache=CacheConfig(page_size, num_pages, None, prefix),
                           scheduler=SchedulerConfig(max_tokens_per_step, max_seqs), **engine)
        return Engine(cfg, model=tiny_model, tokenizer=smollm2_tokenizer)
    return make
