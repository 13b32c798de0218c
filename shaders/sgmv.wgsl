// sgmv.wgsl — segmented gather matrix-vector product: many LoRA adapters in one batch
// (Punica's SGMV, S-LoRA's batched LoRA), forward only.
//
// Launcher: crates/tensor/src/ops/sgmv.rs (CPU path beside it).
//
// Every row n of x carries the index a_n of its adapter. Adapter a has A[a]: (r, in),
// B[a]: (out, r) and a scale s[a]; an index ≥ n_adapters (the sentinel u32::MAX) means no
// adapter. Two entry points, dispatched one after the other:
//
//   sgmv_shrink:  h[n, k] = s[a_n] · Σ_i A[a_n, k, i] · x[n, i]   h: (N, r)   (0 without adapter)
//   sgmv_expand:  y[n, j] = Σ_k B[a_n, j, k] · h[n, k]            y: (N, out) (0 without adapter)
//
// Each sum runs in ascending order and the scale multiplies after the sum, as the CPU path
// does. The adapters are gathered per row, so rows of one batch may use different adapters and
// no weight is ever copied: the stacks are read where they lie.
//
// Bindings (every array is a bound range; `off_*` is where its data starts inside it):
//   0 params
//   1 idx     (N rows of this dispatch)   array<u32>
//   2 scales  (n_adapters)
//   3 x       (N, in)                     shrink input
//   4 a       (n_adapters, r, in)         shrink input
//   5 h_out   (N, r)                      shrink output
//   6 h       (N, r)                      expand input (the same tensor as h_out)
//   7 b       (n_adapters, out, r)        expand input
//   8 y       (N, out)                    expand output
//
// Workgroup: 64 invocations, one output element each, on a 2-D grid (one dimension holds at
// most 65,535 workgroups): i = (wg.y * num_workgroups.x + wg.x) * 64 + local.

struct Params {
    rows: u32,         // N: rows in this dispatch
    n_in: u32,         // in
    n_out: u32,        // out
    rank: u32,         // r
    n_adapters: u32,
    off_idx: u32,
    off_scales: u32,
    off_x: u32,
    off_a: u32,
    off_h: u32,
    off_b: u32,
    off_y: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> idx: array<u32>;
@group(0) @binding(2) var<storage, read> scales: array<f32>;
@group(0) @binding(3) var<storage, read> x: array<f32>;
@group(0) @binding(4) var<storage, read> a: array<f32>;
@group(0) @binding(5) var<storage, read_write> h_out: array<f32>;
@group(0) @binding(6) var<storage, read> h: array<f32>;
@group(0) @binding(7) var<storage, read> b: array<f32>;
@group(0) @binding(8) var<storage, read_write> y: array<f32>;

// Element i of a 64-wide workgroup's invocation `local`.
fn flat_index64(wg: vec3<u32>, nwg: vec3<u32>, local: u32) -> u32 {
    return group_index(wg, nwg) * 64u + local;
}

@compute @workgroup_size(64)
fn sgmv_shrink(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) li: u32) {
    let i = flat_index64(wg, nwg, li);
    if (i >= p.rows * p.rank) { return; }
    let n = i / p.rank;
    let k = i % p.rank;
    let adapter = idx[p.off_idx + n];
    var acc = 0.0;
    if (adapter < p.n_adapters) {
        let a_row = p.off_a + (adapter * p.rank + k) * p.n_in;
        let x_row = p.off_x + n * p.n_in;
        for (var c = 0u; c < p.n_in; c++) {
            acc += a[a_row + c] * x[x_row + c];
        }
        acc *= scales[p.off_scales + adapter];
    }
    h_out[p.off_h + i] = acc;
}

@compute @workgroup_size(64)
fn sgmv_expand(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) li: u32) {
    let i = flat_index64(wg, nwg, li);
    if (i >= p.rows * p.n_out) { return; }
    let n = i / p.n_out;
    let j = i % p.n_out;
    let adapter = idx[p.off_idx + n];
    var acc = 0.0;
    if (adapter < p.n_adapters) {
        let b_row = p.off_b + (adapter * p.n_out + j) * p.rank;
        let h_row = p.off_h + n * p.rank;
        for (var k = 0u; k < p.rank; k++) {
            acc += b[b_row + k] * h[h_row + k];
        }
    }
    y[p.off_y + i] = acc;
}
