"""moetune.kernels: the torch reference ops (reference.py) and, per backend, the kernels that implement them."""
