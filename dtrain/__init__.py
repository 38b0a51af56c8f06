"""dtrain: one Accelerate training script for Hugging Face causal LMs, for every launch profile."""

__version__ = "0.1.0"
