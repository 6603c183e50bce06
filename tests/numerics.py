"""
How far two computations of one function may differ and still be the same function.

Two float32 computations of one function through different kernels (transformers' GPT-2 and ours, another CPU's
matmul, another order of summation) differ by roundings, and a rounding is relative: eps * |x|. So a bound is a
number of roundings times eps times the values' magnitude (the largest |x| of the tensor: outputs pass through sums of
terms of that size), never "the largest difference seen on one machine". The number of roundings is a judgement of the
computation's depth, kept well above what is measured (0 to 2 for the tests here, on several kernel paths).
Where two implementations are compared, they are compared in float64 too: there the kernels differ by ~1e-16 and
any larger difference is the conversion's own.
"""

import torch

# roundings a tiny test model's outputs may differ by between two kernels: 2 layers, sums of at most 128 terms
ROUNDINGS = 64


def rounding_bound(reference, roundings=ROUNDINGS):
    """ roundings * eps * max|reference|, in the reference's own dtype """
    return roundings * torch.finfo(reference.dtype).eps * max(reference.abs().max().item(), 1e-30)


def assert_same_function(actual, expected, roundings=ROUNDINGS):
    """ |actual - expected| within `roundings` roundings of expected's dtype at its magnitude """
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    diff, bound = (actual - expected).abs().max().item(), rounding_bound(expected, roundings)
    assert diff <= bound, (f'max |difference| {diff:.2e} exceeds {roundings} {expected.dtype} roundings at '
                           f'max |x| {expected.abs().max().item():.2e} ({bound:.2e})')
    return diff


def in_float64(*models):
    """ the models, converted in place to float64 (every parameter and buffer) and put in eval mode, returned as a
    list (a conversion check, not the user's dtype) """
    return [m.double().eval() for m in models]
