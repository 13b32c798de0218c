// softmax.wgsl — softmax over the last axis, optionally causal, and its backward.
//
// Launcher: crates/tensor/src/ops/softmax.rs (CPU path beside it).
//
// The input is viewed as rows of length Cn (= cols); consecutive groups of R rows form the
// (R, Cn) matrices of the last two axes, so row g is row r = g mod R of its matrix.
//   causal: column c of row r is masked when c > r + (Cn − R), so the row keeps its first
//           lim = r + Cn − R + 1 columns (the launcher checks R ≤ Cn, so lim ≥ 1); else lim = Cn.
//   softmax_forward:  m = max_{c<lim} x[c];  z = Σ_{c<lim} exp(x[c] − m)
//                     out[c] = exp(x[c] − m) / z for c < lim, 0 for c ≥ lim
//                     (max-subtracted: every exponent is ≤ 0, so nothing overflows and z ≥ 1)
//   softmax_backward: out[c] = y[c]·(dy[c] − Σ_k y[k]·dy[k])   (masked columns have y = 0)
//
// Bindings: 0 params; 1 x or y (rows·cols); 2 dy (rows·cols, backward only); 3 out (rows·cols).
// Each array is a bound *range* of a larger buffer; `off_*` is where the data starts inside it.
// Workgroup: 256 invocations per row, one workgroup per row, rows on a 2-D grid of workgroups
// (one dimension holds at most 65,535): row = wg.y * num_workgroups.x + wg.x; rows ≥ p.rows
// return (the whole workgroup, so barriers stay in uniform control flow). Invocation l reads and
// writes columns l, l + 256, l + 512, … of its row; the row's max and sums are tree reductions in
// workgroup memory.

struct Params {
    rows: u32,     // rows in this dispatch
    cols: u32,     // Cn, the row length
    off_x: u32,    // x (forward) or y (backward)
    off_dy: u32,
    off_out: u32,
    r0: u32,       // causal: row index r, within its (R, Cn) matrix, of this dispatch's first row
    r_len: u32,    // causal: R, rows per matrix
    causal: u32,   // 1: apply the causal mask
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> dy: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(256)
fn softmax_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) li: u32) {
    let row = group_index(wg, nwg);
    if (row >= p.rows) { return; }
    var lim = p.cols;
    if (p.causal != 0u) {
        let r = (p.r0 + row) % p.r_len;
        lim = min(p.cols, r + (p.cols - p.r_len) + 1u);
    }
    let xb = p.off_x + row * p.cols;
    let ob = p.off_out + row * p.cols;

    var m = LOWEST;
    for (var c = li; c < lim; c += WG) { m = max(m, x[xb + c]); }
    m = workgroup_max(li, m);

    var z = 0.0;
    for (var c = li; c < lim; c += WG) { z += exp(x[xb + c] - m); }
    z = workgroup_sum(li, z);

    let inv = 1.0 / z;
    for (var c = li; c < p.cols; c += WG) {
        var v = 0.0;
        if (c < lim) { v = exp(x[xb + c] - m) * inv; }
        out[ob + c] = v;
    }
}

@compute @workgroup_size(256)
fn softmax_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) li: u32) {
    let row = group_index(wg, nwg);
    if (row >= p.rows) { return; }
    let yb = p.off_x + row * p.cols;
    let db = p.off_dy + row * p.cols;
    let ob = p.off_out + row * p.cols;

    var d = 0.0;
    for (var c = li; c < p.cols; c += WG) { d += x[yb + c] * dy[db + c]; }
    d = workgroup_sum(li, d);

    for (var c = li; c < p.cols; c += WG) {
        out[ob + c] = x[yb + c] * (dy[db + c] - d);
    }
}
