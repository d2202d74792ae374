"""Training VL-Mamba: LLaVA-format data, the two-stage trainer, recipes and evaluation."""
