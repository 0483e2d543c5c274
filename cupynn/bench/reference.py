"""The plain array-code network: the float64 oracle and the naive peers.

Written the way a user writes it with NumPy (or CuPy, through ``xp``):
a matrix product, a broadcast bias, an activation, every layer's output
kept for the backward pass. Nothing here is tuned; that is the point.
"""

from __future__ import annotations

__all__ = ["ACTIVATION_NAMES", "forward_loss", "value_and_grad", "relative_error"]

ACTIVATION_NAMES = ("identity", "relu", "tanh", "sigmoid")


def _act(xp, name, z):
    if name == "identity":
        return z
    if name == "relu":
        return xp.maximum(z, 0)
    if name == "tanh":
        return xp.tanh(z)
    if name == "sigmoid":
        return 1 / (1 + xp.exp(-z))
    raise ValueError(f"the plain network knows {ACTIVATION_NAMES}, not {name!r}")


def _act_grad_from_output(xp, name, y):
    """``act'`` from the layer's output, or None for the identity (nothing to multiply)."""
    if name == "identity":
        return None
    if name == "relu":
        return (y > 0).astype(y.dtype)
    if name == "tanh":
        return 1 - y * y
    if name == "sigmoid":
        return y * (1 - y)
    raise ValueError(f"the plain network knows {ACTIVATION_NAMES}, not {name!r}")


def forward_loss(xp, params, activations, x):
    """``sum(net(x)**2)`` as a 0-d array."""
    h = x
    for (W, b), act in zip(params, activations):
        h = _act(xp, act, h @ W.T + b)
    return (h ** 2).sum()


def value_and_grad(xp, params, activations, x):
    """``(loss, [(dW, db), ...])`` by keeping every activation and walking back."""
    hs = [x]
    for (W, b), act in zip(params, activations):
        hs.append(_act(xp, act, hs[-1] @ W.T + b))
    y = hs[-1]
    loss = (y ** 2).sum()
    g = 2 * y
    grads = []
    for i in range(len(params) - 1, -1, -1):
        W, _ = params[i]
        d = _act_grad_from_output(xp, activations[i], hs[i + 1])
        dz = g if d is None else g * d
        grads.append((dz.T @ hs[i], dz.sum(axis=0)))
        if i > 0:
            g = dz @ W
    grads.reverse()
    return loss, grads


def relative_error(xp_result, reference) -> float:
    """Worst ``‖a − r‖ / ‖r‖`` over the loss and every gradient array (NumPy inputs).

    NaN or inf anywhere gives ``inf``.
    """
    import numpy as np

    (loss, grads), (rloss, rgrads) = xp_result, reference
    pairs = [(np.asarray(loss, np.float64).reshape(1), np.asarray(rloss).reshape(1))]
    for (dW, db), (rW, rb) in zip(grads, rgrads):
        pairs.append((np.asarray(dW, np.float64), rW))
        pairs.append((np.asarray(db, np.float64), rb))
    worst = 0.0
    for a, r in pairs:
        if a.shape != r.shape or not np.all(np.isfinite(a)):
            return float("inf")
        scale = np.linalg.norm(r)
        err = np.linalg.norm(a - r) / (scale if scale > 0 else 1.0)
        worst = max(worst, float(err))
    return worst
