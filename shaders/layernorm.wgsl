// layernorm.wgsl — layer norm over the last axis (C = cols), forward and backward.
//
// Launcher: crates/tensor/src/ops/layernorm.rs (CPU path beside it).
//
// x: (rows, C) row-major; gamma, beta, dgamma, dbeta: (C); mean, rstd: (rows).
//   layernorm_forward (one workgroup per row):
//     μ = mean_c x[c];  σ² = mean_c (x[c] − μ)²  (biased; two passes, never E[x²] − E[x]²)
//     rstd = 1/sqrt(σ² + eps);  x̂[c] = (x[c] − μ)·rstd;  out[c] = x̂[c]·gamma[c] + beta[c]
//     mean[row] = μ, rstd[row] = rstd (saved for the backward)
//     The row is shifted by its first element k = x[0] before summing (μ = k + d, d = mean(x − k),
//     x − μ = (x − k) − d): with a large common offset (1e4 + noise) the sums then see only the
//     small values, and x − μ does not suffer from μ being rounded to f32 at the offset's scale.
//   add_layernorm_forward (one workgroup per row): a residual addition and the layer norm of its
//     sum in one pass, h[c] = x[c] + res[c] written out (the residual stream goes on) and
//     layernorm_forward's out, mean, rstd computed from h exactly as from x (same sums, same
//     order: the bits of add then layernorm_forward).
//   layernorm_backward (one workgroup per row), g = dy·gamma, x̂ recomputed from the saved μ, rstd:
//     out[c] (+)= rstd·(g[c] − mean_k g[k] − x̂[c]·mean_k g[k]·x̂[k])          (= dx)
//     "+=" when p.add_dx = 1: dx added into a gradient already summed for x (the residual stream's)
//   layernorm_backward_partials (one invocation per (row block b, column c), i = b·C + c):
//     part_g[i] = Σ_{rows r of block b} dy[r, c]·x̂[r, c],  part_b[i] = Σ_r dy[r, c]
//     (blocks of p.block_rows rows; the last may be shorter)
//   layernorm_backward_params (one invocation per column c):
//     dgamma[c] (+)= Σ_b part_g[b·C + c],  dbeta[c] (+)= Σ_b part_b[b·C + c]
//     in block order, so the result is deterministic (WGSL has no float atomics); "+=" when
//     p.accumulate = 1, for the second and later row chunks of a tensor too big for one binding.
//
// Bindings: 0 params; 1 x (rows·C); 2 gamma (C); 3 beta (C); 4 dy (rows·C); 5 mean (rows);
// 6 rstd (rows); 7 out: y or dx (rows·C); 8 part_g (nblocks·C); 9 part_b (nblocks·C);
// 10 dgamma (C); 11 dbeta (C); 12 res (rows·C); 13 h (rows·C). Each entry point binds only the
// ones it uses.
// x, dy, out, mean, rstd, gamma, beta are bound *ranges* of larger buffers (`off_*` is where the
// data starts inside them); part_*, dgamma, dbeta are bound from their first element.
// Workgroup: 256 invocations. Per-row kernels: row = wg.y * num_workgroups.x + wg.x on a 2-D grid
// of workgroups (one dimension holds at most 65,535), rows ≥ p.rows return (the whole workgroup,
// so barriers stay in uniform control flow); invocation l handles columns l, l + 256, … and the
// sums are tree reductions in workgroup memory. Per-column kernels: one element per invocation,
// i = (wg.y * num_workgroups.x + wg.x) * 256 + local, out-of-range i returns.

struct Params {
    rows: u32,       // rows in this dispatch
    cols: u32,       // C
    off_x: u32,
    off_dy: u32,
    off_out: u32,
    off_mean: u32,
    off_rstd: u32,
    off_gamma: u32,
    off_beta: u32,
    eps: f32,
    block_rows: u32, // partials: rows per block
    nblocks: u32,    // partials: blocks in this dispatch, ceil(rows / block_rows)
    accumulate: u32, // params: 1 to add to dgamma/dbeta instead of overwriting
    add_dx: u32,     // backward: 1 to add dx into out instead of overwriting it
    off_res: u32,    // add_layernorm_forward: where res starts
    off_h: u32,      // add_layernorm_forward: where h starts
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> gamma: array<f32>;
@group(0) @binding(3) var<storage, read> beta: array<f32>;
@group(0) @binding(4) var<storage, read> dy: array<f32>;
@group(0) @binding(5) var<storage, read_write> mean: array<f32>;
@group(0) @binding(6) var<storage, read_write> rstd: array<f32>;
@group(0) @binding(7) var<storage, read_write> out: array<f32>;
@group(0) @binding(8) var<storage, read_write> part_g: array<f32>;
@group(0) @binding(9) var<storage, read_write> part_b: array<f32>;
@group(0) @binding(10) var<storage, read_write> dgamma: array<f32>;
@group(0) @binding(11) var<storage, read_write> dbeta: array<f32>;
@group(0) @binding(12) var<storage, read> res: array<f32>;
@group(0) @binding(13) var<storage, read_write> h: array<f32>;

@compute @workgroup_size(256)
fn layernorm_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) li: u32) {
    let row = group_index(wg, nwg);
    if (row >= p.rows) { return; }
    let xb = p.off_x + row * p.cols;
    let n = f32(p.cols);
    let k = x[xb];   // the shift: the row's first element

    var s = 0.0;
    for (var c = li; c < p.cols; c += WG) { s += x[xb + c] - k; }
    let d = workgroup_sum(li, s) / n;                // μ = k + d

    var q = 0.0;
    for (var c = li; c < p.cols; c += WG) {
        let e = (x[xb + c] - k) - d;
        q += e * e;
    }
    let sigma2 = workgroup_sum(li, q) / n;
    let rs = 1.0 / sqrt(sigma2 + p.eps);

    let ob = p.off_out + row * p.cols;
    for (var c = li; c < p.cols; c += WG) {
        let xh = ((x[xb + c] - k) - d) * rs;
        out[ob + c] = xh * gamma[p.off_gamma + c] + beta[p.off_beta + c];
    }
    if (li == 0u) {
        mean[p.off_mean + row] = k + d;
        rstd[p.off_rstd + row] = rs;
    }
}

@compute @workgroup_size(256)
fn add_layernorm_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                         @builtin(local_invocation_index) li: u32) {
    let row = group_index(wg, nwg);
    if (row >= p.rows) { return; }
    let xb = p.off_x + row * p.cols;
    let rb = p.off_res + row * p.cols;
    let hb = p.off_h + row * p.cols;
    let n = f32(p.cols);
    let k = x[xb] + res[rb];   // the shift: the row's first element (of h)

    // Each invocation writes h's columns it owns and reads back only those.
    var s = 0.0;
    for (var c = li; c < p.cols; c += WG) {
        let v = x[xb + c] + res[rb + c];
        h[hb + c] = v;
        s += v - k;
    }
    let d = workgroup_sum(li, s) / n;                // μ = k + d

    var q = 0.0;
    for (var c = li; c < p.cols; c += WG) {
        let e = (h[hb + c] - k) - d;
        q += e * e;
    }
    let sigma2 = workgroup_sum(li, q) / n;
    let rs = 1.0 / sqrt(sigma2 + p.eps);

    let ob = p.off_out + row * p.cols;
    for (var c = li; c < p.cols; c += WG) {
        let xh = ((h[hb + c] - k) - d) * rs;
        out[ob + c] = xh * gamma[p.off_gamma + c] + beta[p.off_beta + c];
    }
    if (li == 0u) {
        mean[p.off_mean + row] = k + d;
        rstd[p.off_rstd + row] = rs;
    }
}

@compute @workgroup_size(256)
fn layernorm_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) li: u32) {
    let row = group_index(wg, nwg);
    if (row >= p.rows) { return; }
    let xb = p.off_x + row * p.cols;
    let db = p.off_dy + row * p.cols;
    let mu = mean[p.off_mean + row];
    let rs = rstd[p.off_rstd + row];

    var sg = 0.0;
    var sgx = 0.0;
    for (var c = li; c < p.cols; c += WG) {
        let g = dy[db + c] * gamma[p.off_gamma + c];
        sg += g;
        sgx += g * (x[xb + c] - mu) * rs;
    }
    let sums = workgroup_sum2(li, sg, sgx) / f32(p.cols);   // (mean g, mean g·x̂)

    let ob = p.off_out + row * p.cols;
    for (var c = li; c < p.cols; c += WG) {
        let g = dy[db + c] * gamma[p.off_gamma + c];
        let xh = (x[xb + c] - mu) * rs;
        let v = rs * (g - sums.x - xh * sums.y);
        if (p.add_dx != 0u) {
            out[ob + c] = out[ob + c] + v;
        } else {
            out[ob + c] = v;
        }
    }
}

@compute @workgroup_size(256)
fn layernorm_backward_partials(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                               @builtin(local_invocation_index) li: u32) {
    let i = flat_index(wg, nwg, li);
    if (i >= p.nblocks * p.cols) { return; }
    let b = i / p.cols;
    let c = i % p.cols;
    let r_end = min(p.rows, (b + 1u) * p.block_rows);
    var pg = 0.0;
    var pb = 0.0;
    for (var r = b * p.block_rows; r < r_end; r++) {
        let d = dy[p.off_dy + r * p.cols + c];
        pg += d * (x[p.off_x + r * p.cols + c] - mean[p.off_mean + r]) * rstd[p.off_rstd + r];
        pb += d;
    }
    part_g[i] = pg;
    part_b[i] = pb;
}

@compute @workgroup_size(256)
fn layernorm_backward_params(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                             @builtin(local_invocation_index) li: u32) {
    let c = flat_index(wg, nwg, li);
    if (c >= p.cols) { return; }
    var sg = 0.0;
    var sb = 0.0;
    for (var b = 0u; b < p.nblocks; b++) {
        sg += part_g[b * p.cols + c];
        sb += part_b[b * p.cols + c];
    }
    if (p.accumulate != 0u) {
        sg += dgamma[c];
        sb += dbeta[c];
    }
    dgamma[c] = sg;
    dbeta[c] = sb;
}
