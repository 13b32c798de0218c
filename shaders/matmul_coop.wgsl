// matmul_coop.wgsl — the matrix product on cooperative matrices: the adapter's matrix units
// (tensor cores, Apple's simdgroup matrices) do the multiply-adds, a subgroup at a time.
//
// Launcher: crates/tensor/src/ops/matmul_coop.rs (feature detection, the configuration choice
// and the dispatch; the f64 oracle is crates/tensor/src/reference.rs). The same `Params`,
// bindings, math and epilogues as matmul.wgsl, so the launcher of ops/matmul.rs binds it as it
// binds the other products.
//
// Math, for every batch index z (workgroup_id.z) and 0 <= i < M, 0 <= j < N:
//   C[z, i, j] = (accumulate ? C[z, i, j] : 0) + (has_bias ? bias[j] : 0)
//              + alpha · Σ_{0 <= p < K} opA[z, i, p] · opB[z, p, j]
// with opA = A or Aᵀ (trans_a), opB = B or Bᵀ (trans_b), and every offset, leading dimension
// and batch stride as in matmul.wgsl (binding 2 holds f32 bits, or with B_F16 two f16 elements
// per u32 word, counted in f16 elements).
//
// Configuration. This file is not a module on its own: the registry (crates/tensor/src/
// shaders.rs) puts before it the `enable` directives, the prelude common.wgsl and a header
// that defines, for one configuration the adapter offers,
//   Stage             the scalar type of the staged operands (f32, or f16),
//   FragA/FragB/FragC the fragment types coop_mat<FRAG>x<FRAG> of roles A, B, C (C in f32),
//   FRAG              the fragment side (8 or 16).
// f32 8×8: Stage = f32, every operand exact, so the result is the f32 product up to the order
// of the sums. f16 16×16 (taken only for a B stored in f16): B's halves are staged as they are
// stored (exact), A's f32 elements are rounded to f16 while staging (a relative error of at
// most 2⁻¹⁰ each, subnormal below 6.1e-5 with an absolute error of at most 2⁻²⁴), and every
// sum is in f32 (FragC).
//
// Tiling. A workgroup of 64 invocations computes the 32×32 tile of C at (m0, n0) =
// (32·wg.y, 32·wg.x): (32 / FRAG)² fragments, FRAGS = 16 of 8×8 or 4 of 16×16. It walks K in
// slices of BK = 32: the 32×32 slice of opA is staged row-major [m][k] in sa and that of opB
// row-major [k][n] in sb (16 elements of each per invocation, zero outside the matrix, so M, N
// and K need not be multiples of anything), then a barrier. Cooperative operations work on a
// whole subgroup: subgroup s of the workgroup's num_subgroups owns fragments s, s + nsg, … and
// keeps their sums in registers (acc[r] for its r-th fragment) over the whole K walk; for each
// it loads BK / FRAG fragments of sa (role A, row stride BK) and of sb (role B, row stride
// TILE) and multiply-adds them. After the last slice each subgroup stores its sums into sc
// (32×32 f32, row-major), and after a barrier every invocation writes 16 elements of C
// through the epilogue, bounds-checked there.
//
// Uniformity: the cooperative operations are reached by whole subgroups (the control flow
// depends only on subgroup_id, num_subgroups and uniforms), which is what they need; naga's
// analysis counts subgroup_id as non-uniform, so the functions that hold them turn its
// derivative_uniformity diagnostic off. The launcher offers this kernel only where the
// adapter's subgroups are at most 64 wide and divide 64, so every subgroup is full.
// Workgroup memory: sa and sb 32·32 Stage each, sc 32·32 f32: 12 KiB (f32) or 8 KiB (f16),
// under WebGPU's default 16 KiB.
// Grid: (ceil(N / 32), ceil(M / 32), batch).

struct Params {
    m: u32,
    n: u32,
    k: u32,
    trans_a: u32,    // 1: A is stored (K, M)
    trans_b: u32,    // 1: B is stored (N, K)
    lda: u32,        // elements between stored rows of A
    ldb: u32,
    ldc: u32,
    off_a: u32,
    off_b: u32,
    off_c: u32,
    off_bias: u32,
    stride_a: u32,   // elements between batch entries; 0 for a B shared by the batch
    stride_b: u32,
    stride_c: u32,
    has_bias: u32,
    accumulate: u32, // 1: C += product; 0: C = product
    alpha: f32,      // scale of the product (not of the bias or of C's old value)
    off_aux: u32,    // where gelu_out / gelu_in start (same ldc and stride_c as C)
    _pad2: u32,
}

// How B's words hold its elements (one pipeline each; the branch folds away when it is made).
override B_F16: bool = false;

const TILE: u32 = 32u;            // rows and columns of C per workgroup
const BK: u32 = 32u;              // depth of one staged K slice
const THREADS: u32 = 64u;         // invocations per workgroup
const LOADS: u32 = 16u;           // TILE · BK / THREADS elements of each slice per invocation
const SIDE: u32 = TILE / FRAG;    // fragments along each side of the tile
const FRAGS: u32 = SIDE * SIDE;   // fragments of the tile

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<u32>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;
@group(0) @binding(4) var<storage, read> bias: array<f32>;
@group(0) @binding(5) var<storage, read_write> gelu_out: array<f32>;
@group(0) @binding(6) var<storage, read> gelu_in: array<f32>;

var<workgroup> sa: array<Stage, 1024>; // [m][k], TILE × BK
var<workgroup> sb: array<Stage, 1024>; // [k][n], BK × TILE
var<workgroup> sc: array<f32, 1024>;   // [m][n], TILE × TILE: the sums, for the epilogue

// opA[z, i, p] as a Stage, 0 outside the matrix.
fn load_a(z: u32, i: u32, kp: u32) -> Stage {
    if (i >= p.m || kp >= p.k) { return Stage(0.0); }
    let base = p.off_a + z * p.stride_a;
    if (p.trans_a == 0u) { return Stage(a[base + i * p.lda + kp]); }
    return Stage(a[base + kp * p.lda + i]);
}

// B's element e as a Stage: its f32 bits, or the f16 half of word e/2 that holds it (widened
// exactly by the prelude's half_to_f32, so an f16 Stage gets the stored half back unchanged).
fn b_at(e: u32) -> Stage {
    if (B_F16) { return Stage(half_to_f32((b[e >> 1u] >> (16u * (e & 1u))) & 0xffffu)); }
    return Stage(bitcast<f32>(b[e]));
}

// opB[z, p, j] as a Stage, 0 outside the matrix.
fn load_b(z: u32, kp: u32, j: u32) -> Stage {
    if (kp >= p.k || j >= p.n) { return Stage(0.0); }
    let base = p.off_b + z * p.stride_b;
    if (p.trans_b == 0u) { return b_at(base + kp * p.ldb + j); }
    return b_at(base + j * p.ldb + kp);
}

// Stage the K slice at k0 of the workgroup's tile. Element e = li + 64·q of each slice: along
// the stored rows, so neighbouring invocations read neighbouring words of A and B.
fn stage_slice(z: u32, m0: u32, n0: u32, k0: u32, li: u32) {
    for (var q = 0u; q < LOADS; q++) {
        let e = li + q * THREADS;
        if (p.trans_a == 0u) {
            sa[e] = load_a(z, m0 + e / BK, k0 + e % BK);            // (i, kk) = (e / BK, e % BK)
        } else {
            sa[(e % TILE) * BK + e / TILE] = load_a(z, m0 + e % TILE, k0 + e / TILE);
        }
        if (p.trans_b == 0u) {
            sb[e] = load_b(z, k0 + e / TILE, n0 + e % TILE);        // (kk, j) = (e / TILE, e % TILE)
        } else {
            sb[(e % BK) * TILE + e / BK] = load_b(z, k0 + e % BK, n0 + e / BK);
        }
    }
}

// The sums Σ_p opA[z, i, p]·opB[z, p, j] of the workgroup's tile, left in sc. Every invocation
// of the workgroup calls it (it holds the barriers); subgroup sg of nsg computes fragments
// sg, sg + nsg, ….
@diagnostic(off, derivative_uniformity)
fn tile_product(wg: vec3<u32>, li: u32, sg: u32, nsg: u32) {
    let m0 = wg.y * TILE;
    let n0 = wg.x * TILE;
    // acc[r]: the sums of fragment sg + r·nsg (row fragment f / SIDE, column fragment f % SIDE).
    var acc: array<FragC, FRAGS>;
    for (var r = 0u; r < FRAGS; r++) {
        acc[r] = FragC();
    }
    for (var k0 = 0u; k0 < p.k; k0 += BK) {
        stage_slice(wg.z, m0, n0, k0, li);
        workgroupBarrier();
        for (var r = 0u; r < FRAGS; r++) {
            let f = sg + r * nsg;
            if (f >= FRAGS) { break; }
            let at_a = (f / SIDE) * FRAG * BK;      // sa[fm·FRAG][0]
            let at_b = (f % SIDE) * FRAG;           // sb[0][fn·FRAG]
            for (var kk = 0u; kk < BK; kk += FRAG) {
                let fa = coopLoadT<FragA>(&sa[at_a + kk], BK);
                let fb = coopLoadT<FragB>(&sb[at_b + kk * TILE], TILE);
                acc[r] = coopMultiplyAdd(fa, fb, acc[r]);
            }
        }
        workgroupBarrier();   // every fragment is read before the next slice overwrites sa, sb
    }
    for (var r = 0u; r < FRAGS; r++) {
        let f = sg + r * nsg;
        if (f >= FRAGS) { break; }
        coopStoreT(acc[r], &sc[(f / SIDE) * FRAG * TILE + (f % SIDE) * FRAG], TILE);
    }
    workgroupBarrier();
}

// Element (z, i, j) of C (and of gelu_out / gelu_in) counted from the matrix's start.
fn at_c(z: u32, i: u32, j: u32) -> u32 {
    return z * p.stride_c + i * p.ldc + j;
}

// v = α·sum + bias[j] + C's old value, for C's element `at` (column j).
fn combine(at: u32, j: u32, sum: f32) -> f32 {
    var v = p.alpha * sum;
    if (p.has_bias != 0u) { v += bias[p.off_bias + j]; }
    if (p.accumulate != 0u) { v += c[p.off_c + at]; }
    return v;
}

// The q-th of the 16 outputs of invocation li: tile row e / TILE, column e % TILE (neighbouring
// invocations write neighbouring columns), and whether it lies inside C.
fn out_of(wg: vec3<u32>, li: u32, q: u32) -> vec3<u32> {
    let e = li + q * THREADS;
    let i = wg.y * TILE + e / TILE;
    let j = wg.x * TILE + e % TILE;
    return vec3<u32>(i, j, u32(i < p.m && j < p.n));
}

@compute @workgroup_size(64, 1, 1)
fn matmul_coop(@builtin(workgroup_id) wg: vec3<u32>,
               @builtin(local_invocation_index) li: u32,
               @builtin(subgroup_id) sg: u32, @builtin(num_subgroups) nsg: u32) {
    tile_product(wg, li, sg, nsg);
    for (var q = 0u; q < LOADS; q++) {
        let o = out_of(wg, li, q);
        if (o.z == 0u) { continue; }
        let at = at_c(wg.z, o.x, o.y);
        c[p.off_c + at] = combine(at, o.y, sc[li + q * THREADS]);
    }
}

// C = u = v and gelu_out = gelu(u): the forward of a linear layer followed by GELU.
@compute @workgroup_size(64, 1, 1)
fn matmul_coop_gelu(@builtin(workgroup_id) wg: vec3<u32>,
                    @builtin(local_invocation_index) li: u32,
                    @builtin(subgroup_id) sg: u32, @builtin(num_subgroups) nsg: u32) {
    tile_product(wg, li, sg, nsg);
    for (var q = 0u; q < LOADS; q++) {
        let o = out_of(wg, li, q);
        if (o.z == 0u) { continue; }
        let at = at_c(wg.z, o.x, o.y);
        let u = combine(at, o.y, sc[li + q * THREADS]);
        c[p.off_c + at] = u;
        gelu_out[p.off_aux + at] = gelu_value(u);
    }
}

// C = dU = v · gelu'(u), u read from gelu_in: the backward through GELU of dG = dY·W2ᵀ.
@compute @workgroup_size(64, 1, 1)
fn matmul_coop_gelu_backward(@builtin(workgroup_id) wg: vec3<u32>,
                             @builtin(local_invocation_index) li: u32,
                             @builtin(subgroup_id) sg: u32, @builtin(num_subgroups) nsg: u32) {
    tile_product(wg, li, sg, nsg);
    for (var q = 0u; q < LOADS; q++) {
        let o = out_of(wg, li, q);
        if (o.z == 0u) { continue; }
        let at = at_c(wg.z, o.x, o.y);
        c[p.off_c + at] = combine(at, o.y, sc[li + q * THREADS]) * gelu_grad(gelu_in[p.off_aux + at]);
    }
}
