"""Fuzzing the OCI error bodies of failed registry answers: any body gives a RegistryError
carrying whatever error codes it holds, and nothing else escapes."""

from __future__ import annotations

import gc
import json
import warnings
from typing import Any

import httpx
import trio
from hypothesis import given
from hypothesis import strategies as st

from registry._http import MAX_ERROR_BODY, error_from_response
from registry.errors import RegistryError
from tests.fuzzing import fuzz_settings

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8))
error_items = st.one_of(
    st.fixed_dictionaries({}, optional={"code": scalars, "message": scalars, "detail": scalars}),
    scalars,
)
documents = st.one_of(
    st.fixed_dictionaries({}, optional={"errors": st.one_of(st.lists(error_items, max_size=3),
                                                            scalars)}),
    scalars,
)  # fmt: skip


def encode(document: Any) -> bytes:
    return json.dumps(document, allow_nan=True).encode()


bodies = st.one_of(
    documents.map(encode),
    st.binary(max_size=60),
    st.integers(1, MAX_ERROR_BODY // 2).map(lambda depth: b"[" * depth + b"]" * depth),
)


def answer(status: int, body: bytes) -> RegistryError:
    response = httpx.Response(
        status, content=body, request=httpx.Request("GET", "https://r.example/v2/x/manifests/y")
    )
    return trio.run(error_from_response, response, "fetching y")


def test_deeply_nested_error_body_is_still_a_registry_error() -> None:
    # Found by fuzzing: a 404 body nested past the recursion limit escaped as RecursionError.
    error = answer(404, b"[" * 5000 + b"]" * 5000)
    assert error.status == 404 and not error.details


@fuzz_settings(300)
@given(status=st.sampled_from([400, 401, 403, 404, 416, 429, 500, 503, 418]), body=bodies)
def test_error_bodies_only_give_registry_errors(status: int, body: bytes) -> None:
    error = answer(status, body)
    assert isinstance(error, RegistryError) and error.status == status
    assert all(isinstance(d.code, str) and isinstance(d.message, str) for d in error.details)


def test_reading_the_start_of_a_long_error_body_closes_the_stream() -> None:
    # Found by fuzzing: stopping at MAX_ERROR_BODY left httpx's byte iterator to the garbage
    # collector, which warns (ResourceWarning) instead of closing it.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        answer(404, b"x" * (2 * MAX_ERROR_BODY))
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]
