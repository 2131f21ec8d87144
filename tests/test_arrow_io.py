import numpy as np
import pyarrow as pa
import pytest

from bclib.errors import InvalidVectorError
from bclib.numerics.arrow import list_to_matrix, matrix_to_list


def _lists(rows):
    return pa.array(rows, type=pa.list_(pa.float32()))


def _values_buffer(arr: pa.ListArray) -> np.ndarray:
    """The list array's whole float32 values buffer, as numpy, without copying."""
    return np.frombuffer(arr.values.buffers()[1], dtype=np.float32)


def test_round_trip_is_exact_and_zero_copy():
    m = np.arange(12, dtype=np.float32).reshape(4, 3)
    arr = matrix_to_list(m)
    assert arr.type == pa.list_(pa.float32())
    assert np.asarray(arr.offsets).dtype == np.int32
    # numpy -> Arrow: the values buffer is the matrix's own memory
    assert np.shares_memory(m, _values_buffer(arr))
    back = list_to_matrix(arr, 3)
    np.testing.assert_array_equal(back, m)
    # Arrow -> numpy: the matrix views Arrow's buffer (a copy would not share memory with it)
    assert np.shares_memory(back, _values_buffer(arr))
    assert not np.shares_memory(back.copy(), _values_buffer(arr))


def test_double_values_are_converted_not_viewed():
    arr = pa.array([[1.5, 2.5]], type=pa.list_(pa.float64()))
    out = list_to_matrix(arr, 2)
    assert out.dtype == np.float32
    assert not np.shares_memory(out, np.frombuffer(arr.values.buffers()[1], dtype=np.float64))


def test_sliced_array_uses_the_slice_not_the_whole_buffer():
    whole = matrix_to_list(np.arange(20, dtype=np.float32).reshape(5, 4))
    arr = whole.slice(2, 2)
    got = list_to_matrix(arr, 4)
    np.testing.assert_array_equal(got, [[8, 9, 10, 11], [12, 13, 14, 15]])
    assert np.shares_memory(got, _values_buffer(whole))  # still a view, of the slice's rows only


def test_ragged_rows_with_the_right_total_length_are_caught():
    # 3 + 5 + 4 = 12 = 3 rows x 4: a total-length check alone would pass
    arr = _lists([[1, 2, 3], [1, 2, 3, 4, 5], [1, 2, 3, 4]])
    ids = pa.array([10, 11, 12])
    with pytest.raises(InvalidVectorError, match=r"id=10 has 3 elements, expected dimension 4 \(2 rows affected\)"):
        list_to_matrix(arr, 4, ids)


def test_inferred_dimension_still_checks_every_row():
    with pytest.raises(InvalidVectorError, match=r"id='b' has 2 elements, expected dimension 3"):
        list_to_matrix(_lists([[1, 2, 3], [1, 2]]), None, pa.array(["a", "b"]))


def test_null_vector_null_element_and_nan_name_the_id():
    ids = pa.array([7, 8])
    with pytest.raises(InvalidVectorError, match="id=8 has a null vector"):
        list_to_matrix(_lists([[1.0, 2.0], None]), 2, ids)
    with pytest.raises(InvalidVectorError, match="id=8 has a null element"):
        list_to_matrix(_lists([[1.0, 2.0], [None, 2.0]]), 2, ids)
    with pytest.raises(InvalidVectorError, match="id=7 holds NaN or Inf"):
        list_to_matrix(_lists([[np.inf, 2.0], [1.0, 2.0]]), 2, ids)


def test_double_values_are_cast_to_float32():
    arr = pa.array([[1.5, 2.5]], type=pa.list_(pa.float64()))
    out = list_to_matrix(arr, 2)
    assert out.dtype == np.float32 and out.tolist() == [[1.5, 2.5]]


def test_empty_matrix():
    arr = matrix_to_list(np.zeros((0, 5), dtype=np.float32))
    assert len(arr) == 0
    assert list_to_matrix(arr, 5).shape == (0, 5)
