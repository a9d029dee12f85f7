"""JAX adapters (Flax linen and NNX, penzai, gemma, flaxmodels) and the code their methods share."""
