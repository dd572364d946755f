"""The demo's measure of how much the LUM's query conditions change a user's answer (``condition_agreement``)."""

import numpy as np
import pytest

from deploy.demo import condition_agreement
from schemas.events import ConditionOutput, LumFeatures

T = 1_767_225_600_000  # 2026-01-01


def _features(user: int, vectors: list[list[float]]) -> LumFeatures:
    return LumFeatures(user_id=user, model_version="m", computed_at_ms=T, as_of_ms=T,
                       conditions=[ConditionOutput(condition=f"scenario=s{k}", vector=v) for k, v in enumerate(vectors)])


def test_identical_answers_agree_fully_and_orthogonal_ones_not_at_all():
    same = _features(1, [[1.0, 2.0, 0.0], [2.0, 4.0, 0.0], [0.5, 1.0, 0.0]])  # one direction, any length
    orth = _features(2, [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    assert condition_agreement([same]) == pytest.approx(1.0)
    assert condition_agreement([orth]) == pytest.approx(0.0)
    assert condition_agreement([same, orth]) == pytest.approx(0.5)  # mean over users


def test_pairwise_mean_of_one_user():
    v = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]  # cosines: 0, 1/sqrt2, 1/sqrt2
    assert condition_agreement([_features(1, v)]) == pytest.approx(np.sqrt(2) / 3)


def test_users_with_fewer_than_two_answers_do_not_count():
    assert condition_agreement([_features(1, [[1.0, 0.0]])]) is None
    assert condition_agreement([_features(1, [[1.0, 0.0]]), _features(2, [[1.0, 0.0], [-1.0, 0.0]])]) == \
        pytest.approx(-1.0)
