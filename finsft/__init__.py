"""finsft: fine-tune language models for finance from declarative JSON recipes."""

__version__ = "0.1.0"
