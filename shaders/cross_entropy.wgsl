// cross_entropy.wgsl — fused log-softmax + negative log-likelihood with a per-token weight.
//
// Launcher: crates/tensor/src/ops/cross_entropy.rs (CPU path beside it).
//
// For each row n of logits x: (N, V), with target t_n < V and weight w_n:
//   m_n      = max_v x[n, v]
//   s_n      = Σ_v exp(x[n, v] − m_n)                      (every term ≤ 1: no overflow)
//   lse[n]   = m_n + log(s_n)                              (= logsumexp(x_n))
//   loss[n]  = w_n · ((m_n − x[n, t_n]) + log(s_n))        (= w_n · (lse_n − x[n, t_n]), computed
//              without the cancellation of two large numbers); 0 when w_n = 0
//   dlogits[n, v] = scale · w_n · (exp(x[n, v] − lse[n]) − [v = t_n]);  0 when w_n = 0
//
// Bindings (every array is a bound range of rows; `off_*` is where its data starts inside it):
//   0 params
//   1 logits   (rows, V)   read
//   2 targets  (rows)      array<u32>
//   3 weights  (rows)
//   4 losses   (rows)      forward output
//   5 lse_out  (rows)      forward output
//   6 lse      (rows)      backward input (the forward's lse_out)
//   7 dlogits  (rows, V)   backward output
//
// cross_entropy_forward: workgroup of 256 invocations per row, row = wg.y * num_workgroups.x + wg.x
//   (a 2-D grid: one dimension holds at most 65,535 workgroups). Invocation li strides over
//   v = li, li + 256, ... < V; a workgroup-memory tree reduction gives m_n, a second one s_n;
//   invocation 0 writes losses[n] and lse_out[n].
// cross_entropy_backward: 256 invocations per workgroup, one element each,
//   i = (wg.y * num_workgroups.x + wg.x) * 256 + li over the rows·V elements of the chunk.

struct Params {
    rows: u32,       // rows in this dispatch
    cols: u32,       // V
    n: u32,          // backward: rows · V elements in this dispatch
    scale: f32,      // backward: factor of every gradient (1/Σw for a mean loss)
    off_logits: u32,
    off_targets: u32,
    off_weights: u32,
    off_losses: u32,
    off_lse_out: u32,
    off_lse: u32,
    off_dlogits: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read> targets: array<u32>;
@group(0) @binding(3) var<storage, read> weights: array<f32>;
@group(0) @binding(4) var<storage, read_write> losses: array<f32>;
@group(0) @binding(5) var<storage, read_write> lse_out: array<f32>;
@group(0) @binding(6) var<storage, read> lse: array<f32>;
@group(0) @binding(7) var<storage, read_write> dlogits: array<f32>;

@compute @workgroup_size(256)
fn cross_entropy_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                         @builtin(local_invocation_index) li: u32) {
    let row = group_index(wg, nwg);
    if (row >= p.rows) { return; }          // uniform over the workgroup: barriers stay legal
    let base = p.off_logits + row * p.cols;

    var m = LOWEST;
    for (var v = li; v < p.cols; v += WG) { m = max(m, logits[base + v]); }
    let mx = workgroup_max(li, m);

    var acc = 0.0;
    for (var v = li; v < p.cols; v += WG) { acc += exp(logits[base + v] - mx); }
    let sum = workgroup_sum(li, acc);

    if (li == 0u) {
        let log_s = log(sum);
        lse_out[p.off_lse_out + row] = mx + log_s;
        let w = weights[p.off_weights + row];
        let xt = logits[base + targets[p.off_targets + row]];
        losses[p.off_losses + row] = select(0.0, w * ((mx - xt) + log_s), w != 0.0);
    }
}

@compute @workgroup_size(256)
fn cross_entropy_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                          @builtin(local_invocation_index) li: u32) {
    let i = flat_index(wg, nwg, li);
    if (i >= p.n) { return; }
    let row = i / p.cols;
    let v = i - row * p.cols;
    let w = weights[p.off_weights + row];
    var g = 0.0;
    if (w != 0.0) {
        let soft = exp(logits[p.off_logits + i] - lse[p.off_lse + row]);
        let hot = select(0.0, 1.0, v == targets[p.off_targets + row]);
        g = (p.scale * w) * (soft - hot);
    }
    dlogits[p.off_dlogits + i] = g;
}
