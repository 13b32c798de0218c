// gelu.wgsl — GPT-2's GELU (tanh form) and its derivative, element by element.
//
// Launcher: crates/tensor/src/ops/gelu.rs (CPU path beside it).
//
//   u  = K·(x + A·x³)                     K = 0.7978845608 = sqrt(2/pi), A = 0.044715
//   t  = tanh(u)
//   gelu_forward:   out[i] = 0.5·x·(1 + t)
//   gelu_backward:  out[i] = dy·gelu'(x),
//                   gelu'(x) = 0.5·(1 + t) + 0.5·x·(1 − t²)·K·(1 + 3A·x²)
//
// Evaluated without tanh, whose WGSL accuracy is loose and whose 1 − t² cancels in the tails:
// with e = exp(−2u) and s = 1/(1 + e) = 0.5·(1 + t) (the logistic of 2u), 1 − s = e·s, so
//   out = x·s  and  gelu'(x) = s + 2·x·s·(1 − s)·K·(1 + 3A·x²)      (1 − t² = 4·s·(1 − s)),
// products only, each to a few ulp. For |u| ≥ 40 we take s = 0 or 1 and the second term 0
// (exp(80) ≈ 5.5e34 still fits f32; what is dropped is below 1e-32): huge |x| gives no NaN
// (x³ overflows from |x| ≈ 7e12). The CPU path computes the same way. The functions are
// gelu_value and gelu_grad of common.wgsl, shared with the matrix products' GELU epilogues.
//
// Bindings: 0 params; 1 x (n); 2 dy (n, backward only); 3 out (n).
// Each array is a bound *range* of a larger buffer; `off_*` is where the data starts inside it.
// Workgroup: 256 invocations, one element each, on a 2-D grid (one dimension holds at most
// 65,535 workgroups): i = (wg.y * num_workgroups.x + wg.x) * 256 + local. i ≥ n returns.

struct Params {
    n: u32,        // elements in this dispatch
    off_x: u32,
    off_dy: u32,
    off_out: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> dy: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(256)
fn gelu_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) li: u32) {
    let i = flat_index(wg, nwg, li);
    if (i >= p.n) { return; }
    out[p.off_out + i] = gelu_value(x[p.off_x + i]);
}

@compute @workgroup_size(256)
fn gelu_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) li: u32) {
    let i = flat_index(wg, nwg, li);
    if (i >= p.n) { return; }
    out[p.off_out + i] = dy[p.off_dy + i] * gelu_grad(x[p.off_x + i]);
}
