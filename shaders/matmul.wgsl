// matmul.wgsl — tiled, register-blocked matrix product with optional transposes, batch, a scale
// α, fused bias and accumulation.
//
// Launcher: crates/tensor/src/ops/matmul.rs (CPU path beside it; the f64 oracle is crates/tensor/src/reference.rs).
//
// Math, for every batch index z (workgroup_id.z) and 0 <= i < M, 0 <= j < N:
//   C[z, i, j] = (accumulate ? C[z, i, j] : 0) + (has_bias ? bias[j] : 0)
//              + alpha · Σ_{0 <= p < K} opA[z, i, p] · opB[z, p, j]
// where opA[i, p] = A[i, p] (A stored (M, K), row length lda) or A[p, i] if trans_a (stored (K, M));
//       opB[p, j] = B[p, j] (B stored (K, N), row length ldb) or B[j, p] if trans_b (stored (N, K)).
// The leading dimensions lda, ldb, ldc (elements from one stored row to the next) let the
// launcher run a sub-block of a larger product when a tensor does not fit in one binding, and
// read or write a column block of a wider tensor (LoRA's update into q's or v's columns of
// c_attn's (N, 3C) output: ldc = 3C, off_c at the block's first column).
//
// Bindings (each a bound *range* of a buffer; `off_*` is where the data starts inside it):
//   0 params (uniform Params)
//   1 a    (batch, M, K) or (batch, K, M): element (z, r, c) at off_a + z·stride_a + r·lda + c
//   2 b    (batch, K, N) or (batch, N, K): element (z, r, c) at off_b + z·stride_b + r·ldb + c
//          (stride_b = 0 when one 2-D B is shared by the whole batch). Bound as u32 words: the
//          bits of f32 elements, or with B_F16 two f16 elements per word (element e in the low
//          half of word e/2 when e is even, the high half when odd), a frozen weight stored at
//          half the bytes, widened exactly by the prelude's half_to_f32; off_b, ldb and stride_b
//          then count f16 elements. Products accumulate in f32 either way.
//   3 c    (batch, M, N): element (z, i, j) at off_c + z·stride_c + i·ldc + j   (read_write)
//   4 bias (N) at off_bias + j; read only when has_bias = 1 (else the launcher binds A here)
//   5 gelu_out (batch, M, N), C's layout at off_aux (matmul_gelu only; read_write)
//   6 gelu_in  (batch, M, N), C's layout at off_aux (matmul_gelu_backward only)
//
// Entry points, one per epilogue (what is done with each output once its sum is complete; each
// entry point binds only what its epilogue uses, so the plain product binds no extra buffer).
// With v = (accumulate ? C : 0) + (has_bias ? bias[j] : 0) + alpha · Σ opA·opB as above:
//   matmul               C = v
//   matmul_gelu          C = v (the pre-activation u) and gelu_out = gelu(v)   (GPT-2's c_fc)
//   matmul_gelu_backward C = v · gelu'(gelu_in)  (v = dG = dY·W2ᵀ, gelu_in = u: C = dU)
// gelu and gelu' are common.wgsl's (tanh form). The launcher (ops/matmul_gelu.rs) splits K only
// with the epilogue on the last K chunk, so it always sees the whole sum.
//
// Tiling: a workgroup of 16×16 = 256 invocations computes one 64×64 tile of C
// (TM = TN = 64 = 16 invocations × 4 outputs each way). It walks K in steps of BK = 16:
// the 64×16 slice of opA and the 16×64 slice of opB are staged in workgroup memory (zero
// outside the matrix, so any M, N, K works), then each invocation accumulates its 4×4 block.
// Invocation (tx, ty) owns rows m0 + ty + 16·r and columns n0 + tx + 16·s, r, s in 0..4:
// strided so that neighbouring invocations read neighbouring workgroup-memory words and write
// neighbouring C elements. Every invocation takes part in the loads and barriers; only the
// stores are bounds-checked (out-of-range outputs are skipped, never returned from early).
// Grid: (ceil(N / 64), ceil(M / 64), batch).

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

const TM: u32 = 64u;       // rows of C per workgroup = 16 invocations · 4 rows
const TN: u32 = 64u;       // columns of C per workgroup = 16 invocations · 4 columns
const BK: u32 = 16u;       // depth of one staged K slice
const SIDE: u32 = 16u;     // invocations along each side of the workgroup
const PAD: u32 = 65u;      // row pitch of the staged tiles: TM + 1, so transposing stores hit distinct banks
const THREADS: u32 = 256u; // SIDE · SIDE
const LOADS: u32 = 4u;     // TM · BK / THREADS elements of each tile loaded per invocation

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<u32>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;
@group(0) @binding(4) var<storage, read> bias: array<f32>;
@group(0) @binding(5) var<storage, read_write> gelu_out: array<f32>;
@group(0) @binding(6) var<storage, read> gelu_in: array<f32>;

// Staged slices: as_tile[kk·PAD + i] = opA[m0 + i, k0 + kk], bs_tile[kk·PAD + j] = opB[k0 + kk, n0 + j].
var<workgroup> as_tile: array<f32, BK * PAD>;
var<workgroup> bs_tile: array<f32, BK * PAD>;

// opA[z, i, p], 0 outside the matrix.
fn load_a(z: u32, i: u32, kp: u32) -> f32 {
    if (i >= p.m || kp >= p.k) { return 0.0; }
    let base = p.off_a + z * p.stride_a;
    if (p.trans_a == 0u) { return a[base + i * p.lda + kp]; }
    return a[base + kp * p.lda + i];
}

// B's element e as f32: its bits, or the f16 half of word e/2 that holds it.
fn b_at(e: u32) -> f32 {
    if (B_F16) { return half_to_f32((b[e >> 1u] >> (16u * (e & 1u))) & 0xffffu); }
    return bitcast<f32>(b[e]);
}

// opB[z, p, j], 0 outside the matrix.
fn load_b(z: u32, kp: u32, j: u32) -> f32 {
    if (kp >= p.k || j >= p.n) { return 0.0; }
    let base = p.off_b + z * p.stride_b;
    if (p.trans_b == 0u) { return b_at(base + kp * p.ldb + j); }
    return b_at(base + j * p.ldb + kp);
}

// The 4×4 block of sums Σ_p opA[z, i, p]·opB[z, p, j] that invocation (tx, ty) of the workgroup
// `wg` owns: acc[r][s] for i = m0 + ty + 16r, j = n0 + tx + 16s. Every invocation of the
// workgroup calls it (it holds the barriers).
fn tile_product(wg: vec3<u32>, lid: vec3<u32>, li: u32) -> array<vec4<f32>, 4> {
    let z = wg.z;
    let m0 = wg.y * TM;
    let n0 = wg.x * TN;
    let tx = lid.x;
    let ty = lid.y;

    // acc[r][s] = partial C[m0 + ty + 16r, n0 + tx + 16s]
    var acc = array<vec4<f32>, 4>(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));

    for (var k0 = 0u; k0 < p.k; k0 += BK) {
        // Stage the slices. Consecutive invocations walk the stored rows' contiguous axis, so the
        // global reads are coalesced whichever way each operand is stored.
        for (var l = 0u; l < LOADS; l++) {
            let e = li + l * THREADS;
            var i: u32; var kk: u32;
            if (p.trans_a == 0u) { i = e / BK; kk = e % BK; } else { kk = e / TM; i = e % TM; }
            as_tile[kk * PAD + i] = load_a(z, m0 + i, k0 + kk);
            var j: u32; var kb: u32;
            if (p.trans_b == 0u) { kb = e / TN; j = e % TN; } else { j = e / BK; kb = e % BK; }
            bs_tile[kb * PAD + j] = load_b(z, k0 + kb, n0 + j);
        }
        workgroupBarrier();

        for (var kk = 0u; kk < BK; kk++) {
            let row = kk * PAD;
            let bv = vec4<f32>(bs_tile[row + tx], bs_tile[row + tx + 16u],
                               bs_tile[row + tx + 32u], bs_tile[row + tx + 48u]);
            for (var r = 0u; r < 4u; r++) {
                acc[r] = fma(vec4<f32>(as_tile[row + ty + r * SIDE]), bv, acc[r]);
            }
        }
        workgroupBarrier();
    }
    return acc;
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

@compute @workgroup_size(16, 16, 1)
fn matmul(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
          @builtin(local_invocation_index) li: u32) {
    let acc = tile_product(wg, lid, li);
    for (var r = 0u; r < 4u; r++) {
        let i = wg.y * TM + lid.y + r * SIDE;
        if (i >= p.m) { continue; }
        for (var s = 0u; s < 4u; s++) {
            let j = wg.x * TN + lid.x + s * SIDE;
            if (j >= p.n) { continue; }
            let at = at_c(wg.z, i, j);
            c[p.off_c + at] = combine(at, j, acc[r][s]);
        }
    }
}

// C = u = v and gelu_out = gelu(u): the forward of a linear layer followed by GELU.
@compute @workgroup_size(16, 16, 1)
fn matmul_gelu(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
               @builtin(local_invocation_index) li: u32) {
    let acc = tile_product(wg, lid, li);
    for (var r = 0u; r < 4u; r++) {
        let i = wg.y * TM + lid.y + r * SIDE;
        if (i >= p.m) { continue; }
        for (var s = 0u; s < 4u; s++) {
            let j = wg.x * TN + lid.x + s * SIDE;
            if (j >= p.n) { continue; }
            let at = at_c(wg.z, i, j);
            let u = combine(at, j, acc[r][s]);
            c[p.off_c + at] = u;
            gelu_out[p.off_aux + at] = gelu_value(u);
        }
    }
}

// C = dU = v · gelu'(u), u read from gelu_in: the backward through GELU of the product dG = dY·W2ᵀ.
@compute @workgroup_size(16, 16, 1)
fn matmul_gelu_backward(@builtin(workgroup_id) wg: vec3<u32>,
                        @builtin(local_invocation_id) lid: vec3<u32>,
                        @builtin(local_invocation_index) li: u32) {
    let acc = tile_product(wg, lid, li);
    for (var r = 0u; r < 4u; r++) {
        let i = wg.y * TM + lid.y + r * SIDE;
        if (i >= p.m) { continue; }
        for (var s = 0u; s < 4u; s++) {
            let j = wg.x * TN + lid.x + s * SIDE;
            if (j >= p.n) { continue; }
            let at = at_c(wg.z, i, j);
            c[p.off_c + at] = combine(at, j, acc[r][s]) * gelu_grad(gelu_in[p.off_aux + at]);
        }
    }
}
