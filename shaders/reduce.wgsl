// reduce.wgsl — sum of a tensor over one axis, by workgroup-memory tree reductions.
//
// Launcher: crates/tensor/src/ops/reduce.rs (CPU path beside it; `sum`, `mean`, `sum_all`).
//
//   x viewed as (outer, A, inner);  out[o, g, i] = alpha · Σ_{a in item g} x[o, a, i]
//
// The A axis is cut into G "items" of `rows` rows each (the last may be shorter). One pass writes
// the partial sums (outer, G, inner); the launcher repeats the pass on them (A ← G) until G = 1,
// the last pass scaling by alpha (1, or 1/A for `mean`). Item k = o·G + g covers the contiguous
// elements [(o·A + g·rows)·inner, (o·A + min(A, (g+1)·rows))·inner), so consecutive items are
// consecutive in memory and one dispatch binds the range of items k0 .. k0 + items.
//
// Bindings: 0 params; 1 x (the bound range of the input, from absolute element x_base);
//           2 out (items · inner partial sums of this dispatch, row k - k0 per item).
// Workgroup: 256 invocations = `lanes` row lanes × `w` columns (w = min(64, next power of two ≥
// inner), lanes = 256 / w). Workgroup id wid = wg.y · num_workgroups.x + wg.x (a 2-D grid: one
// dimension holds at most 65,535 workgroups) names item k0 + wid / tiles and column tile
// wid % tiles. Invocation (lane, c) sums rows lane, lane + lanes, ... of its item at column
// tile·w + c in a fixed order; the lanes are then added by a tree in workgroup memory, and lane 0
// writes out[k - k0, column]. The order of every addition depends only on the shape and the
// launcher's item size: results are deterministic.

struct Params {
    a: u32,       // A: length of the reduced axis in this pass
    inner: u32,   // elements after the axis
    groups: u32,  // G: items per outer index
    rows: u32,    // rows of A per item
    w: u32,       // columns per workgroup (power of two, ≤ 64)
    lanes: u32,   // row lanes per workgroup = 256 / w
    tiles: u32,   // column tiles = ceil(inner / w)
    k0: u32,      // first item of this dispatch
    items: u32,   // items in this dispatch
    x_base: u32,  // absolute element index of the first bound input element
    off_x: u32,   // where that element sits inside binding 1
    off_out: u32, // where out row 0 sits inside binding 2
    alpha: f32,   // scale of the result (1, or 1/A on the last pass of `mean`)
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

var<workgroup> partial: array<f32, 256>;

@compute @workgroup_size(256)
fn reduce_sum(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) li: u32) {
    let wid = group_index(wg, nwg);
    let rel = wid / p.tiles;
    // Whole workgroups past the end leave together (uniform control flow for the barriers).
    if (rel >= p.items) { return; }
    let k = p.k0 + rel;
    let o = k / p.groups;
    let g = k % p.groups;
    let c = li % p.w;
    let lane = li / p.w;
    let col = (wid % p.tiles) * p.w + c;
    let row0 = g * p.rows;
    let row1 = min(row0 + p.rows, p.a);

    var acc = 0.0;
    if (col < p.inner) {
        var r = row0 + lane;
        loop {
            if (r >= row1) { break; }
            acc = acc + x[p.off_x + (o * p.a + r) * p.inner + col - p.x_base];
            r = r + p.lanes;
        }
    }
    partial[li] = acc;
    workgroupBarrier();

    // Tree over the lanes: lane l adds lane l + s, for s = lanes/2, lanes/4, ..., 1.
    var s = p.lanes / 2u;
    loop {
        if (s == 0u) { break; }
        if (lane < s) {
            partial[li] = partial[li] + partial[li + s * p.w];
        }
        workgroupBarrier();
        s = s / 2u;
    }

    if (lane == 0u && col < p.inner) {
        out[p.off_out + rel * p.inner + col] = partial[c] * p.alpha;
    }
}
