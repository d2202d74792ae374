"""Synthetic datasets used to train and check the vision-language model (e.g. Shapes-VQA)."""
