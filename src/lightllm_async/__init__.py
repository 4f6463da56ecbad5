"""lightllm-async: an LLM inference server over shared-memory IPC."""

__version__ = "0.1.0"
