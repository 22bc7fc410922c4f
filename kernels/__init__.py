"""Triton kernels, one op per file, each beside the torch reference it is tested against.

On CUDA they run compiled. On CPU they run only under the Triton interpreter
(`TRITON_INTERPRET=1`, set before the first import of a kernel module), which the tests use.
"""
