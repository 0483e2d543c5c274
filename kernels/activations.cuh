// activations.cuh -- device forward and derivative of every activation.
//
// The ids and formulas are those of cupynn/activations.py (the reference); NaN
// behaves the same way: relu(NaN) = NaN because `z < 0` is false for NaN, and the
// derivatives taken from the output use the same comparisons as NumPy.
#pragma once
#include "common.cuh"

namespace cupynn {

enum : int {
    ACT_IDENTITY = 0, ACT_RELU = 1, ACT_LEAKY_RELU = 2, ACT_TANH = 3, ACT_SIGMOID = 4,
    ACT_SOFTPLUS = 5, ACT_SILU = 6, ACT_GELU = 7, ACT_GELU_ERF = 8, ACT_ELU = 9,
    ACT_NONE = -1,  // "no previous layer" in the recompute templates
    ACT_RUNTIME = -2  // a kernel template argument: the activation is a kernel argument
};

// True when f' is computed from the output y (ids 0-4), false when from z (5-9).
template <int ACT> struct ActFromOutput { static constexpr bool value = ACT <= ACT_SIGMOID; };

template <typename T> __device__ __forceinline__ T sigmoid_ref(T z) {
    T e = m_exp(-m_fabs(z));  // exp of a non-positive argument only
    return z >= T(0) ? T(1) / (T(1) + e) : e / (T(1) + e);
}

// y = f(z)
template <int ACT, typename T> __device__ __forceinline__ T act_forward(T z) {
    if constexpr (ACT == ACT_IDENTITY) {
        return z;
    } else if constexpr (ACT == ACT_RELU) {
        return z < T(0) ? T(0) : z;
    } else if constexpr (ACT == ACT_LEAKY_RELU) {
        return z < T(0) ? z * T(0.01) : z;
    } else if constexpr (ACT == ACT_TANH) {
        return m_tanh(z);
    } else if constexpr (ACT == ACT_SIGMOID) {
        return sigmoid_ref(z);
    } else if constexpr (ACT == ACT_SOFTPLUS) {
        // NumPy: log1p(exp(-|z|)) + maximum(z, 0); NaN stays NaN through log1p.
        return m_log1p(m_exp(-m_fabs(z))) + (z > T(0) ? z : T(0));
    } else if constexpr (ACT == ACT_SILU) {
        return z * sigmoid_ref(z);
    } else if constexpr (ACT == ACT_GELU) {
        T u = T(0.7978845608028654) * (z + T(0.044715) * z * z * z);
        return T(0.5) * z * (T(1) + m_tanh(u));
    } else if constexpr (ACT == ACT_GELU_ERF) {
        return T(0.5) * z * (T(1) + m_erf(z * T(0.7071067811865475)));
    } else {  // ACT_ELU: expm1(NaN) = NaN, as NumPy's expm1(minimum(NaN, 0))
        return z > T(0) ? z : m_expm1(z);
    }
}

// f' evaluated from v: v is y for ids 0-4, z for ids 5-9.
template <int ACT, typename T> __device__ __forceinline__ T act_derivative(T v) {
    if constexpr (ACT == ACT_IDENTITY) {
        return T(1);
    } else if constexpr (ACT == ACT_RELU) {
        return v > T(0) ? T(1) : T(0);
    } else if constexpr (ACT == ACT_LEAKY_RELU) {
        return v > T(0) ? T(1) : T(0.01);
    } else if constexpr (ACT == ACT_TANH) {
        return T(1) - v * v;
    } else if constexpr (ACT == ACT_SIGMOID) {
        return v * (T(1) - v);
    } else if constexpr (ACT == ACT_SOFTPLUS) {
        return sigmoid_ref(v);
    } else if constexpr (ACT == ACT_SILU) {
        T s = sigmoid_ref(v);
        return s * (T(1) + v * (T(1) - s));
    } else if constexpr (ACT == ACT_GELU) {
        T u = T(0.7978845608028654) * (v + T(0.044715) * v * v * v);
        T th = m_tanh(u);
        T du = T(0.7978845608028654) * (T(1) + T(0.134145) * v * v);
        return T(0.5) * (T(1) + th) + T(0.5) * v * (T(1) - th * th) * du;
    } else if constexpr (ACT == ACT_GELU_ERF) {
        T cdf = T(0.5) * (T(1) + m_erf(v * T(0.7071067811865475)));
        T pdf = m_exp(T(-0.5) * v * v) * T(0.3989422804014327);
        return cdf + v * pdf;
    } else {  // ACT_ELU
        return v > T(0) ? T(1) : m_exp(v);
    }
}

// f', f'' and f''' evaluated from v (y for ids 0-4, z for 5-9): cupynn/activations.py's
// higher_derivatives.  Unlike act_derivative, NaN in v gives NaN in every order (except
// for the identity, whose derivatives do not depend on v).  ORDER < 3 skips f''' and
// ORDER < 2 f'' where that saves work (they are then unspecified).
template <int ACT, int ORDER, typename T>
__device__ __forceinline__ void act_higher(T v, T& d1, T& d2, T& d3) {
    if constexpr (ACT == ACT_IDENTITY) {
        d1 = T(1); d2 = T(0); d3 = T(0);
    } else if constexpr (ACT == ACT_RELU || ACT == ACT_LEAKY_RELU) {
        const T nan_or_zero = v != v ? v : T(0);
        const T slope = ACT == ACT_RELU ? T(0) : T(0.01);
        d1 = v > T(0) ? T(1) : (v != v ? v : slope);
        d2 = nan_or_zero; d3 = nan_or_zero;
    } else if constexpr (ACT == ACT_TANH) {
        d1 = T(1) - v * v;
        d2 = T(-2) * v * d1;
        d3 = d1 * (T(6) * v * v - T(2));
    } else if constexpr (ACT == ACT_SIGMOID) {
        d1 = v * (T(1) - v);
        d2 = d1 * (T(1) - T(2) * v);
        d3 = d1 * (T(1) - T(6) * v + T(6) * v * v);
    } else if constexpr (ACT == ACT_SOFTPLUS) {
        const T s = sigmoid_ref(v);
        d1 = s;
        d2 = s * (T(1) - s);
        d3 = d2 * (T(1) - T(2) * s);
    } else if constexpr (ACT == ACT_SILU) {
        const T s = sigmoid_ref(v);
        const T s1 = s * (T(1) - s);
        d1 = s * (T(1) + v * (T(1) - s));
        d2 = s1 * (T(2) + v * (T(1) - T(2) * s));
        d3 = s1 * (T(3) * (T(1) - T(2) * s) + v * (T(1) - T(6) * s + T(6) * s * s));
    } else if constexpr (ACT == ACT_GELU) {
        // th = tanh(u), u = c (v + a v^3), w = 1 - th^2 (derivation in activations.py)
        const T c = T(0.7978845608028654), a = T(0.044715);
        const T th = m_tanh(c * (v + a * v * v * v));
        const T w = T(1) - th * th;
        const T u1 = c * (T(1) + T(3) * a * v * v);
        const T th1 = w * u1;
        d1 = T(0.5) * (T(1) + th) + T(0.5) * v * th1;
        const T u2 = T(6) * c * a * v;
        const T inner = u2 - T(2) * th * u1 * u1;
        const T th2 = w * inner;
        d2 = th1 + T(0.5) * v * th2;
        if constexpr (ORDER >= 3) {
            const T u3 = T(6) * c * a;
            const T th3 = T(-2) * th * w * u1 * inner +
                          w * (u3 - T(2) * w * u1 * u1 * u1 - T(4) * th * u1 * u2);
            d3 = T(1.5) * th2 + T(0.5) * v * th3;
        } else {
            d3 = T(0);
        }
    } else if constexpr (ACT == ACT_GELU_ERF) {
        const T pdf = m_exp(T(-0.5) * v * v) * T(0.3989422804014327);
        const T v2 = v * v;
        d1 = T(0.5) * (T(1) + m_erf(v * T(0.7071067811865475))) + v * pdf;
        d2 = pdf * (T(2) - v2);
        d3 = v * pdf * (v2 - T(4));
    } else {  // ACT_ELU: exp(NaN) = NaN, as NumPy's exp(minimum(NaN, 0))
        const T e = m_exp(v < T(0) ? v : (v != v ? v : T(0)));
        d1 = v > T(0) ? T(1) : e;
        d2 = v > T(0) ? T(0) : e;
        d3 = d2;
    }
}

// A runtime activation id as a compile-time one: with_activation(act, f) calls
// f(Act<act>{}) through one switch, and inside f `decltype(a)::id` is a constant.  Loops
// over many elements go inside f, so the switch is taken once for all of them.
template <int ACT> struct Act { static constexpr int id = ACT; };

template <class F> __device__ __forceinline__ void with_activation(int act, F&& f) {
#ifdef CUPYNN_ONLY_ACTIVATION  // analysis only (python -m cupynn.sass_stats --activation)
    (void)act;
    f(Act<CUPYNN_ONLY_ACTIVATION>{});
    return;
#endif
    switch (act) {
        case ACT_IDENTITY: f(Act<ACT_IDENTITY>{}); break;
        case ACT_RELU: f(Act<ACT_RELU>{}); break;
        case ACT_LEAKY_RELU: f(Act<ACT_LEAKY_RELU>{}); break;
        case ACT_TANH: f(Act<ACT_TANH>{}); break;
        case ACT_SIGMOID: f(Act<ACT_SIGMOID>{}); break;
        case ACT_SOFTPLUS: f(Act<ACT_SOFTPLUS>{}); break;
        case ACT_SILU: f(Act<ACT_SILU>{}); break;
        case ACT_GELU: f(Act<ACT_GELU>{}); break;
        case ACT_GELU_ERF: f(Act<ACT_GELU_ERF>{}); break;
        default: f(Act<ACT_ELU>{}); break;
    }
}

// act_forward with the id at run time, out of line: one copy of every formula behind one
// switch, called once per element by the ACT_RUNTIME instantiations (cheap to compile,
// where inlining it into an unrolled epilogue would copy all ten formulas into every
// element's code).
template <typename T> __device__ __noinline__ T act_forward_runtime(int act, T z) {
    T y = z;
    with_activation(act, [&](auto a) { y = act_forward<decltype(a)::id>(z); });
    return y;
}

// The value a layer saves for its backward: y for ids 0-4, z for 5-9.
template <int ACT, typename T> __device__ __forceinline__ T act_saved(T z, T y) {
    if constexpr (ActFromOutput<ACT>::value) { return y; } else { return z; }
}

}  // namespace cupynn
