// elementwise.wgsl — element-by-element ops over flat f32 arrays.
//
// Launcher: crates/tensor/src/ops/elementwise.rs (CPU path beside it).
//
//   fill:      out[i] = alpha
//   add:       out[i] = a[i] + b[i]
//   mul:       out[i] = a[i] * b[i]
//   scale:     out[i] = alpha * a[i]
//   axpy:      out[i] = out[i] + alpha * a[i]          (in place: gradient accumulation)
//   add_bias:  out[r, c] = a[r, c] + b[c]               (a: (rows, cols), b: (cols))
//   scale_by:  out[i] = b[0] * (alpha * a[i])           (b: (1), a scale that stays on the GPU;
//                                                        alpha a constant folded in, 1 for none)
//
// Bindings: 0 params; 1 a (n); 2 b (n, or cols for add_bias); 3 out (n).
// Each array is a bound *range* of a larger buffer; `off_*` is where the data starts inside it.
// Workgroup: 256 invocations, one element each, on a 2-D grid (one dimension holds at most
// 65,535 workgroups): i = (wg.y * num_workgroups.x + wg.x) * 256 + local.

struct Params {
    n: u32,        // elements in this dispatch
    cols: u32,     // add_bias: row length (C)
    off_a: u32,
    off_b: u32,
    off_out: u32,
    col0: u32,     // add_bias: column of the first element (a chunk may start mid-row)
    alpha: f32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(256)
fn fill(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let i = flat_index(wg, nwg, li);
    if (i >= p.n) { return; }
    out[p.off_out + i] = p.alpha;
}

@compute @workgroup_size(256)
fn add(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
       @builtin(local_invocation_index) li: u32) {
    let i = flat_index(wg, nwg, li);
    if (i >= p.n) { return; }
    out[p.off_out + i] = a[p.off_a + i] + b[p.off_b + i];
}

@compute @workgroup_size(256)
fn mul(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
       @builtin(local_invocation_index) li: u32) {
    let i = flat_index(wg, nwg, li);
    if (i >= p.n) { return; }
    out[p.off_out + i] = a[p.off_a + i] * b[p.off_b + i];
}

@compute @workgroup_size(256)
fn scale(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_index) li: u32) {
    let i = flat_index(wg, nwg, li);
    if (i >= p.n) { return; }
    out[p.off_out + i] = p.alpha * a[p.off_a + i];
}

@compute @workgroup_size(256)
fn axpy(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let i = flat_index(wg, nwg, li);
    if (i >= p.n) { return; }
    out[p.off_out + i] = out[p.off_out + i] + p.alpha * a[p.off_a + i];
}

@compute @workgroup_size(256)
fn add_bias(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) li: u32) {
    let i = flat_index(wg, nwg, li);
    if (i >= p.n) { return; }
    let c = (p.col0 + i) % p.cols;
    out[p.off_out + i] = a[p.off_a + i] + b[p.off_b + c];
}

@compute @workgroup_size(256)
fn scale_by(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) li: u32) {
    let i = flat_index(wg, nwg, li);
    if (i >= p.n) { return; }
    out[p.off_out + i] = b[p.off_b] * (p.alpha * a[p.off_a + i]);
}
