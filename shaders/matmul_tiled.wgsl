// matmul_tiled.wgsl — the second-generation matrix product: 128×128 output tiles, 8×8 outputs per
// invocation, vec4 loads from global and workgroup memory, double-buffered K slices with one
// barrier per step, and one pipeline per transpose case.
//
// Launcher: crates/tensor/src/ops/matmul.rs (the same `Params`, bindings and math as matmul.wgsl,
// which stays as the variant for every shape this one does not take; the f64 oracle is
// crates/tensor/src/reference.rs).
//
// Math, for every batch index z (workgroup_id.z) and 0 <= i < M, 0 <= j < N:
//   C[z, i, j] = (accumulate ? C[z, i, j] : 0) + (has_bias ? bias[j] : 0)
//              + alpha · Σ_{0 <= p < K} opA[z, i, p] · opB[z, p, j]
// with opA = A or Aᵀ (TRANS_A), opB = B or Bᵀ (TRANS_B), as in matmul.wgsl.
// Epilogues, one entry point each, as matmul.wgsl's (bindings 5 gelu_out and 6 gelu_in at
// off_aux, in C's layout): matmul_tiled (C = v), matmul_tiled_gelu (C = u = v, gelu_out =
// gelu(u)) and matmul_tiled_gelu_backward (C = v · gelu'(gelu_in)); each has the four
// transpose pipelines.
//
// What the launcher guarantees (ops/matmul.rs `tiled_fits`), so that every operand can be read
// as whole vec4s: every offset, leading dimension and batch stride is a multiple of 4, and so is
// the extent of each operand's contiguous axis (K or M for A, N or K for B, N for C and bias;
// off_aux too).
// A vec4 is then either wholly inside its matrix or wholly outside, and the tile edges only
// need whole-vec4 tests. Offsets and strides in `Params` are in f32 elements, as for
// matmul.wgsl; the kernel divides them by 4.
//
// Tiling. A workgroup of 16×16 = 256 invocations computes the 128×128 tile of C at
// (m0, n0) = (128·wg.y, 128·wg.x). It walks K in slices of BK = 8: the 128×8 slice of opA and
// the 8×128 slice of opB are 1,024 floats each, one vec4 of each per invocation. Both are stored
// k-major with the M (resp. N) axis in vec4s: sa[k][m/4], sb[k][n/4], so the inner loop reads two
// vec4s of each per k and does 64 multiply-adds with them.
// Invocation (tx, ty) owns rows {4ty..4ty+3} ∪ {64+4ty..64+4ty+3} and columns
// {4tx..4tx+3} ∪ {64+4tx..64+4tx+3} of the tile: the vec4s at sa[k][ty], sa[k][16+ty],
// sb[k][tx], sb[k][16+tx], so neighbouring invocations read neighbouring words.
// Double buffering: while the products of slice s run on one half of sa/sb, the vec4s of slice
// s+1 are already loaded from global memory into registers; they are stored into the other half
// after the products, and one barrier then separates both (no invocation still reads the half
// that the next step overwrites, and every store of the next slice is visible).
// Workgroup memory: 2 halves × 2 operands × 8 × 32 vec4s = 16 KiB, WebGPU's default limit.
// Grid: (ceil(N / 128), ceil(M / 128), batch).

struct Params {
    m: u32,
    n: u32,
    k: u32,
    trans_a: u32,    // unused here: TRANS_A below says it (the launcher sets both alike)
    trans_b: u32,
    lda: u32,
    ldb: u32,
    ldc: u32,
    off_a: u32,
    off_b: u32,
    off_c: u32,
    off_bias: u32,
    stride_a: u32,
    stride_b: u32,
    stride_c: u32,
    has_bias: u32,
    accumulate: u32,
    alpha: f32,      // scale of the product (not of the bias or of C's old value)
    off_aux: u32,    // where gelu_out / gelu_in start (same ldc and stride_c as C)
    _pad2: u32,
}

// One pipeline per transpose case: the branches on these fold away when the pipeline is made.
override TRANS_A: bool = false; // A is stored (K, M)
override TRANS_B: bool = false; // B is stored (N, K)
// B's storage, as in matmul.wgsl: f32 bits, or two f16 elements per u32 word (a frozen weight
// at half the bytes; off_b, ldb and stride_b count f16 elements, and the launcher pads the
// weight's words to whole vec4<u32>s).
override B_F16: bool = false;

const TILE: u32 = 128u;   // rows and columns of C per workgroup
const TILE4: u32 = 32u;   // TILE in vec4s
const BK: u32 = 8u;       // depth of one K slice
const HALF: u32 = 256u;   // vec4s in one half of sa (or sb): BK · TILE4

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> b: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read_write> c: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> bias: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> gelu_out: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read> gelu_in: array<vec4<f32>>;

var<workgroup> sa: array<vec4<f32>, 512>; // [half][k][m / 4]
var<workgroup> sb: array<vec4<f32>, 512>; // [half][k][n / 4]

// The vec4 of A this invocation loads for the slice at k0, and where it goes in sa:
// TRANS_A: 4 consecutive m at one k (stored as they are); else 4 consecutive k at one m
// (scattered into four vec4s' components).
fn load_a(z: u32, m0: u32, k0: u32, t: u32) -> vec4<f32> {
    let base = (p.off_a + z * p.stride_a) / 4u;
    if (TRANS_A) {
        let kk = k0 + t / TILE4;
        let i = m0 + 4u * (t % TILE4);
        if (kk >= p.k || i >= p.m) { return vec4<f32>(0.0); }
        return a[base + (kk * p.lda + i) / 4u];
    }
    let i = m0 + t / 2u;
    let kk = k0 + 4u * (t % 2u);
    if (i >= p.m || kk >= p.k) { return vec4<f32>(0.0); }
    return a[base + (i * p.lda + kk) / 4u];
}

fn store_a(half: u32, t: u32, v: vec4<f32>) {
    if (TRANS_A) {
        sa[half * HALF + t] = v; // t = k · 32 + m/4
        return;
    }
    let i = t / 2u;
    let kk = 4u * (t % 2u);
    for (var q = 0u; q < 4u; q++) {
        sa[half * HALF + (kk + q) * TILE4 + i / 4u][i % 4u] = v[q];
    }
}

// The i-th group of four consecutive elements of B: one vec4<u32> of f32 bits, or half of one
// holding eight f16 elements.
fn b4_at(i: u32) -> vec4<f32> {
    if (B_F16) {
        let w = b[i >> 1u];
        let h = select(w.xy, w.zw, (i & 1u) == 1u);
        return vec4<f32>(half_to_f32(h.x & 0xffffu), half_to_f32(h.x >> 16u),
                         half_to_f32(h.y & 0xffffu), half_to_f32(h.y >> 16u));
    }
    return bitcast<vec4<f32>>(b[i]);
}

fn load_b(z: u32, n0: u32, k0: u32, t: u32) -> vec4<f32> {
    let base = (p.off_b + z * p.stride_b) / 4u;
    if (TRANS_B) {
        let j = n0 + t / 2u;
        let kk = k0 + 4u * (t % 2u);
        if (j >= p.n || kk >= p.k) { return vec4<f32>(0.0); }
        return b4_at(base + (j * p.ldb + kk) / 4u);
    }
    let kk = k0 + t / TILE4;
    let j = n0 + 4u * (t % TILE4);
    if (kk >= p.k || j >= p.n) { return vec4<f32>(0.0); }
    return b4_at(base + (kk * p.ldb + j) / 4u);
}

fn store_b(half: u32, t: u32, v: vec4<f32>) {
    if (!TRANS_B) {
        sb[half * HALF + t] = v; // t = k · 32 + n/4
        return;
    }
    let j = t / 2u;
    let kk = 4u * (t % 2u);
    for (var q = 0u; q < 4u; q++) {
        sb[half * HALF + (kk + q) * TILE4 + j / 4u][j % 4u] = v[q];
    }
}

// The invocation's 8×8 block of sums Σ_p opA[z, i, p]·opB[z, p, j] (the layout of acc is
// described below). Every invocation of the workgroup calls it (it holds the barriers).
fn tile_product(wg: vec3<u32>, lid: vec3<u32>, t: u32) -> array<vec4<f32>, 16> {
    let z = wg.z;
    let m0 = wg.y * TILE;
    let n0 = wg.x * TILE;
    let tx = lid.x;
    let ty = lid.y;

    // acc[2r + h]: row r of the invocation's 8 (4ty + r for r < 4, 64 + 4ty + r − 4 after),
    // columns 4tx.. (h = 0) or 64 + 4tx.. (h = 1).
    var acc: array<vec4<f32>, 16>; // zero-initialised, as every WGSL `var`

    let steps = (p.k + BK - 1u) / BK;
    if (steps > 0u) {
        store_a(0u, t, load_a(z, m0, 0u, t));
        store_b(0u, t, load_b(z, n0, 0u, t));
    }
    workgroupBarrier();
    for (var s = 0u; s < steps; s++) {
        let cur = s % 2u;
        let more = s + 1u < steps;
        var next_a = vec4<f32>(0.0);
        var next_b = vec4<f32>(0.0);
        if (more) {
            next_a = load_a(z, m0, (s + 1u) * BK, t);
            next_b = load_b(z, n0, (s + 1u) * BK, t);
        }
        for (var kk = 0u; kk < BK; kk++) {
            let row = cur * HALF + kk * TILE4;
            let a0 = sa[row + ty];
            let a1 = sa[row + 16u + ty];
            let b0 = sb[row + tx];
            let b1 = sb[row + 16u + tx];
            for (var r = 0u; r < 4u; r++) {
                acc[2u * r] = fma(vec4<f32>(a0[r]), b0, acc[2u * r]);
                acc[2u * r + 1u] = fma(vec4<f32>(a0[r]), b1, acc[2u * r + 1u]);
                acc[8u + 2u * r] = fma(vec4<f32>(a1[r]), b0, acc[8u + 2u * r]);
                acc[8u + 2u * r + 1u] = fma(vec4<f32>(a1[r]), b1, acc[8u + 2u * r + 1u]);
            }
        }
        if (more) {
            store_a(1u - cur, t, next_a);
            store_b(1u - cur, t, next_b);
        }
        workgroupBarrier();
    }

    return acc;
}

// Row r (0..8) of invocation (tx, ty)'s block in the workgroup's tile, and the first of the four
// columns of its half h (0, 1).
fn row_of(wg: vec3<u32>, lid: vec3<u32>, r: u32) -> u32 {
    return wg.y * TILE + 4u * lid.y + (r % 4u) + 64u * (r / 4u);
}
fn col_of(wg: vec3<u32>, lid: vec3<u32>, h: u32) -> u32 {
    return wg.x * TILE + 4u * lid.x + 64u * h;
}

// The vec4 of C (and of gelu_out / gelu_in) holding elements (z, i, j..j+3), counted in vec4s
// from the matrix's start.
fn at_c(z: u32, i: u32, j: u32) -> u32 {
    return (z * p.stride_c + i * p.ldc + j) / 4u;
}

// v = α·sum + bias[j..j+3] + C's old value, for C's vec4 `at` (columns j..j+3).
fn combine(at: u32, j: u32, sum: vec4<f32>) -> vec4<f32> {
    var v = p.alpha * sum;
    if (p.has_bias != 0u) { v += bias[(p.off_bias + j) / 4u]; }
    if (p.accumulate != 0u) { v += c[p.off_c / 4u + at]; }
    return v;
}

@compute @workgroup_size(16, 16, 1)
fn matmul_tiled(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
                @builtin(local_invocation_index) t: u32) {
    let acc = tile_product(wg, lid, t);
    for (var r = 0u; r < 8u; r++) {
        let i = row_of(wg, lid, r);
        if (i >= p.m) { continue; }
        for (var h = 0u; h < 2u; h++) {
            let j = col_of(wg, lid, h);
            if (j >= p.n) { continue; }
            let at = at_c(wg.z, i, j);
            c[p.off_c / 4u + at] = combine(at, j, acc[2u * r + h]);
        }
    }
}

// C = u = v and gelu_out = gelu(u), four columns at a time.
@compute @workgroup_size(16, 16, 1)
fn matmul_tiled_gelu(@builtin(workgroup_id) wg: vec3<u32>,
                     @builtin(local_invocation_id) lid: vec3<u32>,
                     @builtin(local_invocation_index) t: u32) {
    let acc = tile_product(wg, lid, t);
    for (var r = 0u; r < 8u; r++) {
        let i = row_of(wg, lid, r);
        if (i >= p.m) { continue; }
        for (var h = 0u; h < 2u; h++) {
            let j = col_of(wg, lid, h);
            if (j >= p.n) { continue; }
            let at = at_c(wg.z, i, j);
            let u = combine(at, j, acc[2u * r + h]);
            c[p.off_c / 4u + at] = u;
            gelu_out[p.off_aux / 4u + at] =
                vec4<f32>(gelu_value(u.x), gelu_value(u.y), gelu_value(u.z), gelu_value(u.w));
        }
    }
}

// C = dU = v · gelu'(u), u read from gelu_in, four columns at a time.
@compute @workgroup_size(16, 16, 1)
fn matmul_tiled_gelu_backward(@builtin(workgroup_id) wg: vec3<u32>,
                              @builtin(local_invocation_id) lid: vec3<u32>,
                              @builtin(local_invocation_index) t: u32) {
    let acc = tile_product(wg, lid, t);
    for (var r = 0u; r < 8u; r++) {
        let i = row_of(wg, lid, r);
        if (i >= p.m) { continue; }
        for (var h = 0u; h < 2u; h++) {
            let j = col_of(wg, lid, h);
            if (j >= p.n) { continue; }
            let at = at_c(wg.z, i, j);
            let u = gelu_in[p.off_aux / 4u + at];
            let d = vec4<f32>(gelu_grad(u.x), gelu_grad(u.y), gelu_grad(u.z), gelu_grad(u.w));
            c[p.off_c / 4u + at] = combine(at, j, acc[2u * r + h]) * d;
        }
    }
}
