// dropout.wgsl — inverted dropout with a mask recomputed from (seed, element index).
//
// Launcher: crates/tensor/src/ops/dropout.rs (CPU path beside it, the same hash in Rust).
//
//   bits(i) = fmix32(pcg_hash(i) ^ fmix32(seed_lo ^ fmix32(seed_hi ^ 0x9e3779b9)))
//   out[i]  = x[i] · scale   if bits(i) ≥ threshold,   else 0
// with threshold = round(p · 2^32) and scale = 1 / (1 − p), both from the host: an element is
// kept with probability (2^32 − threshold) / 2^32 ≈ 1 − p. The backward pass is the same map
// applied to dy (the mask is recomputed from the seed, nothing is saved), so one entry point
// serves `dropout` and `dropout_backward`. All arithmetic is u32 and wraps, as in Rust's
// `wrapping_*`, so the CPU and the GPU draw bit-identical masks.
//
// Bindings: 0 params; 1 x (n, read); 2 out (n). Each is a bound *range* of a larger buffer;
// `off_*` is where the data starts inside it, `start` is the absolute index of element 0 of this
// dispatch (the mask depends on the index in the whole tensor, not in the dispatch).
// Workgroup: 256 invocations, one element each, on a 2-D grid (one dimension holds at most
// 65,535 workgroups): i = (wg.y · num_workgroups.x + wg.x) · 256 + local writes out[i].

struct Params {
    n: u32,          // elements in this dispatch
    start: u32,      // absolute index of this dispatch's first element
    seed_lo: u32,    // low 32 bits of the 64-bit seed
    seed_hi: u32,    // high 32 bits
    threshold: u32,  // round(p · 2^32), keep when bits ≥ threshold
    off_x: u32,
    off_out: u32,
    scale: f32,      // 1 / (1 − p)
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

// MurmurHash3's 32-bit finalizer (Appleby); 0x85ebca6b and 0xc2b2ae35 are its multipliers.
fn fmix32(v: u32) -> u32 {
    var h = v;
    h = h ^ (h >> 16u);
    h = h * 0x85ebca6bu;
    h = h ^ (h >> 13u);
    h = h * 0xc2b2ae35u;
    h = h ^ (h >> 16u);
    return h;
}

// PCG hash (Jarzynski & Olano 2020, "Hash Functions for GPU Rendering"): 747796405 is the PCG
// LCG multiplier, 2891336453 its increment, 277803737 the RXS-M-XS output multiplier.
fn pcg_hash(v: u32) -> u32 {
    let state = v * 747796405u + 2891336453u;
    let word = ((state >> ((state >> 28u) + 4u)) ^ state) * 277803737u;
    return (word >> 22u) ^ word;
}

// 0x9e3779b9 = floor(2^32 / φ), the golden-ratio constant, so seed 0 does not hash from 0.
fn dropout_bits(seed_lo: u32, seed_hi: u32, i: u32) -> u32 {
    let key = fmix32(seed_lo ^ fmix32(seed_hi ^ 0x9e3779b9u));
    return fmix32(pcg_hash(i) ^ key);
}

@compute @workgroup_size(256)
fn dropout(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) li: u32) {
    let i = flat_index(wg, nwg, li);
    if (i >= p.n) { return; }
    let keep = dropout_bits(p.seed_lo, p.seed_hi, p.start + i) >= p.threshold;
    out[p.off_out + i] = select(0.0, x[p.off_x + i] * p.scale, keep);
}
