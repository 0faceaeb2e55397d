"""Triton kernels of the NSA ops, one module per op, each exposing a function with the op's name.

They live in this subpackage so that importing a kernel module never rebinds the dispatching
function of the same name in :mod:`fsa_train.kernels`.
"""
