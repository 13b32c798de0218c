// matmul_splitk.wgsl — the split-K matrix product for outputs too small to fill a GPU (LoRA's
// weight gradients: an r×768 or 768×r output, K = B·T): K is cut into S slices, one workgroup
// per (output tile, slice), each writing its partial product into a scratch buffer; a second
// entry point sums the S partials into C with the product's epilogue.
//
// Launcher: crates/tensor/src/ops/matmul_splitk.rs (chosen per dispatch by ops/matmul_launch.rs;
// the f64 oracle is crates/tensor/src/reference.rs).
//
// Math, for every batch index z < batch and 0 <= i < M, 0 <= j < N, with slices of
// slice_k = KS elements of K, slice s covering [s·KS, min(K, (s + 1)·KS)), s < S = slices:
//   P[z, s, i, j] = Σ_{s·KS <= p < min(K, (s+1)·KS)} opA[z, i, p] · opB[z, p, j]   (matmul_splitk_partial)
//   C[z, i, j]    = (accumulate ? C[z, i, j] : 0) + (has_bias ? bias[j] : 0)
//                 + alpha · Σ_{s < S} P[z, s, i, j]                                 (matmul_splitk_reduce)
// The slices partition [0, K), so Σ_s P[z, s, i, j] = Σ_{p < K} opA[z, i, p] · opB[z, p, j], the
// sum matmul.wgsl computes, added up in another order (f32 rounding differs, nothing else).
// opA, opB, the leading dimensions, offsets and batch strides are those of matmul.wgsl.
//
// Bindings (each a bound range of a buffer; `off_*` is where the data starts inside it):
//   0 params (uniform Params)
//   1 a     (batch, M, K) or (batch, K, M): element (z, r, c) at off_a + z·stride_a + r·lda + c
//   2 b     (batch, K, N) or (batch, N, K): element (z, r, c) at off_b + z·stride_b + r·ldb + c
//   3 part  (batch, S, M, N) dense, written by the partial pass: P[z, s, i, j] at
//           ((z·S + s)·M + i)·N + j
//   4 bias  (N) at off_bias + j; read only when has_bias = 1 (else the launcher binds A here)
//   5 parts the same scratch, read by the reduce pass
//   6 c     (batch, M, N): element (z, i, j) at off_c + z·stride_c + i·ldc + j   (read_write)
//
// Partial pass: matmul.wgsl's tiling over one slice. A workgroup of 16×16 invocations computes
// the 64×64 tile (m0, n0) = (64·wg.y, 64·wg.x) of slice s = wg.z % S of batch entry
// z = wg.z / S, staging BK = 16 deep slices of opA and opB in workgroup memory (zero outside
// the matrix and outside the K slice), each invocation owning a strided 4×4 block.
// Grid: (ceil(N / 64), ceil(M / 64), batch·S). Every in-range element of P is written (an
// empty slice writes zeros), so the scratch needs no clearing.
// Reduce pass: one invocation per element of C (256 per workgroup, the 2-D grid of
// common.wgsl over batch·M·N), reading the S partials of its element: consecutive invocations
// read consecutive words of each partial block.

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
    slices: u32,     // S, the K slices (S >= 1)
    slice_k: u32,    // KS, elements of K per slice (the last slice may be shorter)
    batch: u32,      // batch entries of this dispatch
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

// B's storage, as in matmul.wgsl: f32 bits, or two f16 elements per u32 word (a frozen weight
// stored in f16; off_b, ldb and stride_b then count f16 elements).
override B_F16: bool = false;

const TM: u32 = 64u;       // rows of C per workgroup = 16 invocations · 4 rows
const TN: u32 = 64u;       // columns of C per workgroup = 16 invocations · 4 columns
const BK: u32 = 16u;       // depth of one staged K step
const SIDE: u32 = 16u;     // invocations along each side of the workgroup
const PAD: u32 = 65u;      // row pitch of the staged tiles: TM + 1, so transposing stores hit distinct banks
const THREADS: u32 = 256u; // SIDE · SIDE
const LOADS: u32 = 4u;     // TM · BK / THREADS elements of each tile loaded per invocation

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<u32>;
@group(0) @binding(3) var<storage, read_write> part: array<f32>;
@group(0) @binding(4) var<storage, read> bias: array<f32>;
@group(0) @binding(5) var<storage, read> parts: array<f32>;
@group(0) @binding(6) var<storage, read_write> c: array<f32>;

// Staged steps: as_tile[kk·PAD + i] = opA[m0 + i, k0 + kk], bs_tile[kk·PAD + j] = opB[k0 + kk, n0 + j].
var<workgroup> as_tile: array<f32, BK * PAD>;
var<workgroup> bs_tile: array<f32, BK * PAD>;

// opA[z, i, kp] for kp < k_end (the end of the slice), 0 outside.
fn load_a(z: u32, i: u32, kp: u32, k_end: u32) -> f32 {
    if (i >= p.m || kp >= k_end) { return 0.0; }
    let base = p.off_a + z * p.stride_a;
    if (p.trans_a == 0u) { return a[base + i * p.lda + kp]; }
    return a[base + kp * p.lda + i];
}

// B's element e as f32: its bits, or the f16 half of word e/2 that holds it.
fn b_at(e: u32) -> f32 {
    if (B_F16) { return half_to_f32((b[e >> 1u] >> (16u * (e & 1u))) & 0xffffu); }
    return bitcast<f32>(b[e]);
}

// opB[z, kp, j] for kp < k_end, 0 outside.
fn load_b(z: u32, kp: u32, j: u32, k_end: u32) -> f32 {
    if (kp >= k_end || j >= p.n) { return 0.0; }
    let base = p.off_b + z * p.stride_b;
    if (p.trans_b == 0u) { return b_at(base + kp * p.ldb + j); }
    return b_at(base + j * p.ldb + kp);
}

@compute @workgroup_size(16, 16, 1)
fn matmul_splitk_partial(@builtin(workgroup_id) wg: vec3<u32>,
                         @builtin(local_invocation_id) lid: vec3<u32>,
                         @builtin(local_invocation_index) li: u32) {
    let z = wg.z / p.slices;
    let s = wg.z % p.slices;
    let m0 = wg.y * TM;
    let n0 = wg.x * TN;
    let tx = lid.x;
    let ty = lid.y;
    let k_begin = min(p.k, s * p.slice_k);
    let k_end = min(p.k, k_begin + p.slice_k);

    // acc[r][s4] = partial P[z, s, m0 + ty + 16r, n0 + tx + 16·s4]
    var acc = array<vec4<f32>, 4>(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));

    for (var k0 = k_begin; k0 < k_end; k0 += BK) {
        for (var l = 0u; l < LOADS; l++) {
            let e = li + l * THREADS;
            var i: u32; var kk: u32;
            if (p.trans_a == 0u) { i = e / BK; kk = e % BK; } else { kk = e / TM; i = e % TM; }
            as_tile[kk * PAD + i] = load_a(z, m0 + i, k0 + kk, k_end);
            var j: u32; var kb: u32;
            if (p.trans_b == 0u) { kb = e / TN; j = e % TN; } else { j = e / BK; kb = e % BK; }
            bs_tile[kb * PAD + j] = load_b(z, k0 + kb, n0 + j, k_end);
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

    let p_base = wg.z * p.m * p.n; // P[z, s] starts at ((z·S + s)·M)·N, and wg.z = z·S + s
    for (var r = 0u; r < 4u; r++) {
        let i = m0 + ty + r * SIDE;
        if (i >= p.m) { continue; }
        for (var q = 0u; q < 4u; q++) {
            let j = n0 + tx + q * SIDE;
            if (j >= p.n) { continue; }
            part[p_base + i * p.n + j] = acc[r][q];
        }
    }
}

@compute @workgroup_size(256, 1, 1)
fn matmul_splitk_reduce(@builtin(workgroup_id) wg: vec3<u32>,
                        @builtin(num_workgroups) nwg: vec3<u32>,
                        @builtin(local_invocation_index) li: u32) {
    let e = flat_index(wg, nwg, li);
    let mn = p.m * p.n;
    if (e >= p.batch * mn) { return; }
    let z = e / mn;
    let r = e % mn;
    let i = r / p.n;
    let j = r % p.n;
    var sum = 0.0;
    for (var s = 0u; s < p.slices; s++) {
        sum += parts[(z * p.slices + s) * mn + r];
    }
    var v = p.alpha * sum;
    if (p.has_bias != 0u) { v += bias[p.off_bias + j]; }
    let idx = p.off_c + z * p.stride_c + i * p.ldc + j;
    if (p.accumulate != 0u) { v += c[idx]; }
    c[idx] = v;
}
