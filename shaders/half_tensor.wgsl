// half_tensor.wgsl — f32 tensors stored as IEEE halves and read back (activations saved in f16,
// `--precision f16`).
//
// Launcher: crates/tensor/src/ops/half_tensor.rs (CPU path beside it).
//
// Layout: halves packed two to a u32 word, element e in the low 16 bits of word e/2 when e is
// even and in the high 16 bits when odd (the frozen f16 weights' layout); an odd count leaves the
// last word's high half 0.
//   pack_f16:    words[w] = f32_to_half(x[2w]) | f32_to_half(x[2w + 1]) << 16   (round to nearest, ties to even)
//   unpack_f16:  out[2w] = half_to_f32(low half of words[w]), out[2w + 1] = half_to_f32(high half)
// f32_to_half and half_to_f32 are common.wgsl's, integer operations only, so no adapter needs
// the shader-f16 feature; widening is exact, so unpack(pack(x)) is x rounded to f16.
//
// Bindings: 0 params; 1 x (n f32, pack's input); 2 words (⌈n/2⌉ u32); 3 out (n f32, unpack's
// output). Each array is a bound *range* of a larger buffer; `off_*` is where the data starts.
// Workgroup: 256 invocations, one word (two elements) each, on a 2-D grid; w ≥ ⌈n/2⌉ returns.

struct Params {
    n: u32,        // elements in this dispatch (its first element is even)
    off_x: u32,
    off_words: u32,
    off_out: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> words: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(256)
fn pack_f16(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) li: u32) {
    let w = flat_index(wg, nwg, li);
    let e = 2u * w;
    if (e >= p.n) { return; }
    var hi = 0u;
    if (e + 1u < p.n) { hi = f32_to_half(x[p.off_x + e + 1u]); }
    words[p.off_words + w] = f32_to_half(x[p.off_x + e]) | (hi << 16u);
}

@compute @workgroup_size(256)
fn unpack_f16(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) li: u32) {
    let w = flat_index(wg, nwg, li);
    let e = 2u * w;
    if (e >= p.n) { return; }
    let word = words[p.off_words + w];
    out[p.off_out + e] = half_to_f32(word & 0xffffu);
    if (e + 1u < p.n) { out[p.off_out + e + 1u] = half_to_f32(word >> 16u); }
}
