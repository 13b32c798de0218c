// matmul_nf4.wgsl — matrix product with an NF4-quantized right operand, dequantized in the
// tile-load stage (QLoRA's frozen base: no f32 copy of W ever exists in device memory).
//
// Launcher: crates/tensor/src/ops/matmul_nf4.rs (CPU path beside it; the oracle is the f32
// product with the dequantized weight, crates/tensor/src/quant).
//
// Math, for 0 <= i < M, 0 <= j < N:
//   Y[i, j] = Σ_{0 <= p < K} X[i, p] · opW[p, j]
// where opW[p, j] = W[p, j] (W stored (K, N): GPT-2's Conv1D, y = x·W) or W[j, p] if trans_w
// (W stored (N, K): the backward's dx = dy·Wᵀ, or an nn.Linear weight), and each weight element
// e (row-major index in its stored shape) is
//   W[e] = NF4[code(e)] · scales[e / blocksize]
//   code(e) = nibble of byte e/2 (high nibble for even e), byte (e/2) mod 4 of word e/8.
//
// Bindings (each a bound range; `off_*` is where its data starts inside it):
//   0 params (uniform Params)
//   1 x      (M, K) f32
//   2 w      ceil(K·N / 8) u32 words of packed codes
//   3 scales (K·N / blocksize, rounded up) f32 block absmax values
//   4 y      (M, N) f32 (write)
//
// Tiling as matmul.wgsl: 16×16 invocations compute a 64×64 tile of Y, walking K in slices of 16
// staged in workgroup memory; the W slice is dequantized as it is staged.
// Grid: (ceil(N / 64), ceil(M / 64), 1).

struct Params {
    m: u32,
    n: u32,
    k: u32,
    trans_w: u32,    // 1: W is stored (N, K)
    blocksize: u32,
    off_x: u32,
    off_w: u32,      // in words
    off_s: u32,
    off_y: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

const TM: u32 = 64u;
const TN: u32 = 64u;
const BK: u32 = 16u;
const SIDE: u32 = 16u;
const PAD: u32 = 65u;
const THREADS: u32 = 256u;
const LOADS: u32 = 4u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<u32>;
@group(0) @binding(3) var<storage, read> scales: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

// The 16 NF4 levels (QLoRA; bitsandbytes' f32 values), ascending.
var<private> NF4: array<f32, 16> = array<f32, 16>(
    -1.0, -0.6961928, -0.52507305, -0.3949175, -0.28444138, -0.18477343, -0.091050036, 0.0,
    0.0795803, 0.1609302, 0.2461123, 0.33791524, 0.44070983, 0.562617, 0.72295684, 1.0);

var<workgroup> xs_tile: array<f32, BK * PAD>;
var<workgroup> ws_tile: array<f32, BK * PAD>;

// The weight element e of the stored matrix, dequantized.
fn weight(e: u32) -> f32 {
    let word = w[p.off_w + e / 8u];
    let byte = (word >> (8u * ((e / 2u) % 4u))) & 0xffu;
    let code = select(byte & 0xfu, byte >> 4u, e % 2u == 0u);
    return NF4[code] * scales[p.off_s + e / p.blocksize];
}

fn load_x(i: u32, kp: u32) -> f32 {
    if (i >= p.m || kp >= p.k) { return 0.0; }
    return x[p.off_x + i * p.k + kp];
}

// opW[kp, j], 0 outside the matrix.
fn load_w(kp: u32, j: u32) -> f32 {
    if (kp >= p.k || j >= p.n) { return 0.0; }
    if (p.trans_w == 0u) { return weight(kp * p.n + j); }
    return weight(j * p.k + kp);
}

@compute @workgroup_size(16, 16, 1)
fn matmul_nf4(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
              @builtin(local_invocation_index) li: u32) {
    let m0 = wg.y * TM;
    let n0 = wg.x * TN;
    let tx = lid.x;
    let ty = lid.y;
    var acc = array<vec4<f32>, 4>(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));

    for (var k0 = 0u; k0 < p.k; k0 += BK) {
        for (var l = 0u; l < LOADS; l++) {
            let e = li + l * THREADS;
            let i = e / BK;
            let kk = e % BK;
            xs_tile[kk * PAD + i] = load_x(m0 + i, k0 + kk);
            // Consecutive invocations walk the stored rows of W, so its words are read in order.
            var j: u32; var kb: u32;
            if (p.trans_w == 0u) { kb = e / TN; j = e % TN; } else { j = e / BK; kb = e % BK; }
            ws_tile[kb * PAD + j] = load_w(k0 + kb, n0 + j);
        }
        workgroupBarrier();

        for (var kk = 0u; kk < BK; kk++) {
            let row = kk * PAD;
            let wv = vec4<f32>(ws_tile[row + tx], ws_tile[row + tx + 16u],
                               ws_tile[row + tx + 32u], ws_tile[row + tx + 48u]);
            for (var r = 0u; r < 4u; r++) {
                acc[r] = fma(vec4<f32>(xs_tile[row + ty + r * SIDE]), wv, acc[r]);
            }
        }
        workgroupBarrier();
    }

    for (var r = 0u; r < 4u; r++) {
        let i = m0 + ty + r * SIDE;
        if (i >= p.m) { continue; }
        for (var s = 0u; s < 4u; s++) {
            let j = n0 + tx + s * SIDE;
            if (j >= p.n) { continue; }
            y[p.off_y + i * p.n + j] = acc[r][s];
        }
    }
}
