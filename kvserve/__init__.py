"""kvserve: an LLM inference and serving engine on PyTorch."""
