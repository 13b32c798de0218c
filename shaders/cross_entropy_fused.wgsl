// cross_entropy_fused.wgsl — cross-entropy's loss AND its gradient in one pass over the logits,
// written over the logits (in place).
//
// Launcher: crates/tensor/src/ops/cross_entropy_fused.rs (CPU path beside it).
//
// For each row n of x: (N, V), with target t_n < V and weight w_n:
//   m_n     = max_v x[n, v]
//   s_n     = Σ_v exp(x[n, v] − m_n)                      (every term ≤ 1: no overflow)
//   loss[n] = w_n · ((m_n − x[n, t_n]) + log(s_n))         (0 when w_n = 0)
//   x[n, v] ← w_n · (exp(x[n, v] − m_n) / s_n − [v = t_n]) (= w_n · ∂l_n/∂x[n, v]; 0 when w_n = 0)
//
// Bindings (every array is a bound range of rows; `off_*` is where its data starts inside it):
//   0 params
//   1 x        (rows, V)   read_write: logits in, gradient out
//   2 targets  (rows)      array<u32>
//   3 weights  (rows)
//   4 losses   (rows)      output
//
// cross_entropy_fused: a workgroup of 256 invocations per row, row = wg.y * num_workgroups.x +
//   wg.x (a 2-D grid: one dimension holds at most 65,535 workgroups). Invocation li strides
//   over v = li, li + 256, ... < V: a workgroup tree reduction gives m_n, a second one s_n;
//   x[n, t_n] is read first (before any write) and every invocation rewrites only its own
//   elements, after both reductions; invocation 0 writes losses[n].

struct Params {
    rows: u32,       // rows in this dispatch
    cols: u32,       // V
    off_x: u32,
    off_targets: u32,
    off_weights: u32,
    off_losses: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;
@group(0) @binding(2) var<storage, read> targets: array<u32>;
@group(0) @binding(3) var<storage, read> weights: array<f32>;
@group(0) @binding(4) var<storage, read_write> losses: array<f32>;

@compute @workgroup_size(256)
fn cross_entropy_fused(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) li: u32) {
    let row = group_index(wg, nwg);
    if (row >= p.rows) { return; }          // uniform over the workgroup: barriers stay legal
    let base = p.off_x + row * p.cols;
    let t = targets[p.off_targets + row];
    let w = weights[p.off_weights + row];
    let xt = x[base + t];                   // read before any invocation writes

    var m = LOWEST;
    for (var v = li; v < p.cols; v += WG) { m = max(m, x[base + v]); }
    let mx = workgroup_max(li, m);

    var acc = 0.0;
    for (var v = li; v < p.cols; v += WG) { acc += exp(x[base + v] - mx); }
    let sum = workgroup_sum(li, acc);

    // Each invocation rewrites only the elements it read itself, after both reductions.
    let inv = 1.0 / sum;
    for (var v = li; v < p.cols; v += WG) {
        let hot = select(0.0, 1.0, v == t);
        x[base + v] = select(0.0, w * (exp(x[base + v] - mx) * inv - hot), w != 0.0);
    }
    if (li == 0u) {
        losses[p.off_losses + row] = select(0.0, w * ((mx - xt) + log(sum)), w != 0.0);
    }
}
