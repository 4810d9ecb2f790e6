"""Triton kernels (one module per op, named like its wrapper in detailflow_engine/ops/).

Importing this package does not import triton; the kernel modules do, and the wrappers import
them lazily, only when their "triton" backend is picked (CUDA tensors and triton importable).
Tests run the kernels on CPU tensors under the interpreter (TRITON_INTERPRET=1 set before
triton is first imported).
"""
