// adamw.wgsl — one AdamW step, in place (decoupled weight decay, Loshchilov & Hutter;
// torch.optim.AdamW semantics).
//
// Launcher: crates/tensor/src/ops/adamw.rs (CPU path beside it, same constants).
//
//   param[i] ← param[i] · (1 − lr·wd)                         (decay)
//   m[i]     ← β1 · m[i] + (1 − β1) · g[i]
//   v[i]     ← β2 · v[i] + (1 − β2) · g[i]²
//   param[i] ← param[i] − step_size · (m[i] / (√v[i] / √bc2 + eps))
// with bc1 = 1 − β1^t, bc2 = 1 − β2^t, step_size = lr / bc1, all computed on the host in f64
// and passed as f32 (as torch does): this equals p − lr · m̂ / (√v̂ + eps), m̂ = m/bc1, v̂ = v/bc2.
//
// `adamw_step_clipped` first multiplies g by clip[1], the clip factor of the global gradient
// norm that `grad_norm.wgsl` wrote as [norm, clip, ok, …] (1 when nothing is clipped):
// gradient clipping folded into the update, with no readback and no scaled copy of the
// gradients. Unless ok (clip[2]) is 1 (it is 0 for a non-finite norm or loss) it writes nothing.
//
// Bindings: 0 params; 1 grad (n, read); 2 param (n); 3 m (n); 4 v (n) — 2..4 updated in place;
// 5 clip ([norm, clip, ok, …], read; `adamw_step_clipped` only).
// Each array is a bound *range* of a larger buffer; `off_*` is where the data starts inside it.
// Workgroup: 256 invocations, one element each, on a 2-D grid (one dimension holds at most
// 65,535 workgroups): i = (wg.y · num_workgroups.x + wg.x) · 256 + local; invocation i
// reads and writes element i of param, m and v.

struct Params {
    n: u32,          // elements in this dispatch
    off_g: u32,
    off_p: u32,
    off_m: u32,
    off_v: u32,
    beta1: f32,
    beta2: f32,
    one_minus_beta1: f32,
    one_minus_beta2: f32,
    eps: f32,
    decay: f32,      // 1 − lr·wd
    step_size: f32,  // lr / (1 − β1^t)
    bc2_sqrt: f32,   // √(1 − β2^t)
    off_c: u32,      // where [norm, clip, ok] sits inside binding 5
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> grad: array<f32>;
@group(0) @binding(2) var<storage, read_write> param: array<f32>;
@group(0) @binding(3) var<storage, read_write> m: array<f32>;
@group(0) @binding(4) var<storage, read_write> v: array<f32>;
@group(0) @binding(5) var<storage, read> clip: array<f32>;

// The update of element i with gradient g.
fn update(i: u32, g: f32) {
    let mi = p.beta1 * m[p.off_m + i] + p.one_minus_beta1 * g;
    let vi = p.beta2 * v[p.off_v + i] + p.one_minus_beta2 * (g * g);
    let denom = sqrt(vi) / p.bc2_sqrt + p.eps;
    let w = param[p.off_p + i] * p.decay;
    m[p.off_m + i] = mi;
    v[p.off_v + i] = vi;
    param[p.off_p + i] = w - p.step_size * (mi / denom);
}

@compute @workgroup_size(256)
fn adamw_step(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) li: u32) {
    let i = flat_index(wg, nwg, li);
    if (i >= p.n) { return; }
    update(i, grad[p.off_g + i]);
}

@compute @workgroup_size(256)
fn adamw_step_clipped(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) li: u32) {
    let i = flat_index(wg, nwg, li);
    if (i >= p.n || clip[p.off_c + 2u] != 1.0) { return; }
    update(i, grad[p.off_g + i] * clip[p.off_c + 1u]);
}
