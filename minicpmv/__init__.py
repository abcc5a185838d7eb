"""minicpmv: exact, fast inference and serving for MiniCPM-V 4.6."""

from minicpmv.engine.sampling import SamplingParams
from minicpmv.errors import MiniCPMVError
from minicpmv.llm import LLM, ChatResult

__all__ = ["LLM", "SamplingParams", "ChatResult", "MiniCPMVError"]
__version__ = "0.1.0"
