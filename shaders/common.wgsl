// common.wgsl — the prelude of every kernel: the shader registry (crates/tensor/src/shaders.rs)
// puts this text before each file of shaders/, so these names are defined in all of them.
//
// Grid: one dimension of a dispatch holds at most 65,535 workgroups, so launchers lay the
// workgroups out on a 2-D grid (`gpu::grid_2d`) and a kernel numbers them
//   group = wg.y · num_workgroups.x + wg.x                             (group_index)
// A 256-wide kernel with one element per invocation handles element
//   i = group · 256 + local_invocation_index                          (flat_index)
// and returns when i is past the end.
//
// Reductions: workgroup_max, workgroup_sum and workgroup_sum2 combine one value per invocation
// of a 256-invocation workgroup by a tree in workgroup memory (step s = 128, 64, …, 1: lane l
// takes lane l + s), and every invocation gets the result. Each call begins and ends with a
// barrier, so it must be reached by the whole workgroup (uniform control flow), and calls can
// follow one another without overwriting a result someone has not read yet.

// Invocations of a 256-wide workgroup: the row kernels (one workgroup per row, invocation l
// taking columns l, l + 256, …) and the flat-index kernels.
const WG: u32 = 256u;

// The lowest finite f32 (−3.40282347e38), the identity of max. Not −inf: an invocation that
// sees no element (a row shorter than 256) would then compute inf − inf = NaN.
const LOWEST: f32 = -3.40282347e38;

fn group_index(wg: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wg.y * nwg.x + wg.x;
}

fn flat_index(wg: vec3<u32>, nwg: vec3<u32>, local: u32) -> u32 {
    return group_index(wg, nwg) * WG + local;
}

var<workgroup> red: array<f32, 256>;
var<workgroup> red2: array<f32, 256>;

// Max of `v` over the workgroup (every invocation gets it).
fn workgroup_max(li: u32, v: f32) -> f32 {
    red[li] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if (li < s) { red[li] = max(red[li], red[li + s]); }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();   // everyone has read red[0] before red is reused
    return r;
}

// Sum of `v` over the workgroup (every invocation gets it).
fn workgroup_sum(li: u32, v: f32) -> f32 {
    red[li] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if (li < s) { red[li] = red[li] + red[li + s]; }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

// Sums of `a` and of `b` over the workgroup, in one tree (every invocation gets both).
fn workgroup_sum2(li: u32, a: f32, b: f32) -> vec2<f32> {
    red[li] = a;
    red2[li] = b;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if (li < s) {
            red[li] = red[li] + red[li + s];
            red2[li] = red2[li] + red2[li + s];
        }
        workgroupBarrier();
    }
    let r = vec2<f32>(red[0], red2[0]);
    workgroupBarrier();
    return r;
}

// The IEEE binary16 value in the low 16 bits of `h`, exactly, as f32 (frozen weights stored in
// f16, `ops/matmul_f16.rs`). Integer operations only: WGSL's unpack2x16float needs a capability
// some adapters lack. A normal half moves its exponent from bias 15 to bias 127 (+112) and its
// 10 mantissa bits to the top of f32's 23; a subnormal one is mantissa·2⁻²⁴; infinities and NaNs
// keep their class.
fn half_to_f32(h: u32) -> f32 {
    let sign = (h & 0x8000u) << 16u;
    let e = (h >> 10u) & 0x1fu;
    let mant = h & 0x3ffu;
    if (e == 0u) {
        return bitcast<f32>(bitcast<u32>(ldexp(f32(mant), -24)) | sign);
    }
    if (e == 31u) {
        return bitcast<f32>(sign | 0x7f800000u | (mant << 13u));
    }
    return bitcast<f32>(sign | ((e + 112u) << 23u) | (mant << 13u));
}

// The f32 `x` rounded to the nearest IEEE binary16, ties to even, in the low 16 bits (activations
// saved in f16, `ops/half_tensor.rs`; the inverse of half_to_f32 on every half). Integer
// operations only, for the same reason. With x = (−1)^s·1.m·2^E:
// - NaN stays a quiet NaN (its top 9 mantissa bits kept), ±inf stays ±inf;
// - E ≥ 16 (|x| ≥ 65520 after rounding) overflows to ±inf, as IEEE rounding does;
// - E ≥ −14: a normal half, exponent E + 15, mantissa m's top 10 bits, then + 1 if the 13 bits
//   dropped are above half an ulp, or exactly half with an odd result (the + 1 carries into the
//   exponent when the mantissa is all ones, which is the right rounding, up to inf);
// - E < −14: a subnormal half, (1.m)·2^(E+24) ulps of 2⁻²⁴ rounded the same way; below 2⁻²⁵
//   it is ±0.
fn f32_to_half(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    let sign = (b >> 16u) & 0x8000u;
    let e = (b >> 23u) & 0xffu;
    let mant = b & 0x7fffffu;
    if (e == 255u) {
        return select(sign | 0x7c00u, sign | 0x7e00u | (mant >> 13u), mant != 0u);
    }
    if (e >= 143u) {   // E = e − 127 ≥ 16
        return sign | 0x7c00u;
    }
    if (e >= 113u) {   // E ≥ −14: normal
        let h = ((e - 112u) << 10u) | (mant >> 13u);
        let rest = mant & 0x1fffu;
        let up = rest > 0x1000u || (rest == 0x1000u && (h & 1u) == 1u);
        return sign | (h + select(0u, 1u, up));
    }
    if (e < 102u) {    // |x| < 2⁻²⁵: rounds to zero (exactly 2⁻²⁵ is a tie, to the even 0)
        return sign;
    }
    // Subnormal: the 24-bit significand 1.m shifted right by 126 − e (14 to 24) bits.
    let full = mant | 0x800000u;
    let shift = 126u - e;
    let h = full >> shift;
    let rest = full & ((1u << shift) - 1u);
    let half_ulp = 1u << (shift - 1u);
    let up = rest > half_ulp || (rest == half_ulp && (h & 1u) == 1u);
    return sign | (h + select(0u, 1u, up));
}

// GELU, tanh form (GPT-2's `gelu_new`), and its derivative, for gelu.wgsl and the matrix
// products' GELU epilogues (matmul.wgsl, matmul_tiled.wgsl), so every kernel rounds alike:
//   gelu(x)  = 0.5·x·(1 + tanh v),  v = K·(x + A·x³),  K = sqrt(2/pi) = 0.7978845608, A = 0.044715
//   gelu'(x) = 0.5·(1 + tanh v) + 0.5·x·(1 − tanh² v)·K·(1 + 3A·x²)
// evaluated without tanh (WGSL's is loosely specified, and 1 − tanh² v cancels in the tails):
// with e = exp(−2v) and s = 1/(1 + e) = 0.5·(1 + tanh v), 1 − s = e·s and 1 − tanh² v = 4·s·(1 − s):
//   gelu(x) = x·s,   gelu'(x) = s + 2·x·s·(1 − s)·K·(1 + 3A·x²).
// For |v| ≥ 40, s is 0 or 1 and the second term 0 (exp(80) still fits f32; what is dropped is
// below 1e-32), so huge |x| (x³ overflows from |x| ≈ 7e12) gives no NaN.
const GELU_K: f32 = 0.7978845608;   // sqrt(2/pi)
const GELU_A: f32 = 0.044715;       // GPT-2's cubic coefficient
const GELU_V_SAT: f32 = 40.0;       // |v| past which s is 0 or 1 in f32

fn gelu_inner(x: f32) -> f32 {
    return GELU_K * (x + GELU_A * x * x * x);
}

// (s, 1 − s) with s = 0.5·(1 + tanh v) = 1/(1 + exp(−2v)), saturated for |v| ≥ GELU_V_SAT.
fn gelu_halves(v: f32) -> vec2<f32> {
    if (abs(v) < GELU_V_SAT) {
        let e = exp(-2.0 * v);
        let s = 1.0 / (1.0 + e);
        return vec2<f32>(s, e * s);
    }
    let s = select(0.0, 1.0, v > 0.0);
    return vec2<f32>(s, 1.0 - s);
}

fn gelu_value(x: f32) -> f32 {
    return x * gelu_halves(gelu_inner(x)).x;
}

fn gelu_grad(x: f32) -> f32 {
    let v = gelu_inner(x);
    let h = gelu_halves(v);
    // 2·x·s·(1 − s)·v', zero once saturated (1 − s or s is then exactly 0).
    var tail = 0.0;
    if (abs(v) < GELU_V_SAT) {
        tail = 2.0 * x * h.x * h.y * GELU_K * (1.0 + 3.0 * GELU_A * x * x);
    }
    return h.x + tail;
}
