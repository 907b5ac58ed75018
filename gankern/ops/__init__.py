"""One file per op: argument checks, fake kernels, autograd registration, dispatch to a backend."""
