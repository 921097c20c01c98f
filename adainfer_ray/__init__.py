"""adainfer-ray: offline classification at scale with early-exit LLMs (AdaInfer) on Ray Data."""

__version__ = "0.1.0"
