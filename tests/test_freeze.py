"""`optim.freeze`: the named parameters keep their initial values through training updates
(weight decay and momentum included); the others move as without it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from train import train as tr
from train.config import ConfigError, load_config


def _params():
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    return {
        "block": {
            "rotation_conv": {
                "kernel": jax.random.normal(k[0], (3, 3, 4, 18)),
                "bias": jnp.ones(18),
            },
            "inner_conv": {"kernel": jax.random.normal(k[1], (4, 4, 4))},
        },
        "head": {"kernel": jax.random.normal(k[2], (4, 10))},
    }


def _train(freeze, steps=3):
    optim = load_config("digits_deformed").optim
    optim.freeze = freeze
    tx = tr.create_optimizer(optim, lambda step: 0.1)
    params = _params()
    state = tx.init(params)
    for s in range(steps):
        grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5 + s), params)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params


def test_frozen_parameters_keep_their_values():
    start, frozen, free = _params(), _train(("rotation_conv",)), _train(())
    for name in ("kernel", "bias"):
        np.testing.assert_array_equal(
            frozen["block"]["rotation_conv"][name], start["block"]["rotation_conv"][name]
        )
        assert not np.allclose(
            free["block"]["rotation_conv"][name], start["block"]["rotation_conv"][name]
        )
    # The others get exactly the updates they get without freezing.
    np.testing.assert_array_equal(frozen["head"]["kernel"], free["head"]["kernel"])
    np.testing.assert_array_equal(
        frozen["block"]["inner_conv"]["kernel"], free["block"]["inner_conv"]["kernel"]
    )


def test_frozen_mask_matches_path_components_only():
    mask = tr.frozen_mask(_params(), ("rotation_conv",))
    assert mask["block"]["rotation_conv"] == {"kernel": True, "bias": True}
    assert mask["block"]["inner_conv"]["kernel"] is False and mask["head"]["kernel"] is False
    assert not any(jax.tree.leaves(tr.frozen_mask(_params(), ("rotation",))))  # no substring match


def test_bad_freeze_is_rejected():
    config = load_config("digits_deformed")
    config.optim.freeze = "rotation_conv"
    with pytest.raises(ConfigError, match="optim.freeze"):
        tr.check_config(config)
