"""The wire form of records: vectors travel packed (base64 float32), and readers take both the
packed form and the JSON lists that earlier versions (and other producers) write."""

from __future__ import annotations

import json

import numpy as np
import pytest

from memento.schemas import (MAX_VECTOR_LENGTH, Case, SchemaError, Transition, decode, encode, pack_vector,
                             unpack_vector)


def _transition(**changes) -> Transition:
    fields = dict(transition_id="r1", user_id="u", state=[0.25, -1.5], case_id="c", case_features=[1.0] * 5,
                  item_id="i", propensity=0.5, reward=1.0, next_state=[0.5, 0.5], done=True, policy_version=3, ts=1.0)
    return Transition(**{**fields, **changes})


def test_vectors_travel_packed_and_come_back_as_float32_values():
    t = _transition(state=[0.1, 1 / 3])
    doc = json.loads(encode(t))
    assert isinstance(doc["state"], str) and isinstance(doc["next_state"], str) and isinstance(doc["case_features"], str)
    back = decode(Transition, encode(t))
    assert back.state == np.float32([0.1, 1 / 3]).astype(float).tolist()    # float32, as every consumer computes
    assert back.case_features == t.case_features and back.next_state == t.next_state
    assert len(encode(_transition(state=[0.123456789] * 32))) < len(json.dumps(_transition(state=[0.123456789] * 32).__dict__))


def test_readers_take_the_json_lists_of_earlier_producers():
    doc = json.loads(encode(Case("c1", [0.5, 0.25], "i1", [1.0, 0.0], 1.0, 0.0)))
    doc["state"], doc["item_vec"] = [0.5, 0.25], [1, 0]
    assert decode(Case, json.dumps(doc)) == Case("c1", [0.5, 0.25], "i1", [1.0, 0.0], 1.0, 0.0)


@pytest.mark.parametrize("packed, why", [
    ("not base64!", "must be a list of numbers or base64 float32"),
    ("AAA=", "must be a list of numbers or base64 float32, got 2 bytes"),
    (pack_vector([1.0, float("inf")]), "must hold finite numbers, got inf"),
    ("A" * (8 * MAX_VECTOR_LENGTH), f"holds more than {MAX_VECTOR_LENGTH} numbers"),
])
def test_a_bad_packed_vector_names_its_field(packed, why):
    doc = json.loads(encode(Case("c1", [0.5], "i1", [1.0], 1.0, 0.0)))
    doc["item_vec"] = packed
    with pytest.raises(SchemaError, match=r"Case: field 'item_vec' ") as err:
        decode(Case, json.dumps(doc))
    assert why in str(err.value)
    with pytest.raises(SchemaError):
        unpack_vector(packed)
