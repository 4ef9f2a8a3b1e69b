"""kvserve: an LLM inference and serving engine on PyTorch."""

__all__ = ["LLM", "SamplingParams", "RequestOutput"]


def __getattr__(name):  # lazy, so `import kvserve.model...` does not pull in the engine
    if name == "LLM":
        from kvserve.llm import LLM
        return LLM
    if name in ("SamplingParams", "RequestOutput"):
        from kvserve.engine import request
        return getattr(request, name)
    raise AttributeError(name)
