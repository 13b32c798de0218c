// attention.wgsl — fused causal attention (flash-attention), forward and backward.
//
// Launcher: crates/tensor/src/ops/attention.rs (the math in its doc comment; CPU path beside it).
//
// qkv is (nb, T, 3C) for the nb sequences of this dispatch: q of head h at columns h·hs + d,
// k at C + h·hs + d, v at 2C + h·hs + d. y, dy are (nb, T, C); lse and D ("dsum") are
// (nb, NH, T). bh = b·NH + h numbers the (sequence, head) pairs.
//
// Tiles: TR = 16 rows (queries or keys), DC = 64 columns of hs. A workgroup of 256 = 16 × 16
// invocations owns one (tile, bh, column chunk): group g = (bh·tiles + tile)·chunks + chunk.
// Scores of a 16 × 16 block are computed with invocation li taking one (query, key) pair, the
// dot products summed over hs in DC-wide slices loaded into workgroup memory (ta, tb). The
// accumulators of a workgroup's 64 columns live in registers: invocation li owns row li / 16
// and columns li % 16 + 16·n, n < 4. Every workgroup recomputes the scores in full, so with
// hs > 64 the chunks share the score work and each writes its own columns.
//
//   attention_forward:        per query tile, key tiles 0 ..= tile (later ones are all above
//                             the diagonal); online softmax (m, l, acc) as in the module doc;
//                             writes y (out) and, from chunk 0, lse (lse_out).
//   attention_backward_dsum:  D_i = Σ_d dy_id·y_id, one invocation per row of (nb, NH, T).
//   attention_backward_dkdv:  per key tile, query tiles tile .. tiles − 1; P = exp(s·q·k − lse),
//                             dP = dy·v, dS = P·(dP − D); dv += Pᵀ·dy, dk += s·dSᵀ·q.
//   attention_backward_dq:    per query tile, key tiles 0 ..= tile; dq += s·dS·k.
// The two backward passes write disjoint columns of out (dk, dv; dq), each element by one
// invocation, so no atomics are needed.
//
// Bindings: 0 params; 1 qkv; 2 y; 3 dy; 4 lse; 5 dsum (read); 6 out (y or d(qkv), read_write);
// 7 lse_out; 8 dsum_out. Each entry point uses only some of them.

struct Params {
    t: u32,          // T
    nh: u32,         // NH
    hs: u32,         // head width
    c: u32,          // C = NH·hs
    scale: f32,      // s, the factor of the scores
    tiles: u32,      // ceil(T / 16)
    chunks: u32,     // ceil(hs / 64)
    groups: u32,     // workgroups with work: nb·NH·tiles·chunks
    off_qkv: u32,
    off_y: u32,
    off_dy: u32,
    off_lse: u32,
    off_dsum: u32,
    off_out: u32,
    off_lse_out: u32,
    rows: u32,       // nb·NH·T, the rows of lse and D
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> qkv: array<f32>;
@group(0) @binding(2) var<storage, read> y: array<f32>;
@group(0) @binding(3) var<storage, read> dy: array<f32>;
@group(0) @binding(4) var<storage, read> lse: array<f32>;
@group(0) @binding(5) var<storage, read> dsum: array<f32>;
@group(0) @binding(6) var<storage, read_write> out: array<f32>;
@group(0) @binding(7) var<storage, read_write> lse_out: array<f32>;
@group(0) @binding(8) var<storage, read_write> dsum_out: array<f32>;

const TR: u32 = 16u;
const DC: u32 = 64u;
const TILE: u32 = 1024u;   // TR · DC

var<workgroup> ta: array<f32, 1024>;
var<workgroup> tb: array<f32, 1024>;
var<workgroup> ps: array<f32, 256>;
var<workgroup> ds: array<f32, 256>;

// The workgroup's (tile, bh, chunk).
struct Job {
    tile: u32,
    b: u32,
    h: u32,
    chunk: u32,
}

fn job(g: u32) -> Job {
    let chunk = g % p.chunks;
    let rest = g / p.chunks;
    let bh = rest / p.tiles;
    return Job(rest % p.tiles, bh / p.nh, bh % p.nh, chunk);
}

// Rows row0 .. row0 + 15 of sequence b, columns col0 + d (d < DC) of part `part` (0 q, 1 k,
// 2 v) of head h, into ta (dst 0) or tb (dst 1); 0 for rows ≥ T and columns ≥ hs.
fn load_qkv(dst: u32, part: u32, jb: Job, row0: u32, col0: u32, li: u32) {
    for (var e = li; e < TILE; e += WG) {
        let row = row0 + e / DC;
        let col = col0 + e % DC;
        var v = 0.0;
        if (row < p.t && col < p.hs) {
            v = qkv[p.off_qkv + (jb.b * p.t + row) * 3u * p.c + part * p.c + jb.h * p.hs + col];
        }
        if (dst == 0u) { ta[e] = v; } else { tb[e] = v; }
    }
}

// The same for rows of dy, into ta.
fn load_dy(jb: Job, row0: u32, col0: u32, li: u32) {
    for (var e = li; e < TILE; e += WG) {
        let row = row0 + e / DC;
        let col = col0 + e % DC;
        var v = 0.0;
        if (row < p.t && col < p.hs) {
            v = dy[p.off_dy + (jb.b * p.t + row) * p.c + jb.h * p.hs + col];
        }
        ta[e] = v;
    }
}

// q_i·k_j over all of hs: i is row qr of query tile qt, j row kr of key tile kt. Ends with a
// barrier, after which ta and tb are free.
fn score(jb: Job, qt: u32, kt: u32, qr: u32, kr: u32, li: u32) -> f32 {
    var s = 0.0;
    for (var d0 = 0u; d0 < p.hs; d0 += DC) {
        load_qkv(0u, 0u, jb, qt * TR, d0, li);
        load_qkv(1u, 1u, jb, kt * TR, d0, li);
        workgroupBarrier();
        for (var d = 0u; d < DC; d++) { s += ta[qr * DC + d] * tb[kr * DC + d]; }
        workgroupBarrier();
    }
    return s;
}

// dy_i·v_j over all of hs, i and j as in `score`.
fn dy_dot_v(jb: Job, qt: u32, kt: u32, qr: u32, kr: u32, li: u32) -> f32 {
    var s = 0.0;
    for (var d0 = 0u; d0 < p.hs; d0 += DC) {
        load_dy(jb, qt * TR, d0, li);
        load_qkv(1u, 2u, jb, kt * TR, d0, li);
        workgroupBarrier();
        for (var d = 0u; d < DC; d++) { s += ta[qr * DC + d] * tb[kr * DC + d]; }
        workgroupBarrier();
    }
    return s;
}

// dS_ij = P_ij·(dP_ij − D_i) with P_ij = exp(s·score − lse_i), for a pair the mask keeps.
fn dscore(jb: Job, i: u32, s: f32, dp: f32) -> vec2<f32> {
    let row = (jb.b * p.nh + jb.h) * p.t + i;
    let pv = exp(p.scale * s - lse[p.off_lse + row]);
    return vec2<f32>(pv, pv * (dp - dsum[p.off_dsum + row]));
}

@compute @workgroup_size(256)
fn attention_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) li: u32) {
    let g = group_index(wg, nwg);
    if (g >= p.groups) { return; }
    let jb = job(g);
    let r = li / TR;        // query row in the tile
    let kc = li % TR;       // key in the tile (scores), column lane (accumulators)
    let i = jb.tile * TR + r;
    let col0 = jb.chunk * DC;
    var m = LOWEST;
    var l = 0.0;
    var acc = array<f32, 4>(0.0, 0.0, 0.0, 0.0);
    for (var kt = 0u; kt <= jb.tile; kt++) {
        let s = p.scale * score(jb, jb.tile, kt, r, kc, li);
        let keep = i < p.t && kt * TR + kc <= i;
        ps[li] = select(LOWEST, s, keep);
        workgroupBarrier();
        var tmax = LOWEST;
        for (var n = 0u; n < TR; n++) { tmax = max(tmax, ps[r * TR + n]); }
        let m_new = max(m, tmax);
        let alpha = exp(m - m_new);
        workgroupBarrier();
        ps[li] = select(0.0, exp(s - m_new), keep);
        load_qkv(1u, 2u, jb, kt * TR, col0, li);
        workgroupBarrier();
        var sum = 0.0;
        for (var n = 0u; n < TR; n++) { sum += ps[r * TR + n]; }
        l = alpha * l + sum;
        m = m_new;
        for (var a = 0u; a < 4u; a++) {
            let d = kc + a * TR;
            var v = acc[a] * alpha;
            for (var n = 0u; n < TR; n++) { v += ps[r * TR + n] * tb[n * DC + d]; }
            acc[a] = v;
        }
        workgroupBarrier();
    }
    if (i < p.t) {
        let base = p.off_out + (jb.b * p.t + i) * p.c + jb.h * p.hs;
        for (var a = 0u; a < 4u; a++) {
            let col = col0 + kc + a * TR;
            if (col < p.hs) { out[base + col] = acc[a] / l; }
        }
        if (jb.chunk == 0u && kc == 0u) {
            lse_out[p.off_lse_out + (jb.b * p.nh + jb.h) * p.t + i] = m + log(l);
        }
    }
}

@compute @workgroup_size(256)
fn attention_backward_dsum(@builtin(workgroup_id) wg: vec3<u32>,
                           @builtin(num_workgroups) nwg: vec3<u32>,
                           @builtin(local_invocation_index) li: u32) {
    let n = flat_index(wg, nwg, li);
    if (n >= p.rows) { return; }
    let i = n % p.t;
    let bh = n / p.t;
    let base = ((bh / p.nh) * p.t + i) * p.c + (bh % p.nh) * p.hs;
    var s = 0.0;
    for (var d = 0u; d < p.hs; d++) { s += dy[p.off_dy + base + d] * y[p.off_y + base + d]; }
    dsum_out[p.off_dsum + n] = s;
}

@compute @workgroup_size(256)
fn attention_backward_dkdv(@builtin(workgroup_id) wg: vec3<u32>,
                           @builtin(num_workgroups) nwg: vec3<u32>,
                           @builtin(local_invocation_index) li: u32) {
    let g = group_index(wg, nwg);
    if (g >= p.groups) { return; }
    let jb = job(g);
    let kt = jb.tile;
    let kr = li / TR;       // key row in the tile
    let lane = li % TR;     // query row in the tile (scores), column lane (accumulators)
    let j = kt * TR + kr;
    let col0 = jb.chunk * DC;
    var dk = array<f32, 4>(0.0, 0.0, 0.0, 0.0);
    var dv = array<f32, 4>(0.0, 0.0, 0.0, 0.0);
    for (var qt = kt; qt < p.tiles; qt++) {
        let i = qt * TR + lane;
        let s = score(jb, qt, kt, lane, kr, li);
        let dp = dy_dot_v(jb, qt, kt, lane, kr, li);
        var pd = vec2<f32>(0.0, 0.0);
        if (i < p.t && j <= i) { pd = dscore(jb, i, s, dp); }
        ps[lane * TR + kr] = pd.x;
        ds[lane * TR + kr] = pd.y;
        load_dy(jb, qt * TR, col0, li);
        load_qkv(1u, 0u, jb, qt * TR, col0, li);
        workgroupBarrier();
        for (var a = 0u; a < 4u; a++) {
            let d = lane + a * TR;
            var x = dv[a];
            var z = dk[a];
            for (var n = 0u; n < TR; n++) {
                x += ps[n * TR + kr] * ta[n * DC + d];
                z += ds[n * TR + kr] * tb[n * DC + d];
            }
            dv[a] = x;
            dk[a] = z;
        }
        workgroupBarrier();
    }
    if (j < p.t) {
        let base = p.off_out + (jb.b * p.t + j) * 3u * p.c + jb.h * p.hs;
        for (var a = 0u; a < 4u; a++) {
            let col = col0 + lane + a * TR;
            if (col < p.hs) {
                out[base + p.c + col] = p.scale * dk[a];
                out[base + 2u * p.c + col] = dv[a];
            }
        }
    }
}

@compute @workgroup_size(256)
fn attention_backward_dq(@builtin(workgroup_id) wg: vec3<u32>,
                         @builtin(num_workgroups) nwg: vec3<u32>,
                         @builtin(local_invocation_index) li: u32) {
    let g = group_index(wg, nwg);
    if (g >= p.groups) { return; }
    let jb = job(g);
    let qt = jb.tile;
    let r = li / TR;        // query row in the tile
    let kc = li % TR;       // key in the tile (scores), column lane (accumulators)
    let i = qt * TR + r;
    let col0 = jb.chunk * DC;
    var dq = array<f32, 4>(0.0, 0.0, 0.0, 0.0);
    for (var kt = 0u; kt <= qt; kt++) {
        let s = score(jb, qt, kt, r, kc, li);
        let dp = dy_dot_v(jb, qt, kt, r, kc, li);
        var pd = vec2<f32>(0.0, 0.0);
        if (i < p.t && kt * TR + kc <= i) { pd = dscore(jb, i, s, dp); }
        ds[li] = pd.y;
        load_qkv(1u, 1u, jb, kt * TR, col0, li);
        workgroupBarrier();
        for (var a = 0u; a < 4u; a++) {
            let d = kc + a * TR;
            var x = dq[a];
            for (var n = 0u; n < TR; n++) { x += ds[r * TR + n] * tb[n * DC + d]; }
            dq[a] = x;
        }
        workgroupBarrier();
    }
    if (i < p.t) {
        let base = p.off_out + (jb.b * p.t + i) * 3u * p.c + jb.h * p.hs;
        for (var a = 0u; a < 4u; a++) {
            let col = col0 + kc + a * TR;
            if (col < p.hs) { out[base + col] = p.scale * dq[a]; }
        }
    }
}
