// embedding.wgsl — token embedding: a gather (forward) and its scatter-add (backward).
//
// Launcher: crates/tensor/src/ops/embedding.rs (CPU path beside it).
//
//   embedding_forward:   out[n, c]    = table[ids[n], c]
//   embedding_backward:  dtable[v, c] = dtable[v, c] + Σ_{n in this dispatch : ids[n] = v} dout[n, c]
//                        (dtable is zero-filled by the launcher before the first dispatch)
//
// WGSL has no float atomics, so the scatter-add is made race-free on the host: the launcher sorts
// the positions by token and cuts them into one *segment* per dispatch (a range of rows of
// out/dout times a range of vocabulary rows of table/dtable, each small enough for one storage
// binding). A segment is a small CSR index:
//   tokens[t]                              the t-th distinct token of the segment (ascending)
//   positions[offsets[t] .. offsets[t+1]]  its positions, ascending, relative to the first row
//                                          of the bound out/dout range
// One workgroup owns one distinct token, so no two workgroups ever write the same row, and each
// row of dtable is summed in ascending position order: the result is deterministic (and, segment
// after segment, equal bit for bit to the sequential CPU loop).
//
// Bindings (every array is a bound range; `off_*` is where its data starts inside it):
//   0 params
//   1 tokens    (segment tokens)            array<u32>
//   2 offsets   (segment tokens + 1)        array<u32>
//   3 positions (segment positions)         array<u32>
//   4 table     (vocab rows of chunk, C)    forward input
//   5 out       (rows of chunk, C)          forward output
//   6 dout      (rows of chunk, C)          backward input
//   7 dtable    (vocab rows of chunk, C)    backward output (read-modify-write)
//
// Workgroup: 64 invocations; workgroup t = wg.y * num_workgroups.x + wg.x handles tokens[t]
// (a 2-D grid, since one dimension holds at most 65,535 workgroups); invocation `li` handles
// columns c = li, li + 64, li + 128, ... < C.

struct Params {
    tokens: u32,         // distinct tokens in this dispatch (= workgroups that do work)
    cols: u32,           // C
    v0: u32,             // vocabulary row of the first bound table/dtable row
    off_tokens: u32,
    off_offsets: u32,
    off_positions: u32,
    off_rows: u32,       // out (forward) or dout (backward)
    off_table: u32,      // table (forward) or dtable (backward)
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> tokens: array<u32>;
@group(0) @binding(2) var<storage, read> offsets: array<u32>;
@group(0) @binding(3) var<storage, read> positions: array<u32>;
@group(0) @binding(4) var<storage, read> table: array<f32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;
@group(0) @binding(6) var<storage, read> dout: array<f32>;
@group(0) @binding(7) var<storage, read_write> dtable: array<f32>;

const TOKEN_WG: u32 = 64u;

@compute @workgroup_size(64)
fn embedding_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) li: u32) {
    let t = group_index(wg, nwg);
    if (t >= p.tokens) { return; }
    let row = p.off_table + (tokens[p.off_tokens + t] - p.v0) * p.cols;
    let start = offsets[p.off_offsets + t];
    let end = offsets[p.off_offsets + t + 1u];
    for (var c = li; c < p.cols; c += TOKEN_WG) {
        let value = table[row + c];
        for (var k = start; k < end; k++) {
            out[p.off_rows + positions[p.off_positions + k] * p.cols + c] = value;
        }
    }
}

@compute @workgroup_size(64)
fn embedding_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) li: u32) {
    let t = group_index(wg, nwg);
    if (t >= p.tokens) { return; }
    let row = p.off_table + (tokens[p.off_tokens + t] - p.v0) * p.cols;
    let start = offsets[p.off_offsets + t];
    let end = offsets[p.off_offsets + t + 1u];
    for (var c = li; c < p.cols; c += TOKEN_WG) {
        var acc = dtable[row + c];
        for (var k = start; k < end; k++) {
            acc += dout[p.off_rows + positions[p.off_positions + k] * p.cols + c];
        }
        dtable[row + c] = acc;
    }
}
