// permute.wgsl — attention head split and merge: copies between a slice of columns of a (B, T, W)
// tensor and a (B, NH, T, hs) tensor, C = NH·hs columns starting at col0.
//
// Launcher: crates/tensor/src/ops/permute.rs (CPU path beside it).
//
//   split_heads:  dst[b, h, t, d]              = src[b, t, col0 + h·hs + d]
//   merge_heads:  dst[b, t, col0 + h·hs + d]   = src[b, h, t, d]   (other columns of dst untouched)
//
// Bindings: 0 params; 1 src (split: (B, T, W); merge: (B, NH, T, hs));
//           2 dst (split: (B, NH, T, hs); merge: (B, T, W), written in place).
// Each binding is a range of whole batches b0 .. b0 + B of a larger buffer; `off_*` is where
// batch b0 starts inside it, and b below counts from b0.
// Workgroup: 256 invocations, one per written element, on a 2-D grid (one dimension holds at
// most 65,535 workgroups): i = (wg.y · num_workgroups.x + wg.x) · 256 + local, i < n = B·T·C.
//   split_heads: i is the row-major index of dst (b, h, t, d).
//   merge_heads: i is the row-major index of (b, t, j) over the C written columns, j = h·hs + d.

struct Params {
    n: u32,       // elements written by this dispatch: B·T·C
    t: u32,       // T
    w: u32,       // W: row width of the (B, T, W) tensor
    c: u32,       // C = NH·hs
    nh: u32,      // NH
    hs: u32,      // hs
    col0: u32,    // first column of the slice in the (B, T, W) tensor
    off_src: u32,
    off_dst: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;

@compute @workgroup_size(256)
fn split_heads(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) li: u32) {
    let i = flat_index(wg, nwg, li);
    if (i >= p.n) { return; }
    let d = i % p.hs;
    let q = i / p.hs;        // (b·NH + h)·T + t
    let t = q % p.t;
    let bh = q / p.t;
    let h = bh % p.nh;
    let b = bh / p.nh;
    dst[p.off_dst + i] = src[p.off_src + (b * p.t + t) * p.w + p.col0 + h * p.hs + d];
}

@compute @workgroup_size(256)
fn merge_heads(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) li: u32) {
    let i = flat_index(wg, nwg, li);
    if (i >= p.n) { return; }
    let j = i % p.c;
    let bt = i / p.c;        // b·T + t
    let h = j / p.hs;
    let d = j % p.hs;
    let t = bt % p.t;
    let b = bt / p.t;
    dst[p.off_dst + bt * p.w + p.col0 + j] = src[p.off_src + ((b * p.nh + h) * p.t + t) * p.hs + d];
}
