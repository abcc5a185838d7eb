"""minicpmv: exact, fast inference and serving for MiniCPM-V 4.6."""

from minicpmv.errors import MiniCPMVError

__all__ = ["LLM", "SamplingParams", "ChatResult", "MiniCPMVError"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """LLM, ChatResult and SamplingParams on first use: `minicpmv --help` and `minicpmv.errors` need no torch."""
    if name in ("LLM", "ChatResult"):
        from minicpmv import llm

        return getattr(llm, name)
    if name == "SamplingParams":
        from minicpmv.engine.sampling import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'minicpmv' has no attribute {name!r}")
