"""Class activation maps from activations and gradients: pure numpy math, post-processing, and the API."""
