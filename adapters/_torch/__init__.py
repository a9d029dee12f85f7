"""PyTorch adapters (plain modules, transformers, timm, TransformerLens, nnsight) and the code their methods share."""
