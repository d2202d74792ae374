"""Cobra (arXiv 2403.14520): a Mamba-2.8B LM reading DINOv2 + SigLIP patch features; served from its
run directories as distributed (docs/cobra.md)."""

from model.cobra.load import is_cobra_checkpoint, load_cobra

__all__ = ["is_cobra_checkpoint", "load_cobra"]
