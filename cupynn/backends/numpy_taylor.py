"""The elementwise step of the forward Laplacian and its reverse, in NumPy.

A dense layer carries the stack ``S = [h; J_1 .. J_d; second-order blocks]``: an array
``(nb, B, N)``, block-major. After the GEMM ``Z = S @ W.T`` (no bias), with
``zh = Z[0] + b`` and ``p, q, r = f', f'', f'''`` evaluated from ``y = f(zh)`` or ``zh``
(:meth:`cupynn.activations.Activation.higher_derivatives`):

* ``h' = f(zh)``, ``J'_i = p Z_i`` (``i = 1 .. d``), and the second-order blocks
* ``second="none"``: none (``nb = 1 + d``);
* ``second="laplacian"``: ``L' = p Z_L + q sum_i Z_i**2`` (``nb = 2 + d``);
* ``second="diagonal"``: ``D'_i = p Z_{D_i} + q Z_i**2`` (``nb = 1 + 2 d``).

The reverse, given ``G = dloss/dS'``, is ``dZ_sec = p G_sec``,
``dZ_i = p G_i + 2 q G_sec(i) Z_i`` (``G_sec(i)`` the block ``Z_i`` feeds: ``G_L`` or
``G_{D_i}``) and ``dZ_0 = p G_0 + q sum_{k>=1} G_k Z_k + r sum_i G_sec(i) Z_i**2``.
The CUDA kernels (``kernels/derivatives.cu``) compute the same, element by element.

tanh, the usual activation of physics-informed networks, has its own path with fewer
passes over the blocks: with ``p = 1 - y**2``, ``q = -2 y p`` and ``r = p (6 y**2 - 2)``
it factors ``p`` out (``L' = p (Z_L - 2 y sum_i Z_i**2)`` and so on).
"""

from __future__ import annotations

import numpy as np

from ..activations import get_activation

__all__ = ["taylor_forward", "taylor_backward"]


def _activate(act, zh):
    """``act(zh)`` as a new array (``zh`` is not modified)."""
    if act.name == "tanh":
        return np.tanh(zh)
    if act.name == "relu":
        return np.maximum(zh, zh.dtype.type(0))
    return act.forward(zh)


def _tanh_forward(z, b, d, second, out):
    y = out[0]
    if b is not None:
        np.add(z[0], b, out=y)
    else:
        y[...] = z[0]
    np.tanh(y, out=y)
    p = np.multiply(y, y)
    np.subtract(z.dtype.type(1), p, out=p)           # p = 1 - y^2
    np.multiply(z[1:1 + d], p, out=out[1:1 + d])     # J'_i = p Z_i
    if second == "none":
        return out
    m2y = y * z.dtype.type(-2)                       # q = -2 y p
    if second == "laplacian":
        sq = np.square(z[1])
        tmp = np.empty_like(sq)
        for i in range(2, d + 1):
            sq += np.square(z[i], out=tmp)
        sq *= m2y
        sq += z[1 + d]
        np.multiply(sq, p, out=out[1 + d])           # L' = p (Z_L - 2 y sum Z_i^2)
    else:
        tmp = np.empty_like(p)
        for i in range(1, d + 1):
            np.square(z[i], out=tmp)
            tmp *= m2y
            tmp += z[d + i]
            np.multiply(tmp, p, out=out[d + i])      # D'_i = p (Z_Di - 2 y Z_i^2)
    return out


def _tanh_backward(g, z, y, d, second):
    t = z.dtype.type
    gz = np.empty_like(z)
    p = np.multiply(y, y)
    w = p * t(6)
    w -= t(2)                                        # r / p = 6 y^2 - 2
    np.subtract(t(1), p, out=p)                      # p = 1 - y^2
    tmp = np.empty_like(p)
    s1 = np.multiply(g[1], z[1])                     # sum_{k >= 1} G_k Z_k
    for k in range(2, z.shape[0]):
        s1 += np.multiply(g[k], z[k], out=tmp)
    acc = np.multiply(s1, y)
    acc *= t(-2)                                     # q s1 / p = -2 y s1
    acc += g[0]
    if second != "none":
        c = np.multiply(y, t(-4))                    # 2 q / p = -4 y
        s2 = np.zeros_like(p)                        # sum_i G_sec(i) Z_i^2
        gs_c = np.multiply(g[1 + d], c) if second == "laplacian" else np.empty_like(p)
        for i in range(1, d + 1):
            gs = g[1 + d] if second == "laplacian" else g[d + i]
            if second == "diagonal":
                np.multiply(gs, c, out=gs_c)
            np.multiply(gs_c, z[i], out=tmp)
            tmp += g[i]
            np.multiply(tmp, p, out=gz[i])           # dZ_i = p (G_i - 4 y G_sec(i) Z_i)
            np.square(z[i], out=tmp)
            tmp *= gs
            s2 += tmp
        s2 *= w
        acc += s2
        np.multiply(g[1 + d:], p, out=gz[1 + d:])    # dZ_sec = p G_sec
    else:
        np.multiply(g[1:], p, out=gz[1:])
    np.multiply(acc, p, out=gz[0])                   # dZ_0 = p (G_0 - 2 y s1 + (6 y^2 - 2) s2)
    return gz


def taylor_forward(z, b, activation: str, d: int, second: str):
    """The layer's output stack from its GEMM output ``z`` (nb, B, N) and bias ``b`` (N,)."""
    act = get_activation(activation)
    out = np.empty_like(z)
    if act.name == "tanh":
        return _tanh_forward(z, b, d, second, out)
    zh = z[0] + b if b is not None else z[0]
    if act.name == "identity":
        out[0] = zh
        out[1:] = z[1:]
        return out
    out[0] = _activate(act, zh)
    v = out[0] if act.from_output else zh
    if second == "none":
        (p,) = act.higher_derivatives(v, 1)
        np.multiply(z[1:], p, out=out[1:])
        return out
    p, q = act.higher_derivatives(v, 2)
    jz = z[1:1 + d]
    np.multiply(jz, p, out=out[1:1 + d])
    if second == "laplacian":
        sq = np.square(jz[0])
        for i in range(1, d):
            sq += np.square(jz[i])
        sq *= q
        lap = out[1 + d]
        np.multiply(z[1 + d], p, out=lap)
        lap += sq
    else:  # diagonal
        sec = out[1 + d:]
        np.multiply(z[1 + d:], p, out=sec)
        sec += q * np.square(jz)
    return out


def taylor_backward(g, z, y, b, activation: str, d: int, second: str):
    """``dloss/dz`` (nb, B, N) from ``g = dloss/dout``, the forward's ``z`` and ``y = out[0]``."""
    act = get_activation(activation)
    if act.name == "identity":
        return g.copy()
    if act.name == "tanh":
        return _tanh_backward(g, z, y, d, second)
    t = z.dtype.type
    if act.from_output:
        v = y
    else:
        v = z[0] + b if b is not None else z[0]
    order = 2 if second == "none" else 3
    ds = act.higher_derivatives(v, order)
    p, q = ds[0], ds[1]
    gz = np.empty_like(z)
    # s1 = sum_{k >= 1} G_k Z_k, the term that multiplies q in dZ_0
    prod = g[1:] * z[1:]
    s1 = prod.sum(axis=0)
    gzh = gz[0]
    np.multiply(g[0], p, out=gzh)
    gzh += q * s1
    jz, gj = z[1:1 + d], g[1:1 + d]
    np.multiply(gj, p, out=gz[1:1 + d])
    if second == "none":
        return gz
    r = ds[2]
    if second == "laplacian":
        gl = g[1 + d]
        two_q_gs = t(2) * q * gl                 # (B, N), the same for every i
        gz[1:1 + d] += two_q_gs * jz
        sq = np.square(jz[0])
        for i in range(1, d):
            sq += np.square(jz[i])
        gzh += r * (gl * sq)
        np.multiply(gl, p, out=gz[1 + d])
    else:  # diagonal
        gs = g[1 + d:]
        gz[1:1 + d] += t(2) * q * gs * jz
        gzh += r * (gs * np.square(jz)).sum(axis=0)
        np.multiply(gs, p, out=gz[1 + d:])
    return gz
