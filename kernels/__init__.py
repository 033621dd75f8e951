"""Triton kernels: fused RMSNorm (forward and backward) and Float8 training linears.

Each kernel family is one module holding the math in its docstring, the Triton kernels, the autograd
wrapper and the plain-PyTorch reference the tests compare against. On machines without a GPU the
PyTorch path is used unless the Triton interpreter (TRITON_INTERPRET=1) is requested.
"""
