import numpy as np
import pytest

from bclib.errors import ChecksumError, DimensionMismatchError, TransformFormatError
from bclib.numerics.closed_form import fit_linear, fit_lowrank, fit_orthogonal
from bclib.numerics.kernel import MultiSpaceKernel
from bclib.numerics.serialization import checksum, transform_from_bytes, transform_to_bytes
from bclib.numerics.transforms import AffineTransform, ResidualMLPTransform, apply_chain, collapse, truncate_or_pad


def _rng(seed=0):
    return np.random.default_rng(seed)


def _affine(d_in, d_out, bias=True, seed=0):
    rng = _rng(seed)
    return AffineTransform(rng.normal(size=(d_in, d_out)) / np.sqrt(d_in),
                           rng.normal(size=d_out) if bias else None)


def _mlp(d_in, d_out, hidden=7, seed=1):
    rng = _rng(seed)
    return ResidualMLPTransform(
        rng.normal(size=(d_in, d_out)) / np.sqrt(d_in), rng.normal(size=d_out),
        rng.normal(size=(d_in, hidden)), rng.normal(size=hidden),
        rng.normal(size=(hidden, d_out)) * 0.1, rng.normal(size=d_out),
    )


@pytest.mark.parametrize("bias", [False, True])
def test_fit_linear_recovers_an_exactly_linear_drift(bias):
    rng = _rng(3)
    x = rng.normal(size=(5000, 48)).astype(np.float32)
    w = rng.normal(size=(48, 40))
    b = rng.normal(size=40) if bias else 0.0
    y = (x.astype(np.float64) @ w + b).astype(np.float32)
    t = fit_linear(x, y, bias=bias)
    pred = t.apply(x.astype(np.float64))
    rel = np.linalg.norm(pred - y) / np.linalg.norm(y)
    assert rel < 1e-4
    assert np.abs(t.weight - w).max() < 1e-3


def test_collapse_equals_applying_links_one_by_one():
    chain = [_affine(10, 8, seed=1), _affine(8, 6, seed=2), _affine(6, 5, bias=False, seed=3)]
    x = _rng(9).normal(size=(50, 10))
    collapsed = collapse(chain)
    assert len(collapsed) == 1 and collapsed[0].kind == "composed"
    np.testing.assert_allclose(collapsed[0].apply(x), apply_chain(chain, x), rtol=1e-10, atol=1e-10)


def test_mixed_chain_keeps_nonlinear_links_in_sequence():
    chain = [_affine(10, 8, seed=1), _affine(8, 8, seed=2), _mlp(8, 6), _affine(6, 4, seed=4)]
    collapsed = collapse(chain)
    assert [type(t).__name__ for t in collapsed] == ["AffineTransform", "ResidualMLPTransform", "AffineTransform"]
    x = _rng(2).normal(size=(30, 10))
    np.testing.assert_allclose(apply_chain(collapsed, x), apply_chain(chain, x), rtol=1e-9, atol=1e-9)


def test_chain_dimension_mismatch_is_named():
    with pytest.raises(DimensionMismatchError, match="link 0 outputs dimension 8 but link 1 expects 7"):
        collapse([_affine(10, 8), _affine(7, 3)])
    with pytest.raises(DimensionMismatchError, match=r"expects input of shape \(rows, 10\), found \(3, 9\)"):
        _affine(10, 8).apply(np.zeros((3, 9)))


@pytest.mark.parametrize("nonlinear", [False, True])
def test_multi_space_kernel_matches_each_chain(nonlinear):
    b4 = _affine(16, 14, seed=4)
    b3 = _mlp(14, 12) if nonlinear else _affine(14, 12, seed=3)
    b2 = _affine(12, 10, seed=2)
    b1 = _affine(10, 8, bias=False, seed=1)
    chains = {3: [b4], 2: [b4, b3], 1: [b4, b3, b2], 0: [b4, b3, b2, b1]}
    kernel = MultiSpaceKernel(16, chains)
    assert kernel.fused is (not nonlinear)
    x = _rng(5).normal(size=(64, 16)).astype(np.float32)
    out = kernel(x)
    assert sorted(out) == [0, 1, 2, 3]
    for space, chain in chains.items():
        assert out[space].dtype == np.float32 and out[space].flags["C_CONTIGUOUS"]
        np.testing.assert_allclose(out[space], apply_chain(chain, x.astype(np.float64)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("make", [lambda: _affine(6, 4), lambda: _affine(6, 4, bias=False), lambda: _mlp(6, 4)])
def test_bytes_round_trip(make):
    t = make()
    data = transform_to_bytes(t)
    assert data == transform_to_bytes(t)  # deterministic bytes -> stable checksums
    back = transform_from_bytes(data, checksum(data))
    assert type(back) is type(t) and (back.dim_in, back.dim_out) == (6, 4)
    for name, arr in t.arrays().items():
        np.testing.assert_array_equal(back.arrays()[name], arr)


def test_tampered_bytes_and_wrong_checksum_are_rejected():
    data = transform_to_bytes(_affine(6, 4))
    tampered = bytearray(data)
    tampered[len(tampered) // 2] ^= 0xFF
    with pytest.raises(ChecksumError, match="altered or truncated"):
        transform_from_bytes(bytes(tampered), checksum(data))
    with pytest.raises(ChecksumError, match=r"expected 0000000000000000…; the stored parameters were altered"):
        transform_from_bytes(data, "0" * 64)
    with pytest.raises(TransformFormatError, match="not a valid npz"):
        transform_from_bytes(b"definitely not npz")


def test_pickled_payload_is_refused():
    import io
    import pickle
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        arr = io.BytesIO()
        np.lib.format.write_array(arr, np.array([object()], dtype=object), allow_pickle=True)
        zf.writestr("weight.npy", arr.getvalue())
        zf.writestr("__header__.npy", pickle.dumps("x"))
    with pytest.raises(TransformFormatError, match=r"not a valid npz archive: .*allow_pickle=False"):
        transform_from_bytes(buf.getvalue())


def test_truncate_or_pad():
    x = np.arange(6.0).reshape(2, 3)
    assert truncate_or_pad(x, 2).tolist() == [[0, 1], [3, 4]]
    assert truncate_or_pad(x, 4).tolist() == [[0, 1, 2, 0], [3, 4, 5, 0]]
