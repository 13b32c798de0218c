// activation.wgsl — the MLP activations of GPT-2 variants other than GELU's tanh form
// (gelu.wgsl), and their derivatives, element by element. `kind` picks one:
//
//   0 gelu (erf):  y = x·Φ(x),          y' = Φ(x) + x·φ(x)
//   1 relu:        y = max(x, 0),       y' = 1 if x > 0 else 0   (PyTorch's choice at 0)
//   2 silu:        y = x·σ(x),          y' = σ(x)·(1 + x·(1 − σ(x)))
//   3 quick_gelu:  y = x·σ(a·x),        y' = σ(a·x) + a·x·σ(a·x)·(1 − σ(a·x)),   a = 1.702
//
// Φ(x) = 0.5·erfc(−x/√2) is the normal CDF, φ(x) = exp(−x²/2)/√(2π) its density. erfc uses
// Numerical Recipes' Chebyshev fit (fractional error < 1.2e-7 everywhere): with t = 1/(1 + z/2),
//   erfc(z) = t·exp(−z² + P(t)) for z ≥ 0,   erfc(−z) = 2 − erfc(z),
// so Φ keeps its relative precision in the far left tail. σ(z) = 1/(1 + e^{−z}) is evaluated
// from e = exp(−|z|) (σ = 1/(1+e) for z ≥ 0, e/(1+e) below), so no exp overflows.
//
// Launcher: crates/tensor/src/ops/activation.rs (CPU reference beside it, the same formulas).
// Bindings: 0 params; 1 x (n); 2 dy (n, backward only); 3 out (n).
// Each array is a bound *range* of a larger buffer; `off_*` is where the data starts inside it.
// Workgroup: 256 invocations, one element each, on a 2-D grid:
// i = (wg.y * num_workgroups.x + wg.x) * 256 + local. i ≥ n returns.

struct Params {
    n: u32,        // elements in this dispatch
    kind: u32,     // 0 gelu (erf), 1 relu, 2 silu, 3 quick_gelu
    off_x: u32,
    off_dy: u32,
    off_out: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> dy: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

const QUICK: f32 = 1.702;
const INV_SQRT2: f32 = 0.70710678118654752;
const INV_SQRT_2PI: f32 = 0.39894228040143268;

// erfc(z) for z ≥ 0.
fn erfc_pos(z: f32) -> f32 {
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418
        + t * (-0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587
        + t * (-0.82215223 + t * 0.17087277))))))));
    return t * exp(-z * z + poly);
}

// Φ(v) = 0.5·erfc(−v/√2).
fn normal_cdf(v: f32) -> f32 {
    let z = v * INV_SQRT2;
    if (z >= 0.0) {
        return 1.0 - 0.5 * erfc_pos(z);
    }
    return 0.5 * erfc_pos(-z);
}

fn sigmoid(z: f32) -> f32 {
    let e = exp(-abs(z));
    if (z >= 0.0) {
        return 1.0 / (1.0 + e);
    }
    return e / (1.0 + e);
}

fn forward(v: f32) -> f32 {
    switch p.kind {
        case 0u: { return v * normal_cdf(v); }
        case 1u: { return max(v, 0.0); }
        case 2u: { return v * sigmoid(v); }
        default: { return v * sigmoid(QUICK * v); }
    }
}

fn derivative(v: f32) -> f32 {
    switch p.kind {
        case 0u: { return normal_cdf(v) + v * INV_SQRT_2PI * exp(-0.5 * v * v); }
        case 1u: { return select(0.0, 1.0, v > 0.0); }
        case 2u: {
            let s = sigmoid(v);
            return s * (1.0 + v * (1.0 - s));
        }
        default: {
            let s = sigmoid(QUICK * v);
            return s + QUICK * v * s * (1.0 - s);
        }
    }
}

@compute @workgroup_size(256)
fn activation_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) li: u32) {
    let i = flat_index(wg, nwg, li);
    if (i >= p.n) { return; }
    out[p.off_out + i] = forward(x[p.off_x + i]);
}

@compute @workgroup_size(256)
fn activation_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                       @builtin(local_invocation_index) li: u32) {
    let i = flat_index(wg, nwg, li);
    if (i >= p.n) { return; }
    out[p.off_out + i] = dy[p.off_dy + i] * derivative(x[p.off_x + i]);
}
