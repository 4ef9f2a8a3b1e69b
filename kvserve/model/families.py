"""Which decoder class runs which architecture (ModelConfig.architecture)."""
from kvserve.config import ModelConfig


def model_class(cfg: ModelConfig):
    """A class with from_weights(cfg, weights, dtype, device), forward and compute_logits."""
    if cfg.architecture in ("gemma2", "gemma3"):
        from kvserve.model.gemma import GemmaForCausalLM
        return GemmaForCausalLM
    from kvserve.model.llama import LlamaForCausalLM
    return LlamaForCausalLM
