// slice.wgsl — a range of one axis: read it out, or write (or add) into it.
//
// Launcher: crates/tensor/src/ops/slice.rs (CPU path beside it).
//
// The big tensor `big` is viewed as (outer, A, inner) around the axis; the small one `small` is
// (outer, len, inner). With s = start:
//   slice_read:       small[o, i, j]  = big[o, s + i, j]
//   slice_write:      big[o, s + i, j] = small[o, i, j]
//   slice_accumulate: big[o, s + i, j] = big[o, s + i, j] + small[o, i, j]
//
// Bindings: 0 params; 1 big (outer·A·inner, read-write; read-only as `big_in` for slice_read);
// 2 small (outer·len·inner). Both are bound ranges; off_* is where the data starts.
// One invocation per element of `small` (n = outer·len·inner in this dispatch), 256 per
// workgroup on a 2-D grid: idx = (wg.y * num_workgroups.x + wg.x) * 256 + local.

struct Params {
    n: u32,        // elements of `small` in this dispatch
    axis_len: u32, // A
    len: u32,
    inner: u32,
    start: u32,
    off_big: u32,
    off_small: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> big: array<f32>;
@group(0) @binding(2) var<storage, read_write> small: array<f32>;

// Index into `big` of element `idx` of `small`.
fn big_index(idx: u32) -> u32 {
    let per_outer = p.len * p.inner;
    let o = idx / per_outer;
    let rem = idx % per_outer;
    let i = rem / p.inner;
    let j = rem % p.inner;
    return p.off_big + (o * p.axis_len + p.start + i) * p.inner + j;
}

@compute @workgroup_size(256)
fn slice_read(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) li: u32) {
    let idx = flat_index(wg, nwg, li);
    if (idx >= p.n) { return; }
    small[p.off_small + idx] = big[big_index(idx)];
}

@compute @workgroup_size(256)
fn slice_write(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) li: u32) {
    let idx = flat_index(wg, nwg, li);
    if (idx >= p.n) { return; }
    big[big_index(idx)] = small[p.off_small + idx];
}

@compute @workgroup_size(256)
fn slice_accumulate(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) li: u32) {
    let idx = flat_index(wg, nwg, li);
    if (idx >= p.n) { return; }
    let k = big_index(idx);
    big[k] = big[k] + small[p.off_small + idx];
}
